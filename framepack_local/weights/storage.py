"""Load the FramePack transformer in a chosen weight storage, and size its blocks for the planner.

The memory plan (DESIGN.md section 4) picks one storage by name:

- ``"bf16"``: every weight in the compute dtype (bf16 on a GPU; the CPU tests use float32), lossless,
  and exactly the tensors diffusers' ``from_pretrained`` gives: where no cast is needed safetensors
  hands out zero-copy views of its memory map of the shard (file pages), otherwise RAM copies.
- ``"fp8"``: the layers diffusers' layerwise casting casts are stored as float8_e4m3fn and upcast one
  layer at a time at compute time (diffusers' casting hook, minus its re-cast after each layer);
  norms, embedders and AdaLN modulation stay in the compute dtype.
  All of it in anonymous RAM: about 16.6 GB instead of 25.7 GB for the 13B checkpoint.
- ``"disk"``: the same fp8 numbers, but memory-mapped from a converted copy on disk instead of held in
  anonymous RAM, so the OS can drop and re-read the pages under memory pressure (16 GB laptops).

All three build the model on the ``meta`` device and fill it tensor by tensor straight from the
safetensors shards, converting each tensor while reading: RAM never holds the bf16 checkpoint when
the storage is fp8 (checkpoint.py reads, casting.py decides dtypes, fp8_cache.py keeps the "disk"
copy). ``streaming.apply_streaming`` then moves blocks to the GPU one at a time. Nothing here runs at
import; diffusers is imported inside functions.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from .casting import BLOCK_LISTS, STORAGES, build_meta_model, check_storage_args, module_bytes, prepare_meta
from .checkpoint import assign_tensor, finish_loading, match_sources, meta_targets, owned, read_converted, source_tensors
from .fp8_cache import ensure_fp8_cache, map_fp8_cache

logger = logging.getLogger(__name__)

__all__ = ["STORAGES", "load_transformer", "transformer_block_bytes", "transformer_nonblock_bytes"]


def load_transformer(folder: Path, storage: str, compute_dtype: torch.dtype, cache_dir: Path | None = None,
                     *, keep_mapped: bool = False):
    """Load a HunyuanVideoFramepackTransformer3DModel from ``folder`` in ``storage`` (see STORAGES).

    Weights end up on the CPU (streaming to a GPU is ``apply_streaming``'s job). ``cache_dir`` is
    where "disk" keeps its fp8 copy; by default ``<models>/.cache`` next to the transformer folder.
    ``keep_mapped`` (for "fp8" when computing on a GPU): tensors that need no cast (the modulation
    linears, norms and embedders kept in bf16, about 7 GB) stay zero-copy views of the checkpoint's
    file map: page cache the kernel can drop and re-read, not anonymous RAM. Only the fp8 weights are
    owned. CPU compute keeps them owned and aligned, which bit-equality with "disk" relies on.
    Broken or missing files raise ModelFolderError.
    """
    folder = Path(folder)
    check_storage_args(storage, compute_dtype)
    started = time.perf_counter()
    sources = source_tensors(folder)
    model = build_meta_model(folder)
    prepare_meta(model, storage, compute_dtype)
    targets = meta_targets(model)
    match_sources(folder, targets, sources)

    if storage == "disk":
        cache = ensure_fp8_cache(folder, compute_dtype, cache_dir, _sources=sources, _targets=targets)
        map_fp8_cache(model, cache, targets)
    else:
        for name, tensor in read_converted(folder, sources, targets):
            # "bf16" keeps safetensors' tensors exactly as diffusers' from_pretrained does (zero-copy views
            # of the shard's map where no cast is needed); "fp8" owns every byte (see owned) unless
            # keep_mapped lets the uncast ones stay views.
            uncast = tensor.dtype == sources[name][1].dtype
            assign_tensor(model, name, tensor if storage == "bf16" or (keep_mapped and uncast) else owned(tensor))
    finish_loading(model)
    logger.info("Loaded %s as %s (compute %s) in %.1f s", folder, storage, compute_dtype, time.perf_counter() - started)
    return model


def _storage_meta_model(model_or_config: Any, storage: str, compute_dtype: torch.dtype):
    check_storage_args(storage, compute_dtype)
    model = build_meta_model(model_or_config)
    if storage == "bf16":
        torch.nn.Module.to(model, dtype=compute_dtype)
    else:  # "disk" stores (and streams) exactly the fp8 layout
        prepare_meta(model, "fp8", compute_dtype)
    return model


def transformer_block_bytes(model_or_config: Any, storage: str, compute_dtype: torch.dtype = torch.bfloat16) -> list[int]:
    """Bytes of each block (dual-stream blocks, then single-stream blocks: execution order) in ``storage``.

    Works from a config dict, a model folder or a model (its config; no weights are touched).
    """
    model = _storage_meta_model(model_or_config, storage, compute_dtype)
    return [module_bytes(block) for list_name in BLOCK_LISTS for block in getattr(model, list_name)]


def transformer_nonblock_bytes(model_or_config: Any, storage: str, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of everything outside the blocks (embedders, token refiner, output head) in ``storage``."""
    model = _storage_meta_model(model_or_config, storage, compute_dtype)
    blocks = sum(module_bytes(getattr(model, list_name)) for list_name in BLOCK_LISTS)
    return module_bytes(model) - blocks
