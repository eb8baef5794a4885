"""Pure integer and float math of FramePack: sections, paddings, index layouts, buckets, sigmas.

Nothing here touches a model or a tensor, so every rule of DESIGN.md §3 is unit-tested on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FPS = 30
LATENT_CHANNELS = 16
VAE_SPATIAL = 8  # HunyuanVideo VAE: 8x in height/width ...
VAE_TEMPORAL = 4  # ... and 4x in time (causal: T latents -> 4(T-1)+1 frames)
PATCH = 2  # transformer patch 1x2x2

# Released checkpoints were trained with 1 + 2 + 16 clean history latents (1x, 2x, 4x kernels).
HISTORY_1X, HISTORY_2X, HISTORY_4X = 1, 2, 16
HISTORY_TOTAL = HISTORY_1X + HISTORY_2X + HISTORY_4X

# Reference buckets for base 640 as (height, width); other bases scale these (multiples of 16).
BUCKETS_640 = (
    (416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
    (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416),
)


def section_count(seconds: float, window: int) -> int:
    """Sections for a request: each section makes 4*window frames at 30 fps (reference rounding)."""
    return max(1, round(seconds * FPS / (VAE_TEMPORAL * window)))


def total_frames(sections: int, window: int) -> int:
    """Frames of the finished video: 4 per latent frame plus the start frame."""
    return VAE_TEMPORAL * sections * window + 1


def overlap_frames(window: int) -> int:
    """Pixel frames cross-faded between neighbouring sections (reference: 4w-3, one window's decode)."""
    return (window - 1) * VAE_TEMPORAL + 1


def latent_paddings(sections: int) -> list[int]:
    """Blank-slot counts (in windows) per section, in sampling order, for inverted anti-drift.

    n-1 ... 0 in general; above 4 sections the reference uses 3, 2, ..., 2, 1, 0 because ever larger
    gaps looked worse than repeating 2 (DESIGN.md §3).
    """
    if sections > 4:
        return [3] + [2] * (sections - 3) + [1, 0]
    return list(reversed(range(sections)))


@dataclass(frozen=True)
class SectionLayout:
    """Time indices the transformer sees for one section (RoPE uses them; they place frames in time)."""

    number: int  # 0-based, in sampling order
    padding: int  # blank latent frames between the start image and the window (inverted only)
    is_first: bool
    is_last: bool
    use_end_image: bool  # the end image latent fills the 1x slot (inverted, first section)
    indices_latents: tuple[int, ...]
    indices_clean: tuple[int, ...]  # start image, then the 1x history frame
    indices_2x: tuple[int, ...]
    indices_4x: tuple[int, ...]


def _split(total_sizes: list[int]) -> list[tuple[int, ...]]:
    parts, start = [], 0
    for size in total_sizes:
        parts.append(tuple(range(start, start + size)))
        start += size
    return parts


def section_layouts(sections: int, window: int, mode: str, has_end_image: bool = False) -> list[SectionLayout]:
    """Index layout of every section, in sampling order (paper Fig. 2a/2c with packing)."""
    if sections < 1 or window < 1:
        raise ValueError("sections and window must be at least 1")
    layouts = []
    if mode == "inverted":
        for k, pad in enumerate(latent_paddings(sections)):
            # [start (1)] [blank (p*w)] [window (w)] [1x (1)] [2x (2)] [4x (16)]
            start, _blank, win, h1, h2, h4 = _split(
                [1, pad * window, window, HISTORY_1X, HISTORY_2X, HISTORY_4X]
            )
            layouts.append(SectionLayout(
                number=k, padding=pad * window, is_first=k == 0, is_last=k == sections - 1,
                use_end_image=has_end_image and k == 0,
                indices_latents=win, indices_clean=start + h1, indices_2x=h2, indices_4x=h4,
            ))
    elif mode == "forward":
        if has_end_image:
            raise ValueError("the end image is only defined for inverted mode")
        # [start (1)] [4x (16)] [2x (2)] [1x (1)] [window (w)]
        start, h4, h2, h1, win = _split([1, HISTORY_4X, HISTORY_2X, HISTORY_1X, window])
        for k in range(sections):
            layouts.append(SectionLayout(
                number=k, padding=0, is_first=k == 0, is_last=k == sections - 1, use_end_image=False,
                indices_latents=win, indices_clean=start + h1, indices_2x=h2, indices_4x=h4,
            ))
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return layouts


def decoded_frames_per_section(sections: int, window: int, mode: str) -> list[int]:
    """New final pixel frames each section adds, in sampling order; sums to total_frames()."""
    if sections == 1:
        return [total_frames(1, window)]
    step = VAE_TEMPORAL * window
    if mode == "inverted":
        # First decode is one window alone (4w-3 frames); the last one carries the start frame too.
        return [step - 3] + [step] * (sections - 2) + [step + 4]
    # Forward: the first section is decoded together with the start latent (4w+1 frames).
    return [step + 1] + [step] * (sections - 1)


def find_bucket(height: int, width: int, base: int = 640) -> tuple[int, int]:
    """(height, width) of the bucket with the nearest aspect ratio, scaled from the 640 list to `base`."""
    if height <= 0 or width <= 0:
        raise ValueError("image size must be positive")
    best = min(BUCKETS_640, key=lambda hw: abs(height * hw[1] - width * hw[0]))
    if base == 640:
        return best
    scale = base / 640
    return (max(16, round(best[0] * scale / 16) * 16), max(16, round(best[1] * scale / 16) * 16))


def flux_mu(image_seq_len: float) -> float:
    """Time-shift strength: linear from 0.5 at 256 tokens to 1.15 at 4096 tokens, capped at ln 7."""
    slope = (1.15 - 0.5) / (4096 - 256)
    mu = 0.5 + slope * (image_seq_len - 256)
    return min(mu, math.log(7.0))


def window_tokens(window: int, height: int, width: int) -> int:
    """Transformer tokens of the noisy window: latent frames x (H/8/2) x (W/8/2)."""
    return window * (height // VAE_SPATIAL // PATCH) * (width // VAE_SPATIAL // PATCH)


def flow_sigmas(steps: int, image_seq_len: float) -> list[float]:
    """steps+1 noise levels from 1 to 0 with the flux time shift e^mu / (e^mu + 1/sigma - 1)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    e_mu = math.exp(flux_mu(image_seq_len))
    out = []
    for i in range(steps + 1):
        sigma = 1.0 - i / steps
        out.append(0.0 if sigma <= 0.0 else e_mu / (e_mu + 1.0 / sigma - 1.0))
    return out
