"""The page's LoRA picker: a multi-select of the files in models/loras/, and one weight slider per pick."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..params import LORA_WEIGHT_RANGE
from ..weights.lora import list_lora_files, lora_folder

LORA_SLOTS = 4  # weight sliders in the page; the command line and the API take up to params.MAX_LORAS
LORA_FIELDS = ("lora_files",) + tuple(f"lora_weight_{i}" for i in range(1, LORA_SLOTS + 1))
LORA_HELP = ("LoRA files from the loras folder inside the model folder (.safetensors: HunyuanVideo or FramePack "
             "LoRAs in diffusers, original or kohya/musubi layout). Each gets a weight from -2 to 2. Changing "
             "LoRAs between jobs does not reload the model.")


def lora_choices(models_dir: Path) -> list[str]:
    return list_lora_files(models_dir)


def _picked(value: Any) -> list[str]:
    if not value:
        return []
    return [str(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if v]


def slider_updates(picked: Any) -> list[dict]:
    """(visible, label) of each weight slider for the files picked, in pick order."""
    names = _picked(picked)
    return [{"visible": i < len(names), "label": f"Weight of {Path(names[i]).name}" if i < len(names) else "Weight"}
            for i in range(LORA_SLOTS)]


def rows_to_loras(values: dict, models_dir: Path) -> tuple:
    """Picked files and their sliders -> JobParams.loras; names are inside models/loras/, paths stay paths."""
    names = _picked(values.get("lora_files"))
    if len(names) > LORA_SLOTS:
        raise InputError(f"The page takes at most {LORA_SLOTS} LoRAs at once; remove {len(names) - LORA_SLOTS}, or "
                         f"use the command line (--lora, up to 16).")
    lo, hi = LORA_WEIGHT_RANGE
    loras = []
    for i, name in enumerate(names, 1):
        raw = values.get(f"lora_weight_{i}")
        try:
            weight = 1.0 if raw is None or raw == "" else float(raw)
        except (TypeError, ValueError):
            raise InputError(f"The weight of the LoRA {Path(name).name} must be a number from {lo:g} to {hi:g}.") from None
        if not math.isfinite(weight):
            raise InputError(f"The weight of the LoRA {Path(name).name} must be a number from {lo:g} to {hi:g}.")
        path = Path(name) if Path(name).is_absolute() else lora_folder(models_dir) / name
        loras.append((str(path), weight))
    return tuple(loras)


def loras_to_rows(params: dict, models_dir: Path | None) -> dict:
    """A job record's loras -> the picker's value and the sliders (names for files in models/loras/)."""
    folder = lora_folder(models_dir).resolve() if models_dir is not None else None
    picked, out = [], {}
    for path, weight in list(params.get("loras") or ())[:LORA_SLOTS]:
        file = Path(path)
        try:
            name = file.resolve().relative_to(folder).as_posix() if folder is not None else str(file)
        except ValueError:
            name = str(file)  # a file given by path on the command line: kept as that path
        picked.append(name)
        out[f"lora_weight_{len(picked)}"] = float(weight)
    out["lora_files"] = picked
    for i in range(len(picked) + 1, LORA_SLOTS + 1):
        out[f"lora_weight_{i}"] = 1.0
    return out
