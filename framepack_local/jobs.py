"""Job folders under outputs/: naming, layout, and the job.json record."""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import OutputFolderError
from .video import atomic_write_json

JOB_FILE = "job.json"
PARTIAL_VIDEO = "partial.mp4"
FINAL_VIDEO = "video.mp4"
INPUT_IMAGE = "input.png"
END_IMAGE = "end_input.png"
SECTIONS_DIR = "sections"
JOB_ID_RE = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def ensure_writable(outputs: Path) -> None:
    """Fail early, before any work, if the outputs folder cannot take files."""
    try:
        outputs.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=outputs, prefix=".write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputFolderError(
            f"The outputs folder {outputs} cannot be written ({reason}); choose another folder with --outputs."
        ) from exc


def create_job_dir(outputs: Path) -> tuple[str, Path]:
    ensure_writable(outputs)
    job_id = new_job_id()
    job_dir = outputs / job_id
    try:
        (job_dir / SECTIONS_DIR).mkdir(parents=True)
    except OSError as exc:
        raise OutputFolderError(
            f"Could not create the job folder {job_dir} ({exc.strerror}); check the outputs folder."
        ) from exc
    return job_id, job_dir


def library_versions() -> dict:
    import diffusers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def write_record(job_dir: Path, record: dict) -> None:
    atomic_write_json(job_dir / JOB_FILE, record)


def read_record(job_dir: Path) -> dict:
    return json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8"))


def section_file(job_dir: Path, number: int) -> Path:
    return job_dir / SECTIONS_DIR / f"section_{number:03d}.safetensors"


def save_section(job_dir: Path, number: int, latents_bcthw: torch.Tensor, rng_state: torch.Tensor) -> None:
    """One finished section: its latents and the generator state after it (to continue identically)."""
    path = section_file(job_dir, number)
    tmp = path.with_suffix(".tmp")
    save_file({"latents": latents_bcthw.contiguous().cpu(), "rng_state": rng_state.contiguous()}, str(tmp))
    os.replace(tmp, path)


def load_sections(job_dir: Path) -> list[dict[str, torch.Tensor]]:
    files = sorted((job_dir / SECTIONS_DIR).glob("section_*.safetensors"))
    return [load_file(str(f)) for f in files]


def job_latents(job_dir: Path, mode: str) -> torch.Tensor:
    """All latents of the job in time order (the start latent included once the last section is done)."""
    parts = [s["latents"] for s in load_sections(job_dir)]
    if not parts:
        raise FileNotFoundError(f"no finished sections in {job_dir}")
    if mode == "inverted":
        parts = parts[::-1]  # sampled from the end back to the start
    return torch.cat(parts, dim=2)


def drop_sections_after(job_dir: Path, done: int) -> None:
    """Remove section files past the last one the record counts (written just before a crash)."""
    for f in (job_dir / SECTIONS_DIR).glob("section_*.safetensors"):
        if int(f.stem.split("_")[1]) >= done:
            f.unlink()


def _pid_alive(pid: int) -> bool:
    import psutil  # os.kill(pid, 0) would terminate the process on Windows

    return psutil.pid_exists(pid)


def recover_interrupted(outputs: Path) -> list[Path]:
    """Mark jobs left "running" by a process that no longer exists as "interrupted" (resumable)."""
    import socket

    found = []
    if not outputs.is_dir():
        return found
    host = socket.gethostname()
    for job_dir in sorted(p for p in outputs.iterdir() if p.is_dir() and JOB_ID_RE.match(p.name)):
        try:
            record = read_record(job_dir)
        except (OSError, ValueError):
            continue
        if record.get("status") != "running":
            continue
        pid = record.get("pid")
        if record.get("host") == host and isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
            continue  # another process on this machine is still working on it
        if record.get("host") == host and pid == os.getpid():
            continue
        record.update(status="interrupted", error="The app stopped while this job was running; resume it to continue.")
        write_record(job_dir, record)
        found.append(job_dir)
    return found
