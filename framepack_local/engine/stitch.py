"""Cross-fade decoded sections into one video while holding only the still-changing edge in RAM.

Each section is decoded together with its neighbour's latents so the causal VAE has context; the
`overlap` frames shared with the neighbour are blended linearly (reference: 4w-3 frames). Frames
beyond that edge can never change again, so they go straight to the sink (encoded once) and only
the edge stays in memory until the next section arrives.
"""

from __future__ import annotations

from typing import Callable

import torch

FrameSink = Callable[[torch.Tensor], None]  # receives (T, H, W, 3) float [0, 1] final frames


def _fade(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Linear cross-fade over time from `first` (weight 1 -> 0) to `second`."""
    n = first.shape[0]
    w = torch.linspace(1, 0, n, dtype=first.dtype).view(n, 1, 1, 1)
    return w * first + (1 - w) * second


class Stitcher:
    """prepend=True for inverted mode (each decode lies earlier in time than the video so far)."""

    def __init__(self, overlap: int, prepend: bool, sink: FrameSink) -> None:
        self.overlap = overlap
        self.prepend = prepend
        self.sink = sink
        self.pending: torch.Tensor | None = None  # the edge frames that the next section will blend
        self.emitted = 0  # frames already handed to the sink

    @property
    def frames(self) -> int:
        return self.emitted + (0 if self.pending is None else self.pending.shape[0])

    def add(self, decoded_thwc: torch.Tensor) -> None:
        """Take one section's decode (which includes `overlap` frames of the previous edge)."""
        ov = self.overlap
        if self.pending is None:
            combined = decoded_thwc
        elif self.prepend:
            combined = torch.cat([decoded_thwc[:-ov], _fade(decoded_thwc[-ov:], self.pending)])
        else:
            combined = torch.cat([_fade(self.pending, decoded_thwc[:ov]), decoded_thwc[ov:]])
        keep = min(ov, combined.shape[0])
        cut = keep if self.prepend else combined.shape[0] - keep
        if self.prepend:
            self.pending, final = combined[:cut].clone(), combined[cut:]
        else:
            final, self.pending = combined[:cut], combined[cut:].clone()
        self._emit(final)

    def finish(self) -> None:
        """Flush the edge: no more sections will come."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._emit(pending)

    def _emit(self, frames: torch.Tensor) -> None:
        if frames.shape[0]:
            self.sink(frames)
            self.emitted += frames.shape[0]
