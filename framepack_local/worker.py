"""Background job worker: one engine, one thread, a FIFO queue; it belongs to no browser tab.

The UI submits jobs and polls `snapshot()`; closing a tab changes nothing here, and a page opened
later sees the running job (DESIGN.md section 5). Only the latest progress is kept (no event list
grows), and no job can take the worker thread down: every failure becomes one sentence.

Nothing happens at import: the engine (and with it torch) is imported when the first job runs.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import Cancelled, FramePackError, InputError
from .events import (
    CancelToken, Event, JobFinished, JobStarted, Notice, SectionFinished, StageChanged, StepProgress,
)
from .jobs import store
from .params import JobParams

logger = logging.getLogger(__name__)

_MAX_OUTCOMES = 200  # finished tickets remembered for outcome(); old ones are forgotten
_MAX_NOTICES = 5


@dataclass(frozen=True)
class QueuedJob:
    key: str
    kind: str  # "new" or "resume"
    description: str


@dataclass(frozen=True)
class JobOutcome:
    """How one ticket ended."""

    key: str
    status: str  # "done", "stopped", "failed" or "removed"
    job_id: str | None
    job_dir: Path | None
    video_path: Path | None
    error: str | None


@dataclass(frozen=True)
class WorkerState:
    """What the UI shows. While a job runs it describes that job; when idle, the last job that ran."""

    status: str  # "idle", "running", "stopping", "done", "stopped" or "failed"
    status_text: str
    key: str | None  # ticket of the job described here
    job_id: str | None
    job_dir: Path | None
    description: str
    stage: str
    section: int  # 1-based section being sampled (sampling order)
    sections: int
    step: int  # 1-based step within the section
    steps: int
    computed: int | None  # steps of the current section that ran the full transformer (step cache)
    sections_done: int
    elapsed_s: float
    eta_s: float | None  # None until the first step has been timed
    preview_rgb: np.ndarray | None  # (H, W, 3) uint8 latest cheap latent preview
    partial_video: Path | None  # the playable video so far
    final_video: Path | None
    error: str | None  # one sentence when the job failed
    notices: tuple[str, ...]
    queue: tuple[QueuedJob, ...]
    version: int  # grows with every change, so pollers can skip identical updates
    preview_frame_width: int = 0  # width of one latent frame in preview_rgb (0 = unknown)

    @property
    def running(self) -> bool:
        return self.status in ("running", "stopping")

    @property
    def fraction(self) -> float:
        """Share of all sampling steps done (0..1)."""
        total = self.sections * self.steps
        if total <= 0:
            return 1.0 if self.status == "done" else 0.0
        if self.status == "done":
            return 1.0
        done = max(0, self.section - 1) * self.steps + self.step
        return min(1.0, done / total)


@dataclass
class _Ticket:
    key: str
    kind: str
    description: str
    params: JobParams | None = None
    job_dir: Path | None = None  # resume target
    overrides: dict | None = None  # resume: memory settings / folders that may change
    cancel: CancelToken | None = None


@dataclass
class _Live:
    """Mutable progress of the current (or last) job; only touched under the worker lock."""

    status: str = "idle"
    status_text: str = "Ready."
    key: str | None = None
    job_id: str | None = None
    job_dir: Path | None = None
    description: str = ""
    stage: str = ""
    section: int = 0
    sections: int = 0
    step: int = 0
    steps: int = 0
    computed: int | None = None
    sections_done: int = 0
    started: float | None = None  # time.monotonic()
    ended: float | None = None
    sampling_base: float | None = None  # when the previous step ended (or sampling began)
    step_time_total: float = 0.0
    steps_timed: int = 0
    last_step_at: float | None = None
    preview_rgb: np.ndarray | None = None
    preview_frame_width: int = 0
    partial_video: Path | None = None
    final_video: Path | None = None
    error: str | None = None
    notices: tuple[str, ...] = ()


def describe(params: JobParams) -> str:
    """A short line for queue and status displays."""
    prompt = " ".join(params.prompt.split())
    prompt = (prompt[:48] + "…") if len(prompt) > 49 else (prompt or "(no prompt)")
    return f"“{prompt}”, {params.seconds:g} s, {params.mode}, seed {params.seed}"


def _default_engine():
    from .engine.generate import Engine

    return Engine()


def failure_sentence(exc: BaseException) -> str:
    """One sentence for an exception that is not a FramePackError."""
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(exc, oom):
        return ("The GPU ran out of memory; raise \"GPU memory to keep free\" or choose the fp8 or disk memory "
                "profile, then resume the job — the finished sections are kept.")
    if isinstance(exc, MemoryError):
        return ("The computer ran out of system memory; close other programs or choose the disk memory "
                "profile, then resume the job — the finished sections are kept.")
    detail = " ".join(str(exc).split())
    if len(detail) > 120:
        detail = detail[:117] + "..."
    reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return f"The job failed unexpectedly ({reason}); the finished sections are kept."


class Worker:
    """Runs jobs one after another on a daemon thread; thread-safe; the UI only polls snapshot().

    Pass an Engine built on the main thread when other threads may import torch at the same time
    (a web server): the first import of torch/diffusers is not safe in two threads at once. Without
    one, the engine is built on the worker thread when the first job runs.
    """

    def __init__(self, engine: Any = None, *, engine_factory: Callable[[], Any] | None = None) -> None:
        self._engine = engine
        self._engine_factory = engine_factory or _default_engine
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[_Ticket] = deque()
        self._current: _Ticket | None = None
        self._live = _Live()
        self._outcomes: OrderedDict[str, JobOutcome] = OrderedDict()
        self._version = 0
        self._counter = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._closed = False

    # ----- public API (any thread) -------------------------------------------------------------

    def submit(self, params: JobParams) -> str:
        """Queue a new job and return its ticket key at once. Raises InputError for bad parameters."""
        if not isinstance(params, JobParams):
            raise InputError("The job settings are incomplete; fill in the form again.")
        params.validate()
        # The ticket is the job id the folder will have: one id from Start to History.
        key = store.new_job_id()
        params = params.replace(extra={**params.extra, "job_id": key})
        return self._enqueue(_Ticket(key, "new", describe(params), params=params))

    def resume(self, job_dir: str | Path, overrides: dict | None = None) -> str:
        """Queue a resume of a stopped or failed job folder; returns its ticket key.

        `overrides`: memory settings (memory_profile, keep_free_gb) to use this time, e.g. after an
        out-of-memory error; they never change the result."""
        job_dir = Path(job_dir)
        record_path = job_dir / store.JOB_FILE
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{job_dir} is not a readable job folder, so it cannot be resumed.") from exc
        if record.get("status") == "done":
            raise InputError("This job is already finished; there is nothing to resume.")
        if job_dir.resolve() in self.busy_dirs:
            raise InputError("This job is already running or waiting in the queue.")
        prompt = (record.get("params") or {}).get("prompt", "")
        short = " ".join(str(prompt).split())[:40]
        description = f"Resume {record.get('job_id', job_dir.name)} (“{short}”)"
        job_id = str(record.get("job_id") or job_dir.name)
        return self._enqueue(_Ticket(job_id if store.JOB_ID_RE.match(job_id) else self._new_key(), "resume",
                                     description, job_dir=job_dir, overrides=dict(overrides) if overrides else None))

    def stop(self, key: str | None = None) -> bool:
        """Stop the running job (within one sampling step) or drop a queued one. None = the running job."""
        with self._lock:
            current = self._current
            if current is not None and (key is None or key == current.key):
                if current.cancel is not None:
                    current.cancel.cancel()
                if self._live.status == "running":
                    self._live.status = "stopping"
                    self._live.status_text = "Stopping after the current step…"
                    self._version += 1
                return True
            # Same lock: a job cannot slip from the queue into running between the two checks.
            return self._remove_locked(key) if key is not None else False

    def remove(self, key: str) -> bool:
        """Drop a queued (not yet running) job. Returns False when no queued job has that key."""
        with self._lock:
            return self._remove_locked(key)

    def _remove_locked(self, key: str) -> bool:
        for ticket in list(self._queue):
            if ticket.key == key:
                self._queue.remove(ticket)
                self._remember(JobOutcome(key, "removed", None, None, None, None))
                self._version += 1
                self._wake.notify_all()
                return True
        return False

    def snapshot(self) -> WorkerState:
        with self._lock:
            live = self._live
            now = time.monotonic()
            elapsed = 0.0
            if live.started is not None:
                elapsed = (live.ended if live.ended is not None else now) - live.started
            return WorkerState(
                status=live.status, status_text=live.status_text, key=live.key, job_id=live.job_id,
                job_dir=live.job_dir, description=live.description, stage=live.stage,
                section=live.section, sections=live.sections, step=live.step, steps=live.steps,
                computed=live.computed, sections_done=live.sections_done, elapsed_s=elapsed, eta_s=self._eta(live, now),
                preview_rgb=live.preview_rgb, partial_video=live.partial_video, final_video=live.final_video,
                error=live.error, notices=live.notices,
                queue=tuple(QueuedJob(t.key, t.kind, t.description) for t in self._queue),
                version=self._version, preview_frame_width=live.preview_frame_width,
            )

    def outcome(self, key: str) -> JobOutcome | None:
        """How ticket `key` ended, or None while it is queued or running (or unknown)."""
        with self._lock:
            return self._outcomes.get(key)

    def recent_outcomes(self, limit: int = 10) -> list[JobOutcome]:
        """How the last `limit` tickets ended, newest first."""
        with self._lock:
            return list(reversed(self._outcomes.values()))[:limit]

    def wait(self, key: str, timeout: float | None = None) -> JobOutcome | None:
        """Block until ticket `key` has ended (tests, scripts); None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            while key not in self._outcomes:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._wake.wait(remaining if remaining is not None else 1.0)
            return self._outcomes[key]

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            while self._current is not None or self._queue:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._wake.wait(remaining if remaining is not None else 1.0)
            return True

    @property
    def busy_dirs(self) -> set[Path]:
        """Job folders that are running or queued for resume (list_jobs must not call them interrupted)."""
        with self._lock:
            return self._busy_dirs_locked()

    def _busy_dirs_locked(self) -> set[Path]:
        dirs = {self._ticket_dir(t) for t in ([self._current] if self._current else []) + list(self._queue)}
        if self._current is not None and self._live.job_dir is not None:
            dirs.add(self._live.job_dir.resolve())
        return {d for d in dirs if d is not None}

    def shutdown(self, timeout: float = 10.0) -> None:
        """Drop the queue, stop the running job (it keeps its finished sections) and end the thread."""
        with self._wake:
            self._closed = True
            for ticket in self._queue:
                self._remember(JobOutcome(ticket.key, "removed", None, None, None, None))
            self._queue.clear()
            if self._current is not None and self._current.cancel is not None:
                self._current.cancel.cancel()
            self._version += 1
            self._wake.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ----- internals ---------------------------------------------------------------------------

    def _new_key(self) -> str:
        return f"job-{next(self._counter)}"

    @staticmethod
    def _ticket_dir(ticket: _Ticket) -> Path | None:
        return ticket.job_dir.resolve() if ticket.job_dir is not None else None

    def _enqueue(self, ticket: _Ticket) -> str:
        with self._wake:
            if self._closed:
                raise InputError("The app is shutting down; start the job again after restarting it.")
            # Checked under the same lock as the append: two Resume clicks cannot both get in.
            if ticket.job_dir is not None and self._ticket_dir(ticket) in self._busy_dirs_locked():
                raise InputError("This job is already running or waiting in the queue.")
            self._queue.append(ticket)
            # A resume reuses its job's id as the key: the earlier run's outcome is not this one's.
            self._outcomes.pop(ticket.key, None)
            self._version += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="framepack-worker", daemon=True)
                self._thread.start()
            self._wake.notify_all()
        return ticket.key

    def _remember(self, outcome: JobOutcome) -> None:
        self._outcomes[outcome.key] = outcome
        while len(self._outcomes) > _MAX_OUTCOMES:
            self._outcomes.popitem(last=False)

    @staticmethod
    def _eta(live: _Live, now: float) -> float | None:
        if live.status not in ("running", "stopping") or not live.steps_timed or not live.steps:
            return None
        average = live.step_time_total / live.steps_timed
        remaining_steps = (live.sections - live.section) * live.steps + (live.steps - live.step)
        since_last = now - live.last_step_at if live.last_step_at is not None else 0.0
        return max(0.0, average * remaining_steps - since_last)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                ticket = self._queue.popleft()
                ticket.cancel = CancelToken()
                self._current = ticket
                self._live = _Live(status="running", status_text="Starting…", key=ticket.key,
                                   description=ticket.description, started=time.monotonic(),
                                   job_dir=ticket.job_dir)
                self._version += 1
            try:
                outcome = self._run_ticket(ticket)
            except Exception:  # noqa: BLE001 - a slip in our own bookkeeping must not end the thread
                logger.exception("%s: the worker could not finish its bookkeeping", ticket.key)
                outcome = JobOutcome(ticket.key, "failed", None, None, None,
                                     "The job failed unexpectedly (internal error); the finished sections are kept.")
            with self._wake:
                self._remember(outcome)
                self._current = None
                self._version += 1
                self._wake.notify_all()

    def _run_ticket(self, ticket: _Ticket) -> JobOutcome:
        """Run one job to its end; never raises (the thread must survive every job)."""
        error = None
        result = None
        try:
            if self._engine is None:
                self._engine = self._engine_factory()
            if ticket.kind == "resume":
                kwargs = {"overrides": ticket.overrides} if ticket.overrides else {}
                result = self._engine.resume(ticket.job_dir, on_event=self._on_event, cancel=ticket.cancel, **kwargs)
            else:
                result = self._engine.generate(ticket.params, on_event=self._on_event, cancel=ticket.cancel)
            status = getattr(result, "status", "done")
        except Cancelled:
            status = "stopped"  # the engine normally returns "stopped" itself; this covers early stops
        except FramePackError as exc:
            status, error = "failed", str(exc)
            logger.info("%s failed: %s", ticket.key, error)
        except Exception as exc:  # noqa: BLE001 - the worker thread must survive any job (OOM included)
            status, error = "failed", failure_sentence(exc)
            logger.exception("%s failed unexpectedly", ticket.key)
        return self._finish(ticket, status, result, error)

    def _finish(self, ticket: _Ticket, status: str, result: Any, error: str | None) -> JobOutcome:
        with self._lock:
            live = self._live
            job_dir = getattr(result, "job_dir", None) or live.job_dir
            job_id = getattr(result, "job_id", None) or live.job_id
            video = getattr(result, "video_path", None)
            if video is None and status != "failed":
                video = live.final_video or live.partial_video
            live.status = status
            live.job_dir = Path(job_dir) if job_dir is not None else None
            live.job_id = job_id
            live.ended = time.monotonic()
            live.error = error
            if status == "done":
                live.final_video = Path(video) if video is not None else live.final_video
                live.sections_done = max(live.sections_done, live.sections)
                live.status_text = "Done."
            elif status == "stopped":
                live.status_text = ("Stopped; the video so far is kept." if live.sections_done
                                    else "Stopped before the first section was finished.")
            else:
                live.status_text = error or "The job failed."
            self._version += 1
        if status == "failed" and job_dir is not None:
            _mark_failed(Path(job_dir), error or "")
        return JobOutcome(ticket.key, status, job_id, Path(job_dir) if job_dir is not None else None,
                          Path(video) if video is not None else None, error)

    def _on_event(self, event: Event) -> None:
        # Called on the worker thread by the engine; a bookkeeping slip must never break the job.
        try:
            self._apply(event)
        except Exception:  # noqa: BLE001
            logger.exception("could not record a progress event")

    def _apply(self, event: Event) -> None:
        now = time.monotonic()
        with self._lock:
            live = self._live
            if isinstance(event, StepProgress):
                base = live.last_step_at if live.last_step_at is not None else live.sampling_base
                if base is not None:
                    live.step_time_total += now - base
                    live.steps_timed += 1
                live.last_step_at = now
                live.section, live.sections = event.section, event.sections
                live.step, live.steps, live.computed = event.step, event.steps, event.computed
                live.preview_rgb = event.preview_rgb
            elif isinstance(event, SectionFinished):
                live.sections_done = event.section
                live.sections = event.sections
                live.partial_video = Path(event.video_path)
            elif isinstance(event, StageChanged):
                live.stage = event.stage
                if live.status == "running":
                    live.status_text = event.message
                if event.stage == "sampling" and live.sampling_base is None:
                    live.sampling_base = now
            elif isinstance(event, JobStarted):
                live.job_id, live.job_dir = event.job_id, Path(event.job_dir)
                live.sections, live.steps = event.sections, event.steps
                live.preview_frame_width = event.width // 8  # the VAE's spatial factor
            elif isinstance(event, Notice):
                live.notices = (live.notices + (event.message,))[-_MAX_NOTICES:]
            elif isinstance(event, JobFinished):
                live.job_dir = Path(event.job_dir)
                if event.status == "done" and event.video_path is not None:
                    live.final_video = Path(event.video_path)
            else:
                return
            self._version += 1


def _mark_failed(job_dir: Path, error: str) -> None:
    """Record the failure in job.json when the engine left it saying "running" (so history shows it)."""
    try:
        record = store.read_record(job_dir)
        if record.get("status") == "running":
            record.update(status="failed", error=error)
            store.write_record(job_dir, record)
    except Exception:  # noqa: BLE001 - a missing or broken record must not break the worker
        logger.debug("could not mark %s as failed", job_dir, exc_info=True)
