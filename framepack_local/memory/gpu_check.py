"""Can PyTorch use this computer's NVIDIA GPU? One sentence with the cause and the fix when it cannot.

The common failure is silent: an NVIDIA GPU is there, but torch.cuda.is_available() is false (a CPU
wheel, a driver older than the wheel's CUDA, or a GPU generation the wheel has no kernels for), and
a 13B model would run on the CPU. ``gpu_verdict`` is pure (tested with saved nvidia-smi outputs);
``check_gpu`` gathers the facts on this machine. The page shows the sentence as a banner.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

TORCH_INDEX = "https://download.pytorch.org/whl/{}"
# (newest CUDA the driver must support, wheel tag), newest first: what run.sh can install instead.
WHEELS = ((13.0, "cu130"), (12.8, "cu128"), (12.6, "cu126"))
# GPU generations that need a newer CUDA build than older wheels carry (Blackwell: sm_100/sm_120).
MIN_CUDA_FOR_CAPABILITY = {(10, 0): 12.8, (12, 0): 12.8}
REINSTALL = "delete the .venv folder and run ./run.sh again"


@dataclass(frozen=True)
class NvidiaSmi:
    gpu_name: str
    driver: str
    cuda: float | None  # newest CUDA the driver supports ("CUDA Version" in nvidia-smi's header)
    capability: tuple[int, int] | None


def parse_nvidia_smi(header: str, query_csv: str) -> NvidiaSmi | None:
    """`nvidia-smi` (header) and `nvidia-smi --query-gpu=name,driver_version,compute_cap
    --format=csv,noheader` output -> facts of the first GPU; None when no GPU is listed."""
    rows = [r.strip() for r in query_csv.strip().splitlines() if r.strip()]
    if not rows:
        return None
    fields = [f.strip() for f in rows[0].split(",")]
    name, driver = fields[0], fields[1] if len(fields) > 1 else "?"
    capability = None
    if len(fields) > 2 and re.fullmatch(r"\d+\.\d+", fields[2]):
        major, minor = fields[2].split(".")
        capability = (int(major), int(minor))
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return NvidiaSmi(name, driver, float(cuda.group(1)) if cuda else None, capability)


def _wheel_for(driver_cuda: float | None) -> str | None:
    for needs, tag in WHEELS:
        if driver_cuda is not None and driver_cuda >= needs:
            return tag
    return None


def gpu_verdict(smi: NvidiaSmi | None, torch_cuda: str | None, cuda_available: bool,
                arch_list: tuple[str, ...] = ()) -> str | None:
    """None when all is well (or there is no NVIDIA GPU); else one sentence: the cause and the fix."""
    if smi is None:
        return None
    gpu = f"An NVIDIA GPU ({smi.gpu_name}) is here"
    sm = f"sm_{smi.capability[0]}{smi.capability[1]}" if smi.capability else None
    if cuda_available:
        # is_available() only says a device answers: a build without kernels for this generation
        # still says yes and fails at the first kernel (pytorch/pytorch#167244).
        if sm and arch_list and sm not in arch_list and torch_cuda:
            wheel = "cu128" if float(".".join(torch_cuda.split(".")[:2])) < 12.8 else "cu130"
            return (f"{gpu}, but this PyTorch (CUDA {torch_cuda}) has no kernels for its generation "
                    f"(compute capability {smi.capability[0]}.{smi.capability[1]}); delete .venv and run "
                    f"FPL_TORCH_INDEX={TORCH_INDEX.format(wheel)} ./run.sh.")
        return None
    if torch_cuda is None:
        return (f"{gpu}, but the installed PyTorch is the CPU build, so jobs would run on the CPU; "
                f"{REINSTALL} (it installs the CUDA build when nvidia-smi answers).")
    built = float(".".join(torch_cuda.split(".")[:2]))
    if smi.cuda is not None and smi.cuda < built:
        wheel = _wheel_for(smi.cuda)
        fix = (f"update the NVIDIA driver, or install a build it supports: "
               f"FPL_TORCH_INDEX={TORCH_INDEX.format(wheel)} ./run.sh after deleting .venv" if wheel
               else "update the NVIDIA driver (580 or newer runs every build)")
        return (f"{gpu}, but its driver {smi.driver} supports CUDA up to {smi.cuda:g} while PyTorch was built "
                f"for CUDA {torch_cuda}, so the GPU cannot be used; {fix}.")
    need = MIN_CUDA_FOR_CAPABILITY.get(smi.capability) if smi.capability else None
    if (need is not None and built < need) or (sm and arch_list and sm not in arch_list):
        wheel = "cu128" if need is None or need <= 12.8 else "cu130"
        return (f"{gpu}, but this PyTorch (CUDA {torch_cuda}) has no kernels for its generation "
                f"(compute capability {smi.capability[0]}.{smi.capability[1]}); delete .venv and run "
                f"FPL_TORCH_INDEX={TORCH_INDEX.format(wheel)} ./run.sh.")
    return (f"{gpu}, but PyTorch cannot use it (CUDA {torch_cuda} build, driver {smi.driver}); check that "
            f"nvidia-smi works for this user and restart the computer after a driver update.")


def torch_index_for(smi: NvidiaSmi | None) -> tuple[str, str]:
    """Pure: the PyTorch wheel index run.sh installs from, and why ("" = the CPU build from PyPI).

    The newest build the driver runs (nvidia-smi's "CUDA Version" is the newest CUDA it supports):
    CUDA 13.0 needs driver 580+, 12.8 needs 570+ (and is the oldest with Blackwell / RTX 50 kernels).
    """
    if smi is None:
        return "", "no NVIDIA GPU answered nvidia-smi: the CPU build"
    wheel = _wheel_for(smi.cuda)
    if wheel is None:
        oldest = WHEELS[-1]
        return (TORCH_INDEX.format(oldest[1]),
                f"the driver {smi.driver} supports only CUDA {smi.cuda or '?'}; installing the CUDA {oldest[0]:g} "
                f"build anyway: update the NVIDIA driver if the GPU is not used")
    cuda = next(needs for needs, tag in WHEELS if tag == wheel)
    return TORCH_INDEX.format(wheel), f"driver {smi.driver} on {smi.gpu_name} supports CUDA {smi.cuda:g}: the CUDA {cuda:g} build"


def read_nvidia_smi(timeout: float = 10.0) -> NvidiaSmi | None:
    """This machine's nvidia-smi facts; None without an NVIDIA driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None

    def run(*args: str) -> str:
        try:
            done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout if done.returncode == 0 else ""

    header = run()
    query = run("--query-gpu=name,driver_version", "--format=csv,noheader")
    if not query:  # very old drivers: the listing still names the GPU
        listed = re.search(r"GPU 0: (.+?) \(UUID", run("-L"))
        driver = re.search(r"Driver Version:\s*([\d.]+)", header)
        if not listed:
            return None
        query = f"{listed.group(1)}, {driver.group(1) if driver else '?'}"
    capability = run("--query-gpu=compute_cap", "--format=csv,noheader").strip().splitlines()  # drivers 510+
    first = query.strip().splitlines()[0] + (f", {capability[0].strip()}" if capability else "")
    return parse_nvidia_smi(header, first)


def check_gpu() -> str | None:
    """The verdict for this machine (imports torch)."""
    import torch

    available = torch.cuda.is_available()
    arch = tuple(torch.cuda.get_arch_list()) if torch.version.cuda else ()
    return gpu_verdict(read_nvidia_smi(), torch.version.cuda, available, arch)


if __name__ == "__main__":  # run.sh / run.bat, before the virtual environment exists: stdlib only
    import sys

    if sys.argv[1:] == ["--torch-index"]:
        index, why = torch_index_for(read_nvidia_smi())
        # The protocol with run.sh / run.bat: the index on stdout, the reason for the person on stderr.
        sys.stderr.write(f"PyTorch: {why}\n")
        sys.stdout.write(index + "\n")
