"""`python -m framepack_local doctor`: what this computer has, whether jobs can use its GPU, and why not.

Facts (versions, driver, GPU, memory, disk), the GPU verdict with its fix (memory/gpu_check.py), the
attention kernels and bitsandbytes, measured host-to-device bandwidth and bf16 matmul rate on a GPU,
and the memory plan of a default job. Each check that cannot run here says so and why. Exit 0 when
nothing keeps jobs from running.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class Check:
    name: str
    value: str
    ok: bool = True  # False: this keeps jobs from running as they should


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    measured: dict = field(default_factory=dict)
    selftest_verdict: object = None  # memory.streaming_selftest.Verdict on a GPU

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, value: str, ok: bool = True) -> None:
        self.checks.append(Check(name, value, ok))

    def table(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [f"{c.name:<{width}}  {'' if c.ok else '!! '}{c.value}" for c in self.checks]
        verdict = "This computer can run jobs." if self.ok else "Fix the lines marked !! first."
        return "\n".join(lines + ["", verdict])

    def to_dict(self) -> dict:
        verdict = self.selftest_verdict.record() if self.selftest_verdict is not None else None
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks], "measured": self.measured,
                "streaming_selftest": verdict}


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _bandwidth(torch, pinned: bool, megabytes: int = 256) -> float:
    """Host-to-device copy rate in GB/s (median of three copies)."""
    host = torch.empty(megabytes * 2**20, dtype=torch.uint8, pin_memory=pinned)
    device = torch.empty_like(host, device="cuda")
    rates = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        device.copy_(host, non_blocking=pinned)
        torch.cuda.synchronize()
        rates.append(host.numel() / (time.perf_counter() - t0) / 1e9)
    return sorted(rates)[1]


def _matmul_tflops(torch, n: int = 4096) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a @ b  # warm-up (cuBLAS picks its kernel)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12


def _streaming_selftest(torch, models_dir: Path, cuda: bool, measure: bool):
    """(line, verdict): the cached verdict, or (not --quick) a fresh run; it is what jobs will do."""
    if not cuda:
        return ("skipped: it needs a CUDA GPU (jobs on the CPU do not stream blocks; the tests cover the "
                "prefetcher's ordering on the CPU)"), None
    from .memory.streaming_selftest import streaming_verdict

    verdict = streaming_verdict(torch.device("cuda"), models_dir / ".cache", run=measure)
    if verdict is None:
        return ("not run yet on this GPU (the first job that streams blocks runs it, or `doctor` without "
                "--quick)"), None
    when = f"checked {verdict.checked_at}, {verdict.seconds:.0f} s"
    if verdict.passed:
        return (f"passed: streamed blocks give the resident output bit for bit "
                f"({', '.join(verdict.storages)}; {when}); block copies overlap compute"), verdict
    return (f"FAILED ({verdict.why}; {when}): jobs copy streamed blocks synchronously (slower, correct); "
            f"delete {models_dir / '.cache' / 'streaming_selftest.json'} to test again"), verdict


def diagnose(models_dir: Path, outputs_dir: Path, measure: bool = True, run_selftest: bool | None = None) -> Report:
    """The report; ``run_selftest`` (default: ``measure``) runs the streaming self-test when this GPU has
    no cached verdict yet."""
    import psutil
    import torch

    from .engine import attention
    from .memory.gpu_check import check_gpu, read_nvidia_smi

    report = Report()
    report.add("Python", platform.python_version())
    report.add("PyTorch", f"{torch.__version__}, " + (f"CUDA {torch.version.cuda} build" if torch.version.cuda
                                                       else "CPU build"))
    smi = read_nvidia_smi()
    report.add("NVIDIA driver", f"{smi.driver}, supports CUDA up to {smi.cuda or '?'}" if smi
               else "none found (nvidia-smi does not answer)")
    cuda = torch.cuda.is_available()
    if cuda:
        free, total = torch.cuda.mem_get_info()
        major, minor = torch.cuda.get_device_capability()
        report.add("GPU", f"{torch.cuda.get_device_name()}, compute capability {major}.{minor}, "
                          f"{_gb(free)} free of {_gb(total)}")
    else:
        report.add("GPU", f"{smi.gpu_name} (not usable by PyTorch)" if smi else "none: jobs run on the CPU "
                   "(practical only with the tiny demo model)")
    verdict = check_gpu()
    report.add("GPU usable", verdict or ("yes" if cuda else "no GPU to use"), ok=verdict is None)
    vm = psutil.virtual_memory()
    report.add("RAM", f"{_gb(vm.available)} available of {_gb(vm.total)}")
    for label, folder in (("Disk (models)", models_dir), ("Disk (outputs)", outputs_dir)):
        probe = Path(folder)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        report.add(label, f"{_gb(shutil.disk_usage(probe).free)} free under {folder}")

    reasons = attention.unavailable_reasons(torch.device("cuda" if cuda else "cpu"))
    kernels = ["PyTorch SDPA: yes"] + [f"{name}: {'yes' if why is None else why}" for name, why in reasons.items()]
    report.add("Attention", "; ".join(kernels) + f" (auto uses {attention.choose('auto', reasons).backend})")
    if not cuda:
        report.add("bitsandbytes", "skipped: it needs a CUDA GPU (the 8B text encoder stays in 16 bits)")
    else:
        try:
            import bitsandbytes  # noqa: F401

            report.add("bitsandbytes", f"{bitsandbytes.__version__} imports")
        except Exception as exc:  # noqa: BLE001 - any import failure is the answer
            report.add("bitsandbytes", f"does not import ({type(exc).__name__}); the text encoder stays in 16 bits")

    if cuda and measure:
        report.measured = {"h2d_pinned_gb_s": round(_bandwidth(torch, True), 1),
                           "h2d_pageable_gb_s": round(_bandwidth(torch, False), 1),
                           "bf16_matmul_tflops": round(_matmul_tflops(torch), 1)}
        report.add("Measured", f"host->GPU {report.measured['h2d_pinned_gb_s']} GB/s pinned, "
                               f"{report.measured['h2d_pageable_gb_s']} GB/s pageable; bf16 matmul "
                               f"{report.measured['bf16_matmul_tflops']} TFLOP/s")
    else:
        report.add("Measured", "skipped: bandwidth and matmul rate need a CUDA GPU" if not cuda else "skipped (--quick)")
    line, report.selftest_verdict = _streaming_selftest(torch, Path(models_dir), cuda,
                                                        measure if run_selftest is None else run_selftest)
    report.add("Streaming self-test", line)

    try:
        from .memory.plan import JobShape, estimate_step_seconds, plan
        from .memory.streaming_selftest import streaming_decision
        from .memory.probe import model_sizes_from_folder, probe as probe_machine
        from .weights.model_folder import missing_parts

        missing = missing_parts(models_dir, "inverted")
        if missing:
            report.add("Memory plan", f"skipped: the model folder {models_dir} lacks {', '.join(missing)}")
        else:
            sizes = model_sizes_from_folder(models_dir, "inverted")
            default_plan = plan(probe_machine(outputs_dir), sizes, JobShape(), "auto", None)
            if cuda:
                default_plan = streaming_decision(default_plan, report.selftest_verdict)[0]
            report.add("Memory plan", "default job (640 bucket, auto):\n" + "\n".join(
                "    " + line for line in default_plan.table().splitlines()))
            rates = report.measured
            if default_plan.device == "cuda" and "bf16_matmul_tflops" in rates:
                est = estimate_step_seconds(default_plan, sizes.transformer, JobShape(), rates["bf16_matmul_tflops"],
                                            rates["h2d_pinned_gb_s"])
                report.measured["estimate_640"] = est
                report.add("Speed estimate", f"about {est['step_s']} s per step at the 640 bucket (compute "
                                             f"{est['compute_s']} s, block copies {est['copy_s']} s; an estimate "
                                             "from the measured rates, not a measurement)")
            else:
                report.add("Speed estimate", "skipped: it needs the measured GPU rates")
    except Exception as exc:  # noqa: BLE001 - the rest of the report still helps
        logger.debug("memory plan failed", exc_info=True)
        report.add("Memory plan", f"could not be made ({type(exc).__name__}: {exc})")
    return report
