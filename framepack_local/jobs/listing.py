"""Past jobs for the History: one summary per job folder under outputs/, newest first.

Reads only job.json and file names (no video decoding), so listing a large outputs folder is cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .store import FINAL_VIDEO, INPUT_IMAGE, JOB_FILE, PARTIAL_VIDEO, running_elsewhere

# Statuses a job folder can be resumed from. "interrupted" is what list_jobs calls a folder whose
# record still says "running" although no worker runs it (the app was killed mid-job).
RESUMABLE = ("stopped", "failed", "interrupted")


@dataclass(frozen=True)
class JobSummary:
    job_id: str
    job_dir: Path
    prompt: str
    seconds: float | None
    created: str  # as recorded ("YYYY-mm-ddTHH:MM:SS+zzzz"), "" when unknown
    status: str  # "done", "stopped", "failed", "running", "interrupted" or what the record says
    video: Path | None  # final video, else the video so far
    thumbnail: Path | None  # the cropped input photo
    sections_done: int
    sections: int | None
    error: str | None
    params: dict
    steps_computed: tuple[int, ...] = ()  # per finished section: steps that ran the transformer (step cache)
    attention: str | None = None  # the kernel the job ran with
    drift: dict | None = None  # the drift report's summary (engine/drift.py), when the job has one

    @property
    def resumable(self) -> bool:
        return self.status in RESUMABLE


def _read_summary(job_dir: Path, busy: set[Path]) -> JobSummary | None:
    try:
        record = json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    params = record.get("params") if isinstance(record.get("params"), dict) else {}
    status = str(record.get("status") or "unknown")
    if status == "running" and job_dir.resolve() not in busy and not running_elsewhere(record):
        status = "interrupted"
    video = None
    for name in (FINAL_VIDEO, PARTIAL_VIDEO):
        if (job_dir / name).is_file():
            video = job_dir / name
            break
    seconds = params.get("seconds")
    thumb = job_dir / INPUT_IMAGE
    try:
        sections_done = int(record.get("sections_done") or 0)
    except (TypeError, ValueError):
        sections_done = 0
    sections = record.get("sections")
    return JobSummary(
        job_id=str(record.get("job_id") or job_dir.name),
        job_dir=job_dir,
        prompt=str(params.get("prompt") or ""),
        seconds=float(seconds) if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else None,
        created=str(record.get("created") or ""),
        status=status,
        video=video,
        thumbnail=thumb if thumb.is_file() else None,
        sections_done=sections_done,
        sections=sections if isinstance(sections, int) else None,
        error=record.get("error") if isinstance(record.get("error"), str) else None,
        params=params,
        steps_computed=tuple(n for n in (record.get("steps_computed") or ()) if isinstance(n, int)),
        attention=(record.get("attention") or {}).get("used") if isinstance(record.get("attention"), dict) else None,
        drift=record.get("drift") if isinstance(record.get("drift"), dict) else None,
    )


def _mtime_ns(path: Path | None) -> int:
    try:
        return path.stat().st_mtime_ns if path is not None else 0
    except OSError:
        return 0


def list_jobs(outputs: Path, busy: set[Path] | None = None, limit: int | None = None) -> list[JobSummary]:
    """Past jobs under `outputs`, newest first. Folders without a readable job.json are skipped.

    `busy`: job folders a worker is running or has queued (their "running" is real; any other
    "running" record is reported as "interrupted").
    """
    outputs = Path(outputs)
    busy = {Path(b).resolve() for b in (busy or set())}
    try:
        folders = [p for p in outputs.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return []
    summaries = [s for s in (_read_summary(p, busy) for p in folders) if s is not None]
    # "created" has one-second resolution; the input photo is written once, right after it, so its
    # modification time orders jobs started within the same second.
    summaries.sort(key=lambda s: (s.created, _mtime_ns(s.thumbnail), s.job_dir.name), reverse=True)
    return summaries[:limit] if limit is not None else summaries
