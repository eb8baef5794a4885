"""Training-free colour correction of decoded sections (README "Drift"; the F1 darkening of reference issue #535).

Each section's decoded frames are moved, in CIELAB, towards a reference: the start photo ("start") or the
neighbouring finished section ("neighbour"). Per channel, mean and spread are blended towards the
reference's by `strength` (an affine map of L*, a*, b*), so 0 changes nothing and 1 matches fully.

Why pixels after the decode and not latents before it: the VAE's 16 latent channels are not colours (a
shift of their means changes hue, contrast and texture at once, and nothing measures it), while CIELAB
is the space the drift report measures and a viewer perceives; and a pixel correction leaves the latents
untouched, so the sampled sections, the model's packed context and the saved section files (what a
resume replays) are exactly those of an uncorrected run. The cost: drift in the context still feeds the
next section; the correction hides it from the video, it does not stop the model from drifting.

Deterministic (numpy on the CPU, no randomness). Every section's map is recorded in job.json
("color_correction"), so a resume re-applies the recorded map to the edge it rebuilds and takes the
neighbour reference from the record: bit-identical frames. The start frame itself is never changed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

MODES = ("off", "start", "neighbour")
COLOUR_SIDE = 160  # statistics on a strided copy (as the drift report's); the map is applied to every pixel
MAX_SCALE = 2.0  # a spread is never stretched or squeezed more than this (a flat section would explode)


def lab_stats(frames_thwc: np.ndarray) -> dict:
    """Mean and standard deviation of L*, a*, b* over frames ((T,) H, W, 3, floats in [0, 1] or uint8)."""
    from skimage import color

    arr = np.asarray(frames_thwc)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    step = max(1, math.ceil(max(arr.shape[1:3]) / COLOUR_SIDE))
    lab = color.rgb2lab(arr[:, ::step, ::step], channel_axis=-1).reshape(-1, 3).astype(np.float64)
    return {"mean": lab.mean(axis=0).tolist(), "std": lab.std(axis=0).tolist()}


def plan_map(source: dict, reference: dict, strength: float) -> dict:
    """The affine Lab map (lab * scale + shift) moving `source` statistics towards `reference` by strength."""
    s_mean, s_std = np.asarray(source["mean"]), np.asarray(source["std"])
    r_mean, r_std = np.asarray(reference["mean"]), np.asarray(reference["std"])
    target_std = s_std + strength * (r_std - s_std)
    scale = np.clip(target_std / np.maximum(s_std, 1e-6), 1 / MAX_SCALE, MAX_SCALE)
    target_mean = s_mean + strength * (r_mean - s_mean)
    return {"scale": scale.tolist(), "shift": (target_mean - s_mean * scale).tolist()}


def apply_map(frames_thwc: torch.Tensor, lab_map: dict, keep_first: bool = False) -> torch.Tensor:
    """Frames (T, H, W, 3) float [0, 1] with the map applied; frame 0 untouched when keep_first."""
    from skimage import color

    first = 1 if keep_first else 0
    if frames_thwc.shape[0] <= first:
        return frames_thwc
    rgb = frames_thwc[first:].numpy()
    lab = color.rgb2lab(rgb, channel_axis=-1)
    lab = lab * np.asarray(lab_map["scale"], lab.dtype) + np.asarray(lab_map["shift"], lab.dtype)
    with warnings.catch_warnings():  # colours pushed out of the sRGB gamut are clipped, as intended
        warnings.simplefilter("ignore")
        out = np.clip(color.lab2rgb(lab, channel_axis=-1), 0.0, 1.0).astype(np.float32)
    corrected = torch.from_numpy(out)
    return torch.cat([frames_thwc[:first], corrected]) if first else corrected


def new_frames(total: int, overlap: int, inverted: bool, first: bool) -> slice:
    """The frames of a decode that belong to the new section (the rest re-decodes the neighbour's edge)."""
    if first:
        return slice(None)
    return slice(0, max(1, total - overlap)) if inverted else slice(min(overlap, total - 1), None)


def holds_start_frame(inverted: bool, is_last: bool, number: int) -> bool:
    """Whether this section's decode begins with the start frame (the start latent is in its span)."""
    return is_last if inverted else number == 0


@dataclass
class ColourCorrector:
    """One job's correction: `correct` proposes a section's frames and its record entry, `commit` keeps it.

    `records`: the job's "color_correction" list so far (one entry per finished section, sampling order).
    """

    mode: str
    strength: float
    start_stats: dict
    records: list = field(default_factory=list)

    @classmethod
    def for_job(cls, mode: str, strength: float, start_rgb: np.ndarray, recorded: list | None, done: int):
        if mode == "off":
            return None
        return cls(mode, float(strength), lab_stats(start_rgb), list(recorded or [])[:done])

    def reference(self) -> dict | None:
        if self.mode == "start":
            return self.start_stats
        return self.records[-1]["after"] if self.records else None  # the first section has no neighbour

    def correct(self, decoded_thwc: torch.Tensor, new_frames: slice, keep_first: bool) -> tuple[torch.Tensor, dict]:
        """Correct a section's decode; statistics from its own new frames (not the neighbour's overlap)."""
        source = lab_stats(decoded_thwc[new_frames].numpy())
        reference = self.reference()
        if reference is None or self.strength == 0:
            return decoded_thwc, {"map": None, "keep_first": keep_first, "source": source, "after": source}
        lab_map = plan_map(source, reference, self.strength)
        out = apply_map(decoded_thwc, lab_map, keep_first)
        return out, {"map": lab_map, "keep_first": keep_first, "source": source,
                     "after": lab_stats(out[new_frames].numpy())}

    def commit(self, entry: dict) -> None:
        self.records.append(entry)

    def replay_last(self, decoded_thwc: torch.Tensor) -> torch.Tensor:
        """The last finished section's decode with the map it was given (a resume rebuilding the edge)."""
        entry = self.records[-1] if self.records else None
        if entry is None or entry["map"] is None:
            return decoded_thwc
        return apply_map(decoded_thwc, entry["map"], entry["keep_first"])
