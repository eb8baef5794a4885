"""The streaming self-test: streamed blocks must give bit-for-bit the resident model's output on this GPU.

``streaming_selftest`` builds a few blocks of the real 13B block config with random weights, writes
them as a checkpoint, loads it in each storage (bf16, fp8, disk) through the real loading code, and
runs one small forward resident and two streamed (the second reuses the slots). Same kernels, same
inputs: the outputs must be equal, not close. The verdict is cached per GPU + driver + torch +
diffusers version (and the prefetcher's version) in ``models/.cache/streaming_selftest.json``; a
failed (or crashed) test makes the engine copy blocks synchronously on one stream
(``streaming_decision``), which the plan table, a Notice and job.json say.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..weights.casting import BLOCK_LISTS, STORAGES

logger = logging.getLogger(__name__)

SELFTEST_VERSION = 1  # bump when weights/prefetch.py changes: old verdicts then no longer apply
CACHE_FILE = "streaming_selftest.json"
SYNC_REASON = ("streamed blocks are copied synchronously: the streaming self-test did not see the overlapped "
               "copies give the resident output on this GPU ({why})")


@dataclass(frozen=True)
class Verdict:
    passed: bool
    fingerprint: str
    storages: dict = field(default_factory=dict)  # storage -> {"equal": bool, "max_abs_diff": float}
    seconds: float = 0.0
    error: str | None = None
    checked_at: str = ""

    def record(self) -> dict:
        return asdict(self)

    @property
    def why(self) -> str:
        if self.error:
            return f"it failed to run: {self.error}"
        bad = [f"{name} off by {r['max_abs_diff']:.3g}" for name, r in self.storages.items() if not r["equal"]]
        return "; ".join(bad) or "no storage was compared"


# ---- the cache (per machine fingerprint)


def fingerprint(device: torch.device) -> str:
    """GPU name + compute capability, driver, torch (+ its CUDA), diffusers, this test's version."""
    import diffusers

    parts = [f"selftest{SELFTEST_VERSION}", f"torch {torch.__version__}", f"diffusers {diffusers.__version__}"]
    if device.type == "cuda":
        from .gpu_check import read_nvidia_smi

        smi = read_nvidia_smi()
        major, minor = torch.cuda.get_device_capability(device)
        parts += [torch.cuda.get_device_name(device), f"sm_{major}{minor}", f"cuda {torch.version.cuda}",
                  f"driver {smi.driver if smi else '?'}"]
    else:
        parts.append(f"cpu {device}")
    return " | ".join(parts)


def load_cached(cache_dir: Path, key: str) -> Verdict | None:
    try:
        entries = json.loads((Path(cache_dir) / CACHE_FILE).read_text(encoding="utf-8")).get("verdicts", {})
        entry = entries.get(key)
        return Verdict(**entry) if entry else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # unreadable or from another version: test again


def save_cached(cache_dir: Path, verdict: Verdict) -> None:
    from ..files import atomic_write_json

    path = Path(cache_dir) / CACHE_FILE
    try:
        entries = json.loads(path.read_text(encoding="utf-8")).get("verdicts", {})
    except (OSError, ValueError, AttributeError):
        entries = {}
    entries[verdict.fingerprint] = verdict.record()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"verdicts": entries})


# ---- the test


def selftest_config(dual: int = 2, single: int = 2) -> dict:
    """The real 13B transformer config with only a few blocks (and one refiner layer)."""
    from ..weights.model_folder import FRAMEPACK_TRANSFORMER_CONFIG

    return dict(FRAMEPACK_TRANSFORMER_CONFIG, num_layers=dual, num_single_layers=single, num_refiner_layers=1)


def write_random_checkpoint(folder: Path, config: dict, seed: int = 0, device: str = "cpu") -> Path:
    """A bf16 random-weight checkpoint of ``config``: N(0, 0.02), norm scales 1, one shard per block.
    ``device``: where the numbers are drawn (a GPU draws the 1.2 billion of the self-test in a moment)."""
    from safetensors.torch import save_file

    from ..weights.casting import build_meta_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = build_meta_model(config)
    (folder / "config.json").write_text(json.dumps(dict(meta.config)), encoding="utf-8")
    g = torch.Generator(device).manual_seed(seed)
    groups = [("", None)] + [(f"{ln}.{i}.", b) for ln in BLOCK_LISTS for i, b in enumerate(getattr(meta, ln))]
    weight_map = {}
    for k, (prefix, module) in enumerate(groups):
        named = ([(n, t) for n, t in meta.named_parameters() if not n.startswith(BLOCK_LISTS)] if module is None
                 else [(prefix + n, t) for n, t in module.named_parameters()])
        tensors = {}
        for name, t in named:
            norm_scale = "norm" in name and name.endswith("weight") and t.dim() == 1
            drawn = torch.ones(t.shape) if norm_scale else torch.randn(t.shape, generator=g, device=device) * 0.02
            tensors[name] = drawn.to(torch.bfloat16).cpu()
        shard = f"diffusion_pytorch_model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(folder / shard))
        weight_map.update({n: shard for n in tensors})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8")
    return folder


def selftest_inputs(config: dict, device: torch.device, dtype: torch.dtype, h: int = 8, w: int = 8,
                    seed: int = 0) -> dict:
    """One forward's kwargs in the engine's packed layout at a small token count (window 1)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    c = config["in_channels"]
    return dict(
        hidden_states=r(1, c, 1, h, w), timestep=torch.tensor([700.0], device=device),
        encoder_hidden_states=r(1, 16, config["text_embed_dim"]),
        encoder_attention_mask=torch.tensor([[1] * 10 + [0] * 6], device=device),
        pooled_projections=r(1, config["pooled_projection_dim"]), image_embeds=r(1, 8, config["image_proj_dim"]),
        indices_latents=torch.arange(20, 21, device=device), guidance=torch.tensor([10_000.0], device=device),
        latents_clean=r(1, c, 2, h, w), indices_latents_clean=torch.tensor([0, 19], device=device),
        latents_history_2x=r(1, c, 2, h, w), indices_latents_history_2x=torch.tensor([17, 18], device=device),
        latents_history_4x=r(1, c, 16, h, w), indices_latents_history_4x=torch.arange(1, 17, device=device),
        return_dict=False,
    )


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def streaming_selftest(device, work_dir: Path, *, config: dict | None = None, storages=STORAGES,
                       compare: Callable[[torch.Tensor, torch.Tensor], bool] = bit_equal,
                       dtype: torch.dtype | None = None, overlap: bool = True, key: str | None = None) -> Verdict:
    """Resident vs streamed on ``device`` for each storage; see the module docstring. Never raises for
    a failed run: the error becomes a failed verdict (jobs then copy synchronously)."""
    from ..weights.storage import load_transformer
    from ..weights.streaming import apply_streaming, remove_streaming, unload

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = config or selftest_config()
    key = key or fingerprint(device)
    started = time.perf_counter()
    results: dict = {}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    try:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="streaming-selftest-", dir=work_dir) as tmp:
            folder = write_random_checkpoint(Path(tmp) / "transformer", config,
                                             device="cuda" if device.type == "cuda" else "cpu")
            n_blocks = config["num_layers"] + config["num_single_layers"]
            inputs = selftest_inputs(config, device, dtype)
            for storage in storages:
                model = load_transformer(folder, storage, dtype, cache_dir=Path(tmp) / "cache",
                                         keep_mapped=device.type == "cuda")
                with torch.no_grad():
                    # Streamed first, from the storage's own host tensors (memory maps for "disk"); the
                    # second forward reuses the slots. Then everything resident.
                    apply_streaming(model, device, resident_blocks=1, use_stream=overlap)
                    streamed = [model(**inputs)[0].clone() for _ in range(2)]
                    remove_streaming(model)
                    apply_streaming(model, device, resident_blocks=n_blocks)
                    resident = model(**inputs)[0].clone()
                unload(model)
                equal = all(compare(resident, s) for s in streamed)
                diff = max((resident.float() - s.float()).abs().max().item() for s in streamed)
                results[storage] = {"equal": bool(equal), "max_abs_diff": diff}
                logger.info("streaming self-test %s: %s (max |diff| %.3g)", storage, "equal" if equal else "DIFFERS",
                            diff)
    except Exception as exc:  # noqa: BLE001 - any failure means: do not trust the overlapped path
        logger.warning("streaming self-test failed to run", exc_info=True)
        return Verdict(False, key, results, time.perf_counter() - started, f"{type(exc).__name__}: {exc}"[:300],
                       stamp)
    passed = bool(results) and all(r["equal"] for r in results.values())
    return Verdict(passed, key, results, round(time.perf_counter() - started, 2), None, stamp)


def streaming_verdict(device, cache_dir: Path, *, run: bool = True, **selftest_kwargs) -> Verdict | None:
    """The cached verdict for this machine, else (``run``) the self-test's, cached. None: not known."""
    device = torch.device(device)
    key = selftest_kwargs.pop("key", None) or fingerprint(device)
    cached = load_cached(cache_dir, key)
    if cached is not None or not run:
        return cached
    verdict = streaming_selftest(device, cache_dir, key=key, **selftest_kwargs)
    try:
        save_cached(cache_dir, verdict)
    except OSError:
        logger.warning("could not cache the streaming self-test verdict in %s", cache_dir)
    return verdict


# ---- what the engine does with it (pure)


def needs_streaming(plan) -> bool:
    return plan.device == "cuda" and (plan.streamed_blocks > 0 or plan.text_encoder_mode == "disk-fp16")


def streaming_decision(plan, verdict: Verdict | None):
    """Pure: (plan, Notice sentence or None, job.json "streaming" record) for a plan and a verdict.

    Overlapped copies only after this machine's self-test saw them equal the resident output."""
    from .plan import with_copy_mode

    if not needs_streaming(plan):
        return plan, None, {"copies": "none"}
    if verdict is not None and verdict.passed:
        return with_copy_mode(plan, "overlapped"), None, {"copies": "overlapped", "selftest": verdict.record()}
    why = verdict.why if verdict is not None else "it has not run"
    reason = SYNC_REASON.format(why=why)
    notice = ("Streamed model blocks are copied to the GPU one after another (slower) because the streaming "
              f"self-test did not pass on this GPU ({why}).")
    return (with_copy_mode(plan, "synchronous", reason), notice,
            {"copies": "synchronous", "selftest": verdict.record() if verdict else None})
