"""Step cache: skip transformer evaluations whose output barely changes, with diffusers' own hooks.

Modes (DESIGN.md section 3, "Step cache"):
- ``"mag"``: MagCache (diffusers ``MagCacheConfig``). Its skip decisions depend only on a per-checkpoint
  table of magnitude ratios, so the schedule is fixed before the job runs (``planned_computed_steps``).
- ``"first-block"``: diffusers' FirstBlockCache: the first block always runs, the rest are skipped
  while its residual changes by less than the threshold (data-dependent, no table needed).
- ``"off"``: nothing is attached; the engine is exactly what it was without a cache.

diffusers' FramePack pipeline never opens a ``cache_context``; the engine does, one per section and
per guidance pass (the positive and the negative CFG pass are separate trajectories), and resets the
cache state at every section (each section is its own denoising run) and detaches it after every job.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..params import CACHE_DEFAULT_THRESHOLD, CACHE_MODES
from . import mag_ratios

# Defaults: the MagCache authors' FramePack demo (threshold 0.1, K = 2, retention 0.2); FirstBlockCache
# uses diffusers' default threshold.
DEFAULT_THRESHOLD = CACHE_DEFAULT_THRESHOLD
DEFAULT_MAX_SKIP = 2
DEFAULT_RETENTION = 0.2
# The internal mode of a calibration run (``Engine.calibrate_cache``): diffusers' MagCache measures the
# ratios and never skips. Not a user choice, so not in CACHE_MODES.
CALIBRATE = "calibrate"


@dataclass(frozen=True)
class StepCachePlan:
    """What a job's transformer gets: the diffusers config (None when off) and what to record."""

    mode: str
    threshold: float | None
    max_skip_steps: int
    retention_ratio: float
    mag_ratios: tuple[float, ...] | None
    ratios_source: str | None

    def record(self) -> dict:
        return {"mode": self.mode, "threshold": self.threshold, "max_skip_steps": self.max_skip_steps,
                "retention_ratio": self.retention_ratio, "ratios_source": self.ratios_source,
                "mag_ratios": list(self.mag_ratios) if self.mag_ratios is not None else None}


def plan_step_cache(mode: str, model_mode: str, steps: int, threshold: float | None = None,
                    max_skip_steps: int = DEFAULT_MAX_SKIP, retention_ratio: float = DEFAULT_RETENTION,
                    calibrated: dict | None = None, recorded: dict | None = None) -> StepCachePlan:
    """Pure: the cache settings for a job; InputError with one sentence when they cannot work.

    ``calibrated`` are this model folder's calibrations by step count (mag_ratios.load_calibrated);
    ``recorded`` is a resumed job's step_cache record, whose ratios win so the result stays bit-identical.
    """
    if mode == CALIBRATE:
        return StepCachePlan(CALIBRATE, None, 0, 0.0, None, None)
    if mode not in CACHE_MODES:
        raise InputError(f"The step cache must be one of {', '.join(CACHE_MODES)}, not {mode!r}.")
    if mode == "off":
        return StepCachePlan("off", None, 0, 0.0, None, None)
    threshold = DEFAULT_THRESHOLD[mode] if threshold is None else float(threshold)
    ratios = source = None
    if mode == "mag":
        if recorded and recorded.get("mode") == "mag" and len(recorded.get("mag_ratios") or ()) == steps:
            ratios, source = tuple(float(r) for r in recorded["mag_ratios"]), recorded.get("ratios_source")
        else:
            chosen = mag_ratios.choose(model_mode, steps, calibrated)
            ratios, source = chosen.ratios, chosen.source
    return StepCachePlan(mode, threshold, int(max_skip_steps), float(retention_ratio), ratios, source)


def planned_computed_steps(plan: StepCachePlan, steps: int) -> list[bool]:
    """MagCache's decision for each step of one trajectory (True = the blocks run), as diffusers decides it.

    diffusers' MagCacheHeadHook: no skipping before ``int(retention * steps + 0.5)``; after it the ratios
    accumulate, and a step is skipped while the accumulated error stays within the threshold and at
    most ``max_skip_steps`` steps in a row were accumulated; otherwise it computes and the accumulators
    reset. Step 0 always computes (there is no residual to reuse yet). "off" computes every step, and
    so does this plan for "first-block", whose skips depend on the data and cannot be known ahead.
    """
    if plan.mode != "mag":
        return [True] * steps
    # The hook holds the table as a float32 tensor and accumulates in float32: so does this copy.
    table = torch.tensor(plan.mag_ratios, dtype=torch.float32)
    computed = []
    retention_step = int(plan.retention_ratio * steps + 0.5)
    ratio, err, accumulated = 1.0, 0.0, 0
    for step in range(steps):
        compute = True
        if step >= retention_step:
            ratio = ratio * (table[step] if step < len(table) else 1.0)
            accumulated += 1
            err += abs(1.0 - ratio)
            if step > 0 and bool(err <= plan.threshold) and accumulated <= plan.max_skip_steps:
                compute = False
            else:
                ratio, err, accumulated = 1.0, 0.0, 0
        computed.append(compute)
    return computed


def _config(plan: StepCachePlan, steps: int):
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

    if plan.mode == "mag":
        return MagCacheConfig(threshold=plan.threshold, max_skip_steps=plan.max_skip_steps,
                              retention_ratio=plan.retention_ratio, num_inference_steps=steps,
                              mag_ratios=list(plan.mag_ratios))
    if plan.mode == CALIBRATE:
        return MagCacheConfig(calibrate=True, num_inference_steps=steps)
    return FirstBlockCacheConfig(threshold=plan.threshold)


class AttachedCache:
    """The cache hooks on one job's transformer, and a count of the steps that ran its blocks.

    The count comes from a pre-hook inside the last block, not on the block itself: a skipped step still
    calls the block module, whose cache hook then returns without running anything below it. Only the
    positive pass is counted (``counting`` is switched off around the negative CFG pass).
    """

    def __init__(self, transformer, plan: StepCachePlan, steps: int) -> None:
        self.transformer = transformer
        self.plan = plan
        self.counting = True
        self._count = 0
        self._calibration: list | None = None
        last_block = transformer.single_transformer_blocks[-1]
        self._handle = next(last_block.children()).register_forward_pre_hook(self._seen)
        if plan.mode != "off":
            transformer.enable_cache(_config(plan, steps))

    def _seen(self, *_args) -> None:
        if self.counting:
            self._count += 1

    def new_section(self) -> None:
        """Every section is its own denoising trajectory: forget the last one's residuals and count anew."""
        self._count = 0
        self._calibration = None
        if self.plan.mode != "off":
            self.transformer._reset_stateful_cache()

    def steps_computed(self) -> int:
        return self._count

    def pass_context(self, name: str):
        """The cache context of one guidance pass ("cond" or "uncond"): their states never mix."""
        if self.plan.mode == "off":
            return contextlib.nullcontext()
        if self.plan.mode == CALIBRATE and name == "cond":
            return self._calibrating(name)
        return self.transformer.cache_context(name)

    @contextlib.contextmanager
    def _calibrating(self, name: str):
        # diffusers prints "copy these values" to stdout; the engine stores them itself, and the CLI's
        # stdout carries only the result path.
        with self.transformer.cache_context(name), contextlib.redirect_stdout(io.StringIO()):
            yield
        # diffusers appends each step's ratio to one list and swaps in a fresh list after the last
        # step; holding the list seen after step 1 keeps the whole trajectory's ratios.
        if self._calibration is None:
            self._calibration = _mag_state(self.transformer, name).calibration_ratios

    def calibration_ratios(self) -> list[float] | None:
        """The ratios diffusers measured over the section just sampled (calibration runs only)."""
        return None if self._calibration is None else [float(r) for r in self._calibration]

    def close(self) -> None:
        """Detach everything, so the next job (maybe with other settings) starts from a clean model."""
        self._handle.remove()
        if self.plan.mode != "off":
            self.transformer.disable_cache()


def _mag_state(transformer, context_name: str):
    """diffusers' MagCache state of one context (the tail block's hook holds the shared state manager)."""
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK

    registry = transformer.single_transformer_blocks[-1]._diffusers_hook
    return registry.get_hook(_MAG_CACHE_BLOCK_HOOK).state_manager._state_cache[context_name]
