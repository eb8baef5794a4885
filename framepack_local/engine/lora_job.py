"""A job's LoRAs: found, read and checked before anything is written; kept exactly the same on resume.

The files are read at the start of every job (a few hundred MB at most), and attached to the loaded
transformer as runtime adapters for the sections only (weights/lora_runtime.py), so the transformer
itself stays loaded whatever LoRAs the next job asks for.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InputError
from ..memory.plan import LoraCost, MemoryPlan
from ..params import JobParams
from ..weights.lora import LoadedLora, adapter_bytes, load_lora, lora_folder, resolve_lora_path, sha256_of
from ..weights.lora_runtime import LoraAdapters
from ..weights.model_folder import MODE_PARTS


def _config(params: JobParams) -> dict:
    # check_model_folder has already found the transformer's config readable
    return json.loads((params.models_path / MODE_PARTS[params.mode] / "config.json").read_text(encoding="utf-8"))


def prepare(params: JobParams) -> tuple[JobParams, list[LoadedLora]]:
    """A new job: each LoRA found (as a path, or by name in models/loras/), read and checked; the params
    come back with absolute paths, so job.json names the very files used."""
    if not params.loras:
        return params, []
    config = _config(params)
    resolved = [(str(resolve_lora_path(spec, params.models_path)), weight) for spec, weight in params.loras]
    loras = [load_lora(Path(path), weight, config) for path, weight in resolved]
    return params.replace(loras=tuple(resolved)), loras


def prepare_resumed(params: JobParams, record: dict) -> list[LoadedLora]:
    """A resumed job: the same files, unchanged (their sha256 as recorded), or one sentence."""
    if not params.loras:
        return []
    recorded = {entry.get("path"): entry.get("sha256") for entry in record.get("loras") or ()}
    config = _config(params)
    loras = []
    for path, weight in params.loras:
        file = Path(path)
        moved = lora_folder(params.models_path) / file.name  # the model folder moved (resume --models)
        if not file.is_file() and moved.is_file() and recorded.get(path) == sha256_of(moved):
            file = moved
        if not file.is_file():
            raise InputError(f"The LoRA file {file.name} this job used is missing (it was at {file}); put it "
                             f"back there to resume the job.")
        digest = sha256_of(file)
        if recorded.get(path) not in (None, digest):
            raise InputError(f"The LoRA file {file.name} has changed since the job started (its sha256 differs); "
                             f"put the original back to resume, or start a new job.")
        loras.append(load_lora(file, weight, config, sha256=digest))
    return loras


def cost(loras: list[LoadedLora], dtype: torch.dtype) -> LoraCost | None:
    if not loras:
        return None
    active, largest = adapter_bytes(loras, torch.empty((), dtype=dtype).element_size())
    return LoraCost(sum(lora.file_bytes for lora in loras), active, largest)


def attach(transformer, loras: list[LoadedLora], plan: MemoryPlan, device: torch.device,
           dtype: torch.dtype) -> LoraAdapters:
    """Adapters on the loaded transformer for this job's sections; the files' tensors are let go."""
    adapters = LoraAdapters(transformer, loras, dtype, device, on_device=plan.lora_where == "gpu")
    for lora in loras:
        lora.factors = {}  # combined into the adapters; the plan counts them once from here on
    return adapters
