"""Streaming transformer blocks to the GPU with our block prefetcher (weights/prefetch.py), and undoing it.

Blocks that fit stay resident on the device; the others are computed one at a time from two device
slots, the next block's copy overlapping the current block's compute ("overlapped", CUDA) or queued
behind it on one stream ("synchronous": the fallback when the streaming self-test failed on this GPU).
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

from . import prefetch
from .casting import BLOCK_LISTS, module_bytes

logger = logging.getLogger(__name__)

_PREFETCHER_ATTR = "_fpl_prefetcher"


def _blocks(model) -> list[torch.nn.Module]:
    return [block for list_name in BLOCK_LISTS for block in getattr(model, list_name)]


def apply_streaming(model, onload_device: Any, *, resident_blocks: int = 0, use_stream: bool | None = None,
                    offload_to_disk_path: str | None = None, blocks: list | None = None,
                    trace: list | None = None, calls: prefetch.CudaCalls | None = None) -> dict:
    """Stream the model block by block to ``onload_device``.

    The first ``resident_blocks`` blocks in execution order (dual-stream, then single-stream; or
    ``blocks`` for another model, e.g. a LLaMA's layers) and everything outside the blocks move to the
    device for good; the others stay where they are (RAM or a memory map) and are copied per forward.
    ``use_stream`` (None -> True on CUDA): overlap the copies on a side stream; False: synchronous
    copies on the compute stream. ``offload_to_disk_path`` is accepted for old callers and unused: the
    "disk" storage is already memory-mapped. ``trace`` collects the prefetcher's copy/compute order;
    ``calls`` replaces its CUDA calls (tests).
    Returns a summary dict.
    """
    del offload_to_disk_path
    onload = torch.device(onload_device)
    if use_stream is None:
        use_stream = onload.type == "cuda"
    use_stream = bool(use_stream and (onload.type == "cuda" or calls is not None))
    if _is_streaming(model):
        raise RuntimeError("apply_streaming was already applied to this model; call remove_streaming first")
    all_blocks = list(blocks) if blocks is not None else _blocks(model)
    resident_blocks = max(0, min(int(resident_blocks), len(all_blocks)))
    resident, streamed = all_blocks[:resident_blocks], all_blocks[resident_blocks:]

    inside_streamed = {id(m) for block in streamed for m in block.modules()}
    for module in model.modules():  # non-block tensors and resident blocks: to the device for good
        if id(module) in inside_streamed:
            continue
        for name, param in module._parameters.items():
            if param is not None and param.device != onload:
                param.data = param.data.to(onload)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != onload:
                module._buffers[name] = buffer.to(onload)

    fetcher = prefetch.BlockPrefetcher(streamed, onload, head=all_blocks[0] if all_blocks else None,
                                       overlap=use_stream, trace=trace, calls=calls)
    if streamed:
        prefetch.attach(fetcher)
    setattr(model, _PREFETCHER_ATTR, fetcher)

    summary = {
        "onload_device": str(onload),
        "use_stream": use_stream,
        "copies": "overlapped" if use_stream else "synchronous",
        "resident_blocks": len(resident),
        "streamed_blocks": len(streamed),
        "bytes_per_block": [module_bytes(block) for block in all_blocks],
        "resident_bytes": sum(module_bytes(block) for block in resident),
        "streamed_bytes": sum(module_bytes(block) for block in streamed),
        "nonblock_bytes": module_bytes(model) - sum(module_bytes(block) for block in all_blocks),
        "device_buffer_bytes": fetcher.device_bytes,
        "pinned_bytes": fetcher.pinned_bytes,
    }
    logger.info("Streaming %d blocks (%.2f GB) to %s, %d resident (%.2f GB), %s copies, buffers %.2f GB "
                "device + %.2f GB pinned", len(streamed), summary["streamed_bytes"] / 1e9, onload, len(resident),
                summary["resident_bytes"] / 1e9, summary["copies"], fetcher.device_bytes / 1e9,
                fetcher.pinned_bytes / 1e9)
    return summary


def prefetcher_of(model) -> prefetch.BlockPrefetcher | None:
    return getattr(model, _PREFETCHER_ATTR, None)


def _is_streaming(model) -> bool:
    return prefetcher_of(model) is not None


def _free_device_caches(collect: bool = True) -> None:
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:
            host_empty()  # the pinned staging buffers


def _detach(model) -> None:
    fetcher = prefetcher_of(model)
    if fetcher is not None:
        fetcher.close()
        prefetch.detach(model)
        delattr(model, _PREFETCHER_ATTR)


def remove_streaming(model) -> None:
    """Undo ``apply_streaming``: remove the hooks and bring every tensor back to the CPU.

    Streamed blocks are already on the CPU between forwards (their original, possibly memory-mapped,
    tensors); resident blocks and the rest are copied back (into RAM, even for "disk").
    """
    _detach(model)
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None and param.device.type != "cpu":
                param.data = param.data.to("cpu")
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "cpu":
                module._buffers[key] = buffer.to("cpu")
    _free_device_caches(collect=torch.cuda.is_available())  # the collection only matters for device memory


def unload(model) -> None:
    """Free the model's memory (RAM, GPU, memory maps): hooks off, every tensor back to ``meta``.

    The object stays a valid (empty) module so stale references cannot hold gigabytes; load again
    with ``load_transformer``.
    """
    _detach(model)
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None:
                module._parameters[key] = torch.nn.Parameter(torch.empty_like(param, device="meta"),
                                                             requires_grad=False)
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = torch.empty_like(buffer, device="meta")
    _free_device_caches()
