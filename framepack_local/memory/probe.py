"""What the planner is given: the machine's facts (free VRAM, RAM, disk) and the models' sizes.

`probe()` is the only function of the memory layer that looks at the machine; sizes come from
safetensors headers and configs built on the meta device, never from reading weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..weights.checkpoint import damaged_error
from ..weights.safetensors_io import BadSafetensorsFile, read_safetensors_header
from ..weights.storage import transformer_block_bytes, transformer_nonblock_bytes
from .plan import ModelSizes, SystemFacts, TransformerSize


def transformer_size_from_config(config: dict) -> TransformerSize:
    """Sizes per storage from the transformer's config alone (built on the meta device, no weights)."""
    return TransformerSize(
        blocks=tuple(transformer_block_bytes(config, "bf16")), other=transformer_nonblock_bytes(config, "bf16"),
        blocks_fp8=tuple(transformer_block_bytes(config, "fp8")), other_fp8=transformer_nonblock_bytes(config, "fp8"),
        hidden=config.get("num_attention_heads", 24) * config.get("attention_head_dim", 128),
    )


def transformer_size_from_module(model) -> TransformerSize:
    return transformer_size_from_config(dict(model.config))


def transformer_size_from_folder(folder: Path) -> TransformerSize:
    return transformer_size_from_config(json.loads((Path(folder) / "config.json").read_text()))


def folder_tensor_sizes(folder: Path) -> dict[str, int]:
    """Tensor name -> bytes at 2 bytes per element, read from safetensors headers only."""
    sizes = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            entries = read_safetensors_header(f)
        except BadSafetensorsFile as exc:
            raise damaged_error(Path(folder), f.name) from exc
        for name, entry in entries.items():
            sizes[name] = entry.numel * 2
    return sizes


def model_sizes_from_folder(root: Path, mode: str) -> ModelSizes:
    """Sizes of a model folder's parts from their safetensors headers (no weights are read)."""
    part = "transformer" if mode == "inverted" else "transformer_f1"
    total = lambda name: sum(folder_tensor_sizes(Path(root) / name).values())  # noqa: E731
    return ModelSizes(
        transformer=transformer_size_from_folder(Path(root) / part),
        text_encoder=total("text_encoder"), text_encoder_2=total("text_encoder_2"),
        image_encoder=total("image_encoder"), vae=total("vae"),
    )


def probe(path_for_disk: Path | str = ".") -> SystemFacts:
    import importlib.util

    import psutil
    import torch

    vm = psutil.virtual_memory()
    cuda = torch.cuda.is_available()
    free = total = 0
    name = None
    if cuda:
        free, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name()
    probe_path = Path(path_for_disk)
    while not probe_path.exists() and probe_path != probe_path.parent:
        probe_path = probe_path.parent
    return SystemFacts(
        cuda=cuda, gpu_name=name, vram_total=total, vram_free=free, ram_total=vm.total,
        ram_available=vm.available, disk_free=shutil.disk_usage(probe_path).free,
        bitsandbytes=cuda and importlib.util.find_spec("bitsandbytes") is not None,
    )
