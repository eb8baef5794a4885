"""The packed history a section is conditioned on (paper section 3; DESIGN.md section 3).

Holds only the latents the next section needs (1x/2x/4x context plus one neighbour window for the
VAE's causal context); everything older is on disk in the section files, so RAM stays flat however
long the video gets.
"""

from __future__ import annotations

import torch

from . import schedule
from .schedule import SectionLayout


def kept_frames(window: int) -> int:
    """Latent frames the history holds: the packed context (+1) or two windows for the decoder's context."""
    return max(schedule.HISTORY_TOTAL + 1, 2 * window + 1)


def sections_to_replay(window: int) -> int:
    """Finished sections a resume replays to rebuild the history exactly: enough to fill every kept frame."""
    return -(-kept_frames(window) // window)


class PackedHistory:
    """The latents the next section needs: packed context and the neighbour window for decoding.

    Only `keep` latent frames are held; everything older is on disk in the section files.
    Inverted mode prepends (the video grows towards the start image), forward mode appends.
    """

    def __init__(self, inverted: bool, window: int, start_latent: torch.Tensor) -> None:
        self.inverted = inverted
        self.window = window
        _, c, _, h, w = start_latent.shape
        self.latents = torch.zeros(1, c, schedule.HISTORY_TOTAL, h, w)
        self.generated = 0
        if not inverted:
            # Forward: the start frame is the first frame of the history (and of the video).
            self.latents = torch.cat([self.latents, start_latent], dim=2)
            self.generated = 1
        self.keep = kept_frames(window)

    def skip(self, frames: int) -> None:
        """Count sections a resume does not replay (they left the window); call before replaying the
        last sections_to_replay() ones, which then fill every kept frame."""
        self.generated += frames

    def context(self, layout: SectionLayout, start_latent, end_latent) -> dict[str, torch.Tensor]:
        sizes = [schedule.HISTORY_1X, schedule.HISTORY_2X, schedule.HISTORY_4X]
        if self.inverted:
            # The newest latents lie just after the window in time: 1x, then 2x, then 4x.
            h1, h2, h4 = self.latents[:, :, : schedule.HISTORY_TOTAL].split(sizes, dim=2)
            if layout.use_end_image:
                h1 = end_latent  # plans the endpoint (paper Fig. 2b)
        else:
            h4, h2, h1 = self.latents[:, :, -schedule.HISTORY_TOTAL:].split(sizes[::-1], dim=2)
        return {"latents_clean": torch.cat([start_latent, h1], dim=2), "latents_history_2x": h2,
                "latents_history_4x": h4}

    def add(self, latents: torch.Tensor) -> torch.Tensor:
        """Record a finished section; returns the latents to decode (the section plus a neighbour window)."""
        first = self.generated == (0 if self.inverted else 1)
        if self.inverted:
            self.latents = torch.cat([latents, self.latents], dim=2)[:, :, : self.keep]
        else:
            self.latents = torch.cat([self.latents, latents], dim=2)[:, :, -self.keep:]
        self.generated += latents.shape[2]
        # The first decode holds everything made so far; later ones overlap one window for VAE context.
        span = self.generated if first else latents.shape[2] + self.window
        return self.latents[:, :, :span] if self.inverted else self.latents[:, :, -span:]
