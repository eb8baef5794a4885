"""LoRAs as runtime adapters: a forward hook on each adapted Linear adds ``sum_i w_i * B_i (A_i x)``.

Why hooks and not PEFT's injected layers or merged weights (README "LoRA", benchmarks/bench_lora.py):

- The factors live outside the model's parameters, so nothing that moves weights has to know about
  them: fp8 layerwise casting (the hook sees the layer's input and output, never its fp8 weight),
  "disk" memory maps, and block streaming, whose group offloading snapshots each block's tensors
  when it is applied (diffusers keeps a pinned copy per parameter; a PEFT layer injected later is
  not in it, and PEFT casts its own factors to the base layer's fp8 dtype, which fails on the CPU).
- Switching LoRAs between jobs is dropping hooks and adding others: the 13B weights are never
  re-read, re-cast or re-merged, and with no LoRA active the model is exactly the plain one.
- The cost is two thin matmuls per adapted layer: rank x (in + out) against in x out multiply-adds,
  about 2 % of a step at rank 32 on the 13B model (lora_flops_fraction).

All LoRAs of one layer are concatenated into one (down, up) pair, the weights folded into ``up`` in
float32 before the cast to the compute dtype: one pair of matmuls per layer however many LoRAs.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from .lora import LoadedLora

logger = logging.getLogger(__name__)

BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


def combine(loras: list[LoadedLora], dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (down (R, in), up (out, R))} over every LoRA with a weight other than 0, weight and scale in
    ``up``. One layer at a time: the float32 temporaries never exceed one layer's."""
    by_module: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for lora in loras:
        if lora.weight == 0:
            continue
        for module, (down, up, scale) in lora.factors.items():
            by_module.setdefault(module, []).append((down, up, lora.weight * scale))
    combined = {}
    for module, parts in by_module.items():
        # copies, not views: safetensors hands out views of the file's memory map, which a user replacing
        # the file mid-job must not be able to pull from under the adapters
        downs = [d.to(dtype, copy=True) for d, _, _ in parts]
        ups = [(u.float() * s).to(dtype) for _, u, s in parts]
        # one LoRA (the usual case): no concatenation copy
        down = downs[0] if len(downs) == 1 else torch.cat(downs)
        up = ups[0] if len(ups) == 1 else torch.cat(ups, dim=1)
        combined[module] = (down.contiguous(), up.contiguous())
    return combined


class LoraAdapters:
    """The active LoRAs of one transformer, for one job; ``close()`` leaves the plain model behind."""

    def __init__(self, model: torch.nn.Module, loras: list[LoadedLora], dtype: torch.dtype,
                 device: torch.device | str = "cpu", on_device: bool = False) -> None:
        device = torch.device(device)
        self.factors = combine(loras, dtype)
        if device.type == "cuda":
            # On the card when the plan has room; otherwise pinned, so each use is an async copy.
            move = (lambda t: t.to(device)) if on_device else (lambda t: t.pin_memory())
            self.factors = {m: (move(d), move(u)) for m, (d, u) in self.factors.items()}
        self._handles = [model.get_submodule(module).register_forward_hook(functools.partial(self._add, module))
                         for module in self.factors]
        if self._handles:
            logger.info("LoRA adapters on %d layers (%.1f MB, %s)", len(self._handles), self.bytes / 1e6,
                        "on the GPU" if on_device and device.type == "cuda" else "in RAM")

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.factors.values() for t in pair)

    @property
    def layers(self) -> int:
        return len(self._handles)

    def _add(self, module: str, _layer, args, output):
        x = args[0]
        down, up = self.factors[module]
        if down.device != x.device or down.dtype != x.dtype:
            down = down.to(x.device, x.dtype, non_blocking=True)
            up = up.to(x.device, x.dtype, non_blocking=True)
        return output + F.linear(F.linear(x, down), up)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.factors = {}

    def __enter__(self) -> "LoraAdapters":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def lora_flops_fraction(linears: dict[str, tuple[int, int]], rank: int, modules=None) -> float:
    """Extra multiply-adds of rank-``rank`` adapters on ``modules`` (default: every block Linear), as a
    share of those layers' own: rank (in + out) / (in out) per token, weighted by layer size."""
    modules = [m for m in (modules or linears) if m in linears and m.startswith(BLOCK_PREFIXES)]
    base = sum(linears[m][0] * linears[m][1] for m in modules)
    extra = sum(rank * (linears[m][0] + linears[m][1]) for m in modules)
    return extra / base if base else 0.0
