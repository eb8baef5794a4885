"""What a job costs before it starts: disk space (checked, since the disk is what limits a long video) and
time (estimated from jobs this machine has finished).

Pure functions over numbers, plus two small readers (free disk, finished job records).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import schedule
from ..errors import InputError

# H.264 at CRF 16 on natural video runs about 0.1-0.3 bits per pixel; 0.5 is a generous bound (our
# tiny random model's noise is the worst case and measures ~2 at 64 px, but there a video is small).
# Every 6 CRF steps halve the bitrate (x264's rate factor is logarithmic).
BITS_PER_PIXEL_AT_CRF16 = 0.5
# While the last publish runs, the video exists as segments, the video so far, the final file and
# one older video so far that an open page still streams (ui/serving.py keeps hard links).
VIDEO_COPIES = 4
# No extra margin: the estimate is already generous, and a job that might fit is let run (a disk that
# fills anyway fails with a sentence and keeps the finished sections, as before).
DISK_MARGIN = 0
SECTION_FILE_OVERHEAD = 8 * 2**10  # safetensors header and the generator state


@dataclass(frozen=True)
class DiskNeed:
    latents: int  # section files (float32 latents, kept for resume)
    video: int  # segments, previews and the final file
    margin: int

    @property
    def total(self) -> int:
        return self.latents + self.video + self.margin


def section_bytes(window: int, height: int, width: int) -> int:
    """One section file: float32 latents of the window (the last inverted one holds the start frame too)."""
    latents = schedule.LATENT_CHANNELS * (window + 1) * (height // schedule.VAE_SPATIAL) * (width // schedule.VAE_SPATIAL)
    return 4 * latents + SECTION_FILE_OVERHEAD


def video_bytes_per_frame(height: int, width: int, crf: int) -> float:
    return BITS_PER_PIXEL_AT_CRF16 * 2 ** ((16 - crf) / 6) * height * width / 8


def disk_need(sections: int, window: int, height: int, width: int, crf: int, sections_done: int = 0,
              measured_bytes_per_frame: float | None = None) -> DiskNeed:
    """Bytes a job still needs: its remaining section files, and the whole video's copies (the final
    publish copies all of it, so a resume needs those too). A resume passes what its segments measured."""
    frames = schedule.total_frames(sections, window)
    per_frame = measured_bytes_per_frame or video_bytes_per_frame(height, width, crf)
    segments_left = per_frame * frames * (sections - sections_done) / max(sections, 1)
    video = segments_left + (VIDEO_COPIES - 1) * per_frame * frames
    return DiskNeed(latents=(sections - sections_done) * section_bytes(window, height, width), video=int(video),
                    margin=DISK_MARGIN)


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def check_disk(need: DiskNeed, free: int, folder: Path, seconds: float) -> None:
    """InputError with one sentence when the job cannot fit on the disk holding its folder."""
    if free >= need.total:
        return
    raise InputError(
        f"This {seconds:g} s video needs about {gigabytes(need.total)} free on the disk holding {folder} "
        f"(section latents {gigabytes(need.latents)}, the video and its previews {gigabytes(need.video)}), but "
        f"only {gigabytes(free)} is free; free some space, choose a shorter length or another outputs folder.")


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def measured_bytes_per_frame(video_state: dict | None) -> float | None:
    """What the segments written so far cost per frame (a resume's better guess than the bound)."""
    segments = (video_state or {}).get("segments") or []
    frames = sum(int(s.get("frames") or 0) for s in segments)
    size = sum(int(s.get("bytes") or 0) for s in segments)
    return size / frames if frames and size else None


# ---- time


@dataclass(frozen=True)
class StepRate:
    """What a finished job measured: sampling seconds per step, and decoding plus writing seconds per
    section (step cache included); both grow with the size, so they are scaled by the token count."""

    seconds_per_step: float
    seconds_per_section: float
    tokens: int  # noisy-window tokens of that job, to scale to another size
    job_id: str
    resolution: int
    window: int


def rate_of(record: dict) -> StepRate | None:
    """A finished, never resumed job's measured rate (a resumed one's timings cover only its last run)."""
    try:
        if record.get("status") != "done" or record.get("resumed"):
            return None
        timings, params = record["timings_s"], record["params"]
        sections, steps = int(record["sections"]), int(params["steps"])
        sampling = float(timings["sampling"])
        per_section = sum(float(timings.get(k) or 0.0) for k in ("decode", "write")) / max(sections, 1)
        tokens = schedule.window_tokens(int(params["window"]), int(record["height"]), int(record["width"]))
        if sampling <= 0 or sections <= 0 or steps <= 0 or tokens <= 0:
            return None
        return StepRate(sampling / (sections * steps), per_section, tokens, str(record["job_id"]),
                        int(params["resolution"]), int(params["window"]))
    except (KeyError, TypeError, ValueError):
        return None


def latest_rate(outputs: Path, device: str | None = None, limit: int = 50) -> StepRate | None:
    """The newest finished job's rate on this device, from the last `limit` job folders (reads job.json only)."""
    try:
        folders = sorted((p for p in Path(outputs).iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True)
    except OSError:
        return None
    for folder in folders[:limit]:
        try:
            record = json.loads((folder / "job.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and (device is None or str(record.get("device", "")).startswith(device)):
            rate = rate_of(record)
            if rate is not None:
                return rate
    return None


def estimate_seconds(sections: int, steps: int, tokens: int, rate: StepRate) -> float:
    """Pure: the job's wall time at the measured rate, scaled by its size (linear in tokens: rough when
    the sizes differ, as attention grows faster than that)."""
    return sections * (steps * rate.seconds_per_step + rate.seconds_per_section) * tokens / rate.tokens


def duration_text(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    return f"{seconds / 86400:.1f} days"
