"""MagCache magnitude ratios: the published tables, the ones calibrated on this model folder, the choice.

A ratio is mean(|residual at step t|) / mean(|residual at step t-1|) of the transformer's blocks over one
denoising trajectory; MagCache skips steps while the product of ratios stays close to 1. Ratios depend
on the checkpoint and the step count, hardly on the prompt or the seed.

Calibrated ratios live in ``models/.cache/step_cache/<transformer fingerprint>.json`` keyed by step
count; a job prefers them over the shipped tables and records which it used.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import atomic_write_json

logger = logging.getLogger(__name__)

# FramePack F1 at 25 UniPC steps, published by the MagCache authors: Zehong-Ma/MagCache,
# MagCache4FramePack/magcache_demo_gradio_f1.py, `initialize_magcache`. The leading 1.0 is step 0,
# which has no previous residual.
FRAMEPACK_F1_MAG_RATIOS = (
    1.0, 1.25781, 1.08594, 1.02344, 1.00781, 1.02344, 1.00781, 1.02344, 1.05469, 0.99609, 1.03906, 1.00781,
    1.01562, 1.00781, 1.02344, 1.01562, 0.98047, 1.05469, 0.98047, 0.96875, 1.03125, 0.97266, 0.9375, 0.96484,
    0.78516,
)
# The inverted (original) FramePack checkpoint at 25 steps and the 640 bucket, published by
# FramePack-Studio: diffusers_helper/models/mag_cache_ratios.py, MAG_RATIOS_DB["Original"][640][25]
# (their note: calibrated with default settings, seed 31337). The MagCache authors' own inverted demo
# table is not public in a form we could read.
FRAMEPACK_INVERTED_MAG_RATIOS = (
    1.0, 1.30469, 1.22656, 1.05469, 1.02344, 1.03906, 1.02344, 1.03906, 1.05469, 1.02344, 1.03906, 0.99609,
    1.02344, 1.03125, 1.01562, 1.02344, 1.00781, 1.03906, 0.98828, 1.0, 1.0, 0.98828, 0.94531, 0.93359,
    0.78516,
)
SHIPPED = {
    "forward": (FRAMEPACK_F1_MAG_RATIOS, "shipped: Zehong-Ma/MagCache MagCache4FramePack (F1, 25 steps)"),
    "inverted": (FRAMEPACK_INVERTED_MAG_RATIOS, "shipped: FramePack-Studio MAG_RATIOS_DB (Original, 640, 25 steps)"),
}
STORE_FOLDER = Path(".cache") / "step_cache"


def interpolate(ratios, steps: int) -> tuple[float, ...]:
    """The ratio table at ``steps`` steps (nearest neighbour: diffusers' rule, as the reference does)."""
    from diffusers.hooks.mag_cache import nearest_interp

    if len(ratios) == steps:
        return tuple(float(r) for r in ratios)
    return tuple(float(r) for r in nearest_interp(torch.tensor(ratios, dtype=torch.float64), steps))


@dataclass(frozen=True)
class ChosenRatios:
    ratios: tuple[float, ...]
    source: str


def choose(model_mode: str, steps: int, calibrated: dict[int, tuple[float, ...]] | None = None) -> ChosenRatios:
    """Pure: calibrated ratios at this step count, else the calibration nearest in steps, else shipped."""
    if calibrated:
        nearest = min(calibrated, key=lambda n: (abs(n - steps), -n))
        note = "" if nearest == steps else f", interpolated to {steps}"
        return ChosenRatios(interpolate(calibrated[nearest], steps),
                            f"calibrated on this model folder ({nearest} steps{note})")
    table, source = SHIPPED[model_mode]
    note = "" if len(table) == steps else f", interpolated to {steps}"
    return ChosenRatios(interpolate(table, steps), source + note)


def store_path(models_root: Path, fingerprint: str) -> Path:
    return Path(models_root) / STORE_FOLDER / f"{fingerprint}.json"


def load_calibrated(models_root: Path, fingerprint: str | None) -> dict[int, tuple[float, ...]]:
    """Calibrations of this transformer by step count; {} when none (or the file is unreadable)."""
    if not fingerprint:
        return {}
    path = store_path(models_root, fingerprint)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        found = {int(steps): tuple(float(r) for r in entry["ratios"]) for steps, entry in data["by_steps"].items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        logger.warning("ignoring the unreadable MagCache calibration %s", path)
        return {}
    return {steps: ratios for steps, ratios in found.items() if len(ratios) == steps and steps >= 2}


def store_calibrated(models_root: Path, fingerprint: str, ratios, job_id: str) -> Path:
    """Add (or replace) this step count's calibration; other step counts stay."""
    path = store_path(models_root, fingerprint)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data.get("by_steps"), dict):
            raise ValueError
    except (OSError, ValueError, AttributeError):
        data = {"fingerprint": fingerprint, "by_steps": {}}
    data["by_steps"][str(len(ratios))] = {"ratios": [round(float(r), 5) for r in ratios], "job_id": job_id,
                                          "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)
    return path
