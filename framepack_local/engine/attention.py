"""Which attention kernel the transformer uses, through diffusers' attention dispatcher.

``sdpa`` is PyTorch's scaled_dot_product_attention (diffusers' "native"), always there. ``flash``
(flash-attn 2) and ``sage`` (SageAttention) are optional packages, never in requirements.txt: they
are hard to install on Windows. ``auto`` takes SageAttention, else FlashAttention, when the package
imports and the GPU can run it (both need an NVIDIA GPU of compute capability 8.0 or newer), else SDPA.

FramePack samples one video at a time (batch 1), so diffusers' transformer drops the text padding
instead of building a mask, and the mask-less flash/sage kernels apply.

A backend that cannot be set, or that raises on its first call, is replaced by SDPA with a Notice;
the job goes on (``ActiveAttention``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import Cancelled

logger = logging.getLogger(__name__)

DIFFUSERS_NAMES = {"sdpa": "native", "flash": "flash", "sage": "sage"}
AUTO_ORDER = ("sage", "flash")  # fastest first
MIN_CAPABILITY = (8, 0)
PACKAGES = {"flash": "flash-attn", "sage": "sageattention"}


def unavailable_reasons(device: torch.device) -> dict[str, str | None]:
    """For each optional backend: None when it can run here, else why not (one short clause)."""
    from diffusers.models import attention_dispatch as dispatch

    installed = {"flash": dispatch._CAN_USE_FLASH_ATTN, "sage": dispatch._CAN_USE_SAGE_ATTN}
    reasons: dict[str, str | None] = {}
    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_capability(device)
    for name in AUTO_ORDER:
        if not installed[name]:
            reasons[name] = f"the {PACKAGES[name]} package is not installed"
        elif gpu is None:
            reasons[name] = "it needs an NVIDIA GPU"
        elif gpu < MIN_CAPABILITY:
            reasons[name] = f"this GPU (compute capability {gpu[0]}.{gpu[1]}) is older than 8.0"
        else:
            reasons[name] = None
    return reasons


@dataclass(frozen=True)
class AttentionChoice:
    requested: str
    backend: str  # "sdpa" | "flash" | "sage"
    note: str | None  # why the request was not met, for a Notice


def choose(requested: str, reasons: dict[str, str | None]) -> AttentionChoice:
    """Pure: the backend for a request, given what can run here (``unavailable_reasons``)."""
    if requested == "sdpa":
        return AttentionChoice(requested, "sdpa", None)
    if requested == "auto":
        for name in AUTO_ORDER:
            if reasons.get(name) is None:
                return AttentionChoice(requested, name, None)
        return AttentionChoice(requested, "sdpa", None)  # nothing faster here: not worth a Notice
    why = reasons.get(requested, "it is unknown")
    if why is None:
        return AttentionChoice(requested, requested, None)
    return AttentionChoice(requested, "sdpa",
                           f"{requested} attention is not available ({why}); using PyTorch SDPA instead.")


class ActiveAttention:
    """The chosen backend on one job's transformer, replaced by SDPA if it fails; restored at close()."""

    def __init__(self, transformer, choice: AttentionChoice, on_fallback) -> None:
        self.transformer = transformer
        self.backend = choice.backend
        self.fallback = choice.note
        self._on_fallback = on_fallback  # called with one sentence
        self._proven = self.backend == "sdpa"  # the default path needs no trial
        if choice.note:
            on_fallback(choice.note)
        if self.backend != "sdpa":
            try:
                transformer.set_attention_backend(DIFFUSERS_NAMES[self.backend])
            except Exception as exc:  # noqa: BLE001 - e.g. a kernel that cannot load on this driver
                self._fall_back(exc)

    def call(self, run):
        """run() with the backend; if its first call raises, once more with SDPA."""
        if self._proven:
            return run()
        try:
            out = run()
        except (Cancelled, torch.cuda.OutOfMemoryError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - any kernel failure: SDPA computes the same attention
            self._fall_back(exc)
            return run()
        self._proven = True
        return out

    def _fall_back(self, exc: BaseException) -> None:
        logger.warning("%s attention failed (%s: %s); falling back to SDPA", self.backend, type(exc).__name__, exc)
        failed, self.backend, self._proven = self.backend, "sdpa", True
        self.fallback = f"{failed} attention failed on this GPU ({type(exc).__name__}); using PyTorch SDPA instead."
        self._restore_native()
        self._on_fallback(self.fallback)

    def _restore_native(self) -> None:
        # set_attention_backend also sets diffusers' process-wide active backend: put both back.
        self.transformer.set_attention_backend("native")

    def record(self, requested: str) -> dict:
        return {"requested": requested, "used": self.backend, "fallback": self.fallback}

    def close(self) -> None:
        """The transformer outlives the job (ModelManager keeps it): leave it on the default kernel."""
        if self.backend != "sdpa":
            self._restore_native()
