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
from safetensors.torch import load_file, save

from ..errors import OutputFolderError
from ..files import atomic_write_bytes, atomic_write_json, pid_alive

JOB_FILE = "job.json"
PARTIAL_VIDEO = "partial.mp4"
FINAL_VIDEO = "video.mp4"
INPUT_IMAGE = "input.png"
END_IMAGE = "end_input.png"
KEYFRAME_IMAGE = "keyframe_{:02d}.png"  # the storyboard's keyframes by time, cropped to the bucket
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


def create_job_dir(outputs: Path, job_id: str | None = None) -> tuple[str, Path]:
    """A new job folder; `job_id` when the caller handed out the id already (the worker, at submit)."""
    ensure_writable(outputs)
    if job_id is None or not JOB_ID_RE.match(job_id) or (outputs / job_id).exists():
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
    """One finished section: its latents and the generator state after it (to continue identically).

    Serialised in memory (a few MB) and written like every other file: temp + fsync + rename, with
    file-system errors as one sentence (safetensors' own writer reports them as SafetensorError).
    """
    data = save({"latents": latents_bcthw.contiguous().cpu(), "rng_state": rng_state.contiguous()})
    atomic_write_bytes(section_file(job_dir, number), data)


def load_sections(job_dir: Path, count: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Sections 0..count-1 in order (all present ones when count is None); a gap is an error."""
    if count is None:
        count = len(list((job_dir / SECTIONS_DIR).glob("section_*.safetensors")))
    out = []
    for number in range(count):
        path = section_file(job_dir, number)
        if not path.is_file():
            raise FileNotFoundError(f"section {number} of {job_dir} is missing")
        out.append(load_file(str(path)))
    return out


def load_section_tail(job_dir: Path, done: int, count: int) -> list[dict[str, torch.Tensor]]:
    """The last `count` of sections 0..done-1, each read once; every earlier one must exist (a stat, no read).

    A resume needs only what the packed history still holds, so a 1 800-section job reads a handful of
    files instead of all of them (and holds a few MB, not all its latents).
    """
    for number in range(done):
        if not section_file(job_dir, number).is_file():
            raise FileNotFoundError(f"section {number} of {job_dir} is missing")
    return [load_file(str(section_file(job_dir, n))) for n in range(max(0, done - count), done)]


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


def running_elsewhere(record: dict) -> bool:
    """True when another live process on this machine is running this job right now."""
    import socket

    pid = record.get("pid")
    return (record.get("status") == "running" and record.get("host") == socket.gethostname()
            and isinstance(pid, int) and pid != os.getpid() and pid_alive(pid))


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
        if running_elsewhere(record) or (record.get("host") == host and record.get("pid") == os.getpid()):
            continue  # a live process (maybe this one) is still working on it
        record.update(status="interrupted", error="The app stopped while this job was running; resume it to continue.")
        write_record(job_dir, record)
        found.append(job_dir)
    return found
