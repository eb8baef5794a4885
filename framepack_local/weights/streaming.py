"""Streaming transformer blocks to the GPU with diffusers' group offloading, and undoing it.

Blocks that fit stay resident; the others are onloaded one block per group, the next block's copy on
a side stream while the current block computes (CUDA only).
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import torch

from .casting import BLOCK_LISTS, module_bytes

logger = logging.getLogger(__name__)

_GROUP_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")


def apply_streaming(model, onload_device: Any, *, resident_blocks: int = 0, use_stream: bool | None = None,
                    offload_to_disk_path: str | None = None) -> dict:
    """Stream the transformer block by block to ``onload_device`` with diffusers' group offloading.

    The first ``resident_blocks`` blocks in execution order (dual-stream, then single-stream) move to
    the device for good ("blocks that fit stay resident"); the others are onloaded one block per group.
    On CUDA (``use_stream`` None -> True) the next block's copy runs on a side stream while the current
    block computes (record_stream; low_cpu_mem_usage pins one block at a time instead of the whole
    model). Returns a summary dict.
    """
    from diffusers.hooks import apply_group_offloading

    onload = torch.device(onload_device)
    if use_stream is None:
        use_stream = onload.type == "cuda"
    blocks = [(list_name, i, block) for list_name in BLOCK_LISTS for i, block in enumerate(getattr(model, list_name))]
    resident_blocks = max(0, min(int(resident_blocks), len(blocks)))
    resident = blocks[:resident_blocks]
    streamed = blocks[resident_blocks:]
    if _is_streaming(model):
        raise RuntimeError("apply_streaming was already applied to this model; call remove_streaming first")
    if onload.type == "cuda" and not use_stream and any(_is_mapped(p) for p in model.parameters()):
        logger.warning("Streaming memory-mapped weights without a CUDA stream copies them into RAM on offload")

    if offload_to_disk_path is not None:
        # diffusers names group files by their index in the list it sees; keep one folder per split
        # so files written for one resident count are never read back for another.
        offload_to_disk_path = str(Path(offload_to_disk_path) / f"resident-{resident_blocks}")

    # diffusers groups every child ModuleList; hide the resident head while it builds the groups, so
    # only the tail is grouped (the hooks stay on the block modules when the full lists come back).
    full_lists = {list_name: getattr(model, list_name) for list_name in BLOCK_LISTS}
    try:
        for list_name, full in full_lists.items():
            skip = sum(1 for name, _, _ in resident if name == list_name)
            setattr(model, list_name, torch.nn.ModuleList(list(full)[skip:]))
        apply_group_offloading(
            model,
            onload_device=onload,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            non_blocking=use_stream,
            use_stream=use_stream,
            record_stream=use_stream,
            low_cpu_mem_usage=use_stream,
            offload_to_disk_path=offload_to_disk_path,
        )
    finally:
        for list_name, full in full_lists.items():
            setattr(model, list_name, full)
    for _, _, block in resident:
        block.to(onload)

    summary = {
        "onload_device": str(onload),
        "use_stream": use_stream,
        "resident_blocks": len(resident),
        "streamed_blocks": len(streamed),
        "bytes_per_block": [module_bytes(block) for _, _, block in blocks],
        "resident_bytes": sum(module_bytes(block) for _, _, block in resident),
        "streamed_bytes": sum(module_bytes(block) for _, _, block in streamed),
        "nonblock_bytes": module_bytes(model) - sum(module_bytes(block) for _, _, block in blocks),
    }
    logger.info("Streaming %d blocks (%.2f GB) to %s, %d resident (%.2f GB), stream=%s",
                len(streamed), summary["streamed_bytes"] / 1e9, onload, len(resident),
                summary["resident_bytes"] / 1e9, use_stream)
    return summary


def _is_mapped(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and not tensor.untyped_storage().resizable()


def _is_streaming(model) -> bool:
    return any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook("group_offloading")
               for m in model.modules())


def _free_device_caches() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:
            host_empty()  # pinned staging buffers of the streamed blocks


def remove_streaming(model) -> None:
    """Undo ``apply_streaming``: remove the group offloading hooks and bring every tensor back to the CPU.

    Streamed blocks are already on the CPU between forwards (their original, possibly memory-mapped,
    tensors); resident blocks and anything onloaded are copied back (into RAM, even for "disk").
    """
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(model)
    for name in _GROUP_HOOKS:
        registry.remove_hook(name, recurse=True)
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None and param.device.type != "cpu":
                param.data = param.data.to("cpu")
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "cpu":
                module._buffers[key] = buffer.to("cpu")
    _free_device_caches()


def unload(model) -> None:
    """Free the model's memory (RAM, GPU, memory maps): hooks off, every tensor back to ``meta``.

    The object stays a valid (empty) module so stale references cannot hold gigabytes; load again
    with ``load_transformer``.
    """
    from diffusers.hooks import HookRegistry

    if getattr(model, "_diffusers_hook", None) is not None:
        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in _GROUP_HOOKS:  # these hold the CPU copies of every streamed block
            registry.remove_hook(name, recurse=True)
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None:
                module._parameters[key] = torch.nn.Parameter(torch.empty_like(param, device="meta"),
                                                             requires_grad=False)
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = torch.empty_like(buffer, device="meta")
    _free_device_caches()
