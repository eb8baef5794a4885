"""The transformer on ``meta`` and the fp8 storage rule (diffusers' layerwise casting).

Which layers are stored in fp8 and upcast at compute time is decided by diffusers' own
``apply_layerwise_casting``; the hook is diffusers' with one change (see _keep_storage_hook_class).
Nothing here imports diffusers at import time.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from .checkpoint import damaged_error

STORAGES = ("bf16", "fp8", "disk")
FP8_DTYPE = torch.float8_e4m3fn
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # execution order in forward()


def module_bytes(module) -> int:
    return sum(t.numel() * t.dtype.itemsize for t in list(module.parameters()) + list(module.buffers()))


def _model_class():
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    return HunyuanVideoFramepackTransformer3DModel


def _config_of(model_or_config: Any) -> dict:
    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(config, (str, Path)):
        folder = Path(config)
        try:
            return json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise damaged_error(folder, "config.json") from exc
    return dict(config)


def build_meta_model(model_or_config: Any):
    """The transformer with every tensor on the ``meta`` device (no memory) from a config/folder/model."""
    cls = _model_class()
    config = _config_of(model_or_config)
    with torch.device("meta"):
        model = cls.from_config(config)
    return model


def fp8_skip_patterns(model_cls: Any = None) -> tuple[str, ...]:
    """Module-name patterns kept in the compute dtype under fp8 storage.

    The same rule as diffusers' ``ModelMixin.enable_layerwise_casting``: its default patterns (norms,
    patch embedders, the final ``proj_out``), plus the class's ``_keep_in_fp32_modules`` and
    ``_skip_layerwise_casting_patterns`` (x/context embedders, every ``norm`` incl. AdaLN modulation).
    """
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    model_cls = model_cls or _model_class()
    patterns = set(DEFAULT_SKIP_MODULES_PATTERN)
    patterns |= set(getattr(model_cls, "_keep_in_fp32_modules", None) or ())
    patterns |= set(getattr(model_cls, "_skip_layerwise_casting_patterns", None) or ())
    return tuple(sorted(patterns))


def check_storage_args(storage: str, compute_dtype: torch.dtype) -> None:
    if storage not in STORAGES:
        raise ValueError(f"Unknown transformer storage {storage!r}; expected one of {STORAGES}")
    if not compute_dtype.is_floating_point or compute_dtype.itemsize < 2:
        raise ValueError(f"compute_dtype must be float16, bfloat16 or float32, got {compute_dtype}")


def _cast_module_names(model_cls: Any, config: dict, compute_dtype: torch.dtype) -> list[str]:
    """Names of the leaf modules diffusers' layerwise casting hooks (decided on a throwaway meta model)."""
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK

    probe = build_meta_model(config)
    apply_layerwise_casting(probe, storage_dtype=FP8_DTYPE, compute_dtype=compute_dtype,
                            skip_modules_pattern=fp8_skip_patterns(model_cls))
    return [name for name, module in probe.named_modules()
            if getattr(module, "_diffusers_hook", None) is not None
            and module._diffusers_hook.get_hook(_LAYERWISE_CASTING_HOOK) is not None]


def prepare_meta(model, storage: str, compute_dtype: torch.dtype) -> None:
    """Give every meta tensor its storage dtype and attach the compute-time casting hooks.

    Casting hooks are attached to the META model: their initialisation casts the hooked layers to
    fp8, so afterwards each meta tensor's dtype says exactly how that tensor is stored. Which layers
    get a hook is decided by diffusers' own ``apply_layerwise_casting`` (see _cast_module_names); the
    hook is diffusers' LayerwiseCastingHook with one change, see _keep_storage_hook_class.
    """
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK

    # nn.Module.to, not ModelMixin.to: the latter only adds a warning about fp32 modules (there are none).
    torch.nn.Module.to(model, dtype=compute_dtype)
    if storage in ("fp8", "disk"):
        for name in _cast_module_names(type(model), dict(model.config), compute_dtype):
            hook = _keep_storage_hook_class()(FP8_DTYPE, compute_dtype, non_blocking=False)
            HookRegistry.check_if_exists_or_initialize(model.get_submodule(name)).register_hook(
                hook, _LAYERWISE_CASTING_HOOK)


@functools.cache
def _keep_storage_hook_class():
    """The hook class, built on first use so that importing this module does not import diffusers."""
    from diffusers.hooks.layerwise_casting import LayerwiseCastingHook

    class KeepStorageCastingHook(LayerwiseCastingHook):
        """diffusers' layerwise casting, except that the stored tensors are put back after forward.

        diffusers' hook re-casts the computed layer back to fp8 (``module.to(dtype=fp8)``), which
        allocates a fresh copy of every weight on every forward. For "disk" that silently moves the
        whole memory-mapped model into RAM after one forward; for "fp8" on the CPU the churn of
        long-lived allocations fragments the heap (measured on the 13B model: +1.8 GB RssAnon after
        one forward, vs +0.25 GB with this hook; benchmarks/RESULTS-fullsize.md). Keeping the
        original storage tensor gives the same numbers (the fp8 -> compute dtype upcast is exact).
        """

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.stored: dict[str, torch.Tensor] = {}

        def _restore(self, module) -> None:
            for name, data in self.stored.items():
                module._parameters[name].data = data
            self.stored = {}

        def pre_forward(self, module, *args, **kwargs):
            self._restore(module)  # a forward that raised never reached post_forward
            for name, param in module._parameters.items():
                if param is not None and param.dtype == self.storage_dtype:
                    self.stored[name] = param.data
                    param.data = param.data.to(self.compute_dtype, non_blocking=self.non_blocking)
            return args, kwargs

        def post_forward(self, module, output):
            self._restore(module)
            return output

    return KeepStorageCastingHook
