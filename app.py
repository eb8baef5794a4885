"""FramePack Local page (Gradio 6): layout, widgets -> JobParams, worker snapshots -> updates.

Only UI lives here (and all of the project's HTML). Jobs run in `framepack_local.worker.Worker`,
which belongs to no browser tab: the page polls its snapshot once a second, so closing the tab
stops nothing and a page opened later shows the running job (DESIGN.md section 5).

    python app.py [--port 7860] [--models DIR] [--outputs DIR] [--listen] [--demo] [--no-browser]
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import math
import os
import random
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from framepack_local import schedule  # noqa: E402
from framepack_local.errors import FramePackError, InputError  # noqa: E402
from framepack_local.models import PARTS, missing_parts  # noqa: E402
from framepack_local.params import (  # noqa: E402
    APP_ROOT, DEFAULT_MODELS, DEFAULT_OUTPUTS, MAX_RESOLUTION, MAX_STEPS, MAX_WINDOW, MEMORY_PROFILES, MIN_RESOLUTION,
    JobParams,
)
from framepack_local.worker import JobSummary, Worker, WorkerState, list_jobs  # noqa: E402

logger = logging.getLogger("framepack_local.app")

DEMO_MODELS = APP_ROOT / "models-demo"
MAX_UPLOAD = "50mb"  # photos are far smaller; bigger uploads are refused by the page with a sentence
MAX_UPLOAD_TEXT = "50 MB"
POLL_SECONDS = 1.0
HISTORY_LIMIT = 60
MIN_SECONDS_UI, MAX_SECONDS_UI = 1, 120
RANDOM_SEED_MAX = 2**31 - 1  # stays exact in the browser's JavaScript numbers
DEFAULTS = JobParams(image="")
MAX_KEEP_FREE_GB = 128
MEMORY_LABELS = {
    "auto": "auto (plan from this machine)",
    "bf16": "bf16: transformer in RAM, exact",
    "fp8": "fp8: half the RAM",
    "disk": "disk: least RAM (memory-mapped)",
}

# Form fields in the order of the Start endpoint's inputs (also what "reuse settings" fills).
FORM_FIELDS = (
    "image", "end_image", "prompt", "seconds", "seed", "steps", "distilled_cfg", "mode", "window", "cfg",
    "negative_prompt", "cfg_rescale", "resolution", "crf", "memory_profile", "keep_free_gb",
)

MODE_HELP = (
    "**Inverted anti-drift**: samples from the end of the video back to your photo, so long videos stay "
    "consistent (recommended).  \n"
    "**Forward (F1)**: samples forward in time from your photo; livelier motion, may drift in long videos "
    "(needs the F1 model)."
)


# ----- pure helpers (tested in-process) -------------------------------------------------------------


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    s = int(round(max(0.0, seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _size(num_bytes: float) -> str:
    if num_bytes >= 1e9:
        return f"{num_bytes / 1e9:.1f} GB"
    if num_bytes >= 1e6:
        return f"{num_bytes / 1e6:.0f} MB"
    return f"{num_bytes / 1e3:.0f} kB"


def length_line(seconds: Any, window: Any) -> str:
    """The live line under the length slider: frames and sections the request becomes."""
    try:
        seconds, window = float(seconds), int(window)
        if not (seconds > 0 and window >= 1):
            raise ValueError
    except (TypeError, ValueError):
        return "Choose a length and a window size."
    n = schedule.section_count(seconds, window)
    frames = schedule.total_frames(n, window)
    return (f"{frames} frames = {frames / schedule.FPS:.1f} s at {schedule.FPS} fps, "
            f"made in {n} section{'s' if n != 1 else ''} of {schedule.VAE_TEMPORAL * window} frames")


def _whole(label: str, value: Any, lo: int, hi: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{label} must be a whole number between {lo} and {hi}.") from None
    if not math.isfinite(number) or number != int(number):
        raise InputError(f"{label} must be a whole number between {lo} and {hi}.")
    return int(number)


def _real(label: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{label} must be a number.") from None
    if not math.isfinite(number):
        raise InputError(f"{label} must be a finite number.")
    return number


def form_to_params(values: dict, models_dir: Path, outputs_dir: Path) -> JobParams:
    """Form values (by FORM_FIELDS name) -> validated JobParams; InputError with one sentence otherwise."""
    image = values.get("image")
    if not image:
        raise InputError("Choose a start photo first: upload, drop or paste one into the Start photo box.")
    prompt = values.get("prompt") or ""
    negative = values.get("negative_prompt") or ""
    if not isinstance(prompt, str) or not isinstance(negative, str):
        raise InputError("The prompt must be text.")
    seed = values.get("seed")
    if seed is None or seed == "":
        raise InputError("Enter a seed (a whole number) or press Random.")
    kwargs: dict[str, Any] = dict(
        image=str(image),
        end_image=str(values["end_image"]) if values.get("end_image") else None,
        prompt=prompt.strip(),
        seconds=_real("The length", values.get("seconds", DEFAULTS.seconds)),
        seed=_whole("The seed", seed, 0, 2**63 - 1),
        steps=_whole("Steps", values.get("steps", DEFAULTS.steps), 1, MAX_STEPS),
        distilled_cfg=_real("Distilled CFG", values.get("distilled_cfg", DEFAULTS.distilled_cfg)),
        mode=str(values.get("mode") or DEFAULTS.mode),
        window=_whole("The window size", values.get("window", DEFAULTS.window), 1, MAX_WINDOW),
        cfg=_real("Real CFG", values.get("cfg", DEFAULTS.cfg)),
        negative_prompt=negative,
        cfg_rescale=_real("CFG rescale", values.get("cfg_rescale", DEFAULTS.cfg_rescale)),
        resolution=_whole("The resolution", values.get("resolution", DEFAULTS.resolution),
                          MIN_RESOLUTION, MAX_RESOLUTION),
        crf=_whole("The mp4 quality (CRF)", values.get("crf", DEFAULTS.crf), 0, 51),
        models=str(models_dir),
        outputs=str(outputs_dir),
    )
    if not MIN_SECONDS_UI <= kwargs["seconds"] <= MAX_SECONDS_UI:
        raise InputError(f"The length must be between {MIN_SECONDS_UI} and {MAX_SECONDS_UI} seconds.")
    kwargs["memory_profile"] = str(values.get("memory_profile") or DEFAULTS.memory_profile)
    keep_free = values.get("keep_free_gb")
    keep_free = DEFAULTS.keep_free_gb if keep_free is None or keep_free == "" else _real(
        "GPU memory to keep free", keep_free)
    if not 0 <= keep_free <= MAX_KEEP_FREE_GB:
        raise InputError(f"GPU memory to keep free must be between 0 and {MAX_KEEP_FREE_GB} GB (0 = automatic).")
    kwargs["keep_free_gb"] = keep_free
    return JobParams(**kwargs).validate()


def params_to_form(params: dict, job_dir: Path | None = None) -> dict:
    """A job record's params -> form values (the inverse of form_to_params, as far as the form goes)."""
    out = {}
    for name in FORM_FIELDS:
        if name in ("image", "end_image"):
            continue
        value = params.get(name, getattr(DEFAULTS, name))
        out[name] = value if value is not None else getattr(DEFAULTS, name)
    # The job folder's copy of the photo (cropped to its bucket) is what the page may serve; the
    # original upload may be gone. Cropping it again to the same bucket keeps it as it is.
    image = job_dir / "input.png" if job_dir is not None else None
    out["image"] = str(image) if image is not None and image.is_file() else None
    end = job_dir / "end_input.png" if job_dir is not None else None
    out["end_image"] = str(end) if end is not None and end.is_file() else None
    return out


def preview_html(rgb: np.ndarray | None, caption: str = "") -> str:
    """The latest latent preview as an inline PNG: nothing is written to disk for it, however long the job.

    The preview is latent-sized (1/8 of the video), so the browser enlarges it without smoothing.
    """
    if rgb is None:
        return '<div class="fpl-preview fpl-empty">The latest preview appears here while a job samples.</div>'
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<div class="fpl-preview"><img alt="latest latent preview" src="data:image/png;base64,{data}">'
            f'<div class="fpl-sub">{html.escape(caption)}</div></div>')


def progress_html(state: WorkerState | None) -> str:
    """The progress bar: section i/n, step j/m, elapsed, time left; or how the last job ended."""
    if state is None or state.status == "idle":
        return ('<div class="fpl-progress fpl-idle" data-status="idle">No job is running. Choose a photo, '
                "describe what should happen and press Start.</div>")
    esc = html.escape
    pct = 100.0 * state.fraction
    line2 = esc(state.description)
    if state.running:
        if state.sections and state.step:
            head = (f"<b>Section {state.section} of {state.sections}</b> · step {state.step} of {state.steps}"
                    f" · {_clock(state.elapsed_s)} elapsed · "
                    + (f"about {_clock(state.eta_s)} left" if state.eta_s is not None else "estimating time left…"))
        else:
            head = f"<b>{esc(state.status_text)}</b> · {_clock(state.elapsed_s)} elapsed"
        sub = esc(state.status_text) if state.sections and state.step else ""
        if state.status == "stopping":
            sub = "Stopping after the current step…"
        body = f'<div class="fpl-line">{head}</div>'
        body += f'<div class="fpl-bar"><div class="fpl-fill" style="width:{pct:.1f}%"></div></div>'
        body += f'<div class="fpl-sub">{esc(sub)}{" — " if sub else ""}{line2}</div>'
    elif state.status == "done":
        body = (f'<div class="fpl-line"><b>Done</b> · {state.sections} section{"s" if state.sections != 1 else ""}'
                f" in {_clock(state.elapsed_s)}</div>"
                '<div class="fpl-bar"><div class="fpl-fill" style="width:100%"></div></div>'
                f'<div class="fpl-sub">{line2}</div>')
    elif state.status == "stopped":
        kept = (f"after {state.sections_done} of {state.sections} sections; the video so far is kept"
                if state.sections_done else "before the first section was finished")
        body = (f'<div class="fpl-line"><b>Stopped</b> {kept} · {_clock(state.elapsed_s)}</div>'
                f'<div class="fpl-bar"><div class="fpl-fill fpl-muted" style="width:{pct:.1f}%"></div></div>'
                f'<div class="fpl-sub">{line2}</div>')
    else:
        body = (f'<div class="fpl-line fpl-error"><b>Failed:</b> {esc(state.error or state.status_text)}</div>'
                f'<div class="fpl-sub">{line2}</div>')
    notices = "".join(f'<div class="fpl-notice">{esc(n)}</div>' for n in state.notices)
    return (f'<div class="fpl-progress" data-status="{esc(state.status)}" data-job="{esc(state.job_id or "")}">'
            f"{body}{notices}</div>")


def queue_html(state: WorkerState) -> str:
    if not state.queue:
        return '<div class="fpl-queue fpl-empty">The queue is empty; press Start while a job runs to add one.</div>'
    rows = "".join(
        f"<tr><td>{i}</td><td>{html.escape(q.key)}</td><td>{html.escape(q.description)}</td></tr>"
        for i, q in enumerate(state.queue, 1)
    )
    return (f'<table class="fpl-queue"><thead><tr><th>#</th><th>ticket</th><th>job</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>")


def queue_choices(state: WorkerState) -> list[tuple[str, str]]:
    return [(f"#{i} {q.description}", q.key) for i, q in enumerate(state.queue, 1)]


def _date(created: str) -> str:
    return created[:16].replace("T", " ") if created else "unknown date"


def history_caption(job: JobSummary) -> str:
    prompt = job.prompt if len(job.prompt) <= 40 else job.prompt[:39] + "…"
    length = f"{job.seconds:g} s" if job.seconds is not None else "? s"
    return f"{prompt or '(no prompt)'} · {length} · {_date(job.created)} · {job.status}"


def history_details(job: JobSummary | None) -> str:
    if job is None:
        return "Select a past job to see it here."
    esc = html.escape
    lines = [
        f"**{esc(job.prompt) or '(no prompt)'}**",
        f"{job.seconds:g} s · {_date(job.created)} · **{job.status}**" if job.seconds is not None
        else f"{_date(job.created)} · **{job.status}**",
        f"sections done: {job.sections_done}" + (f" of {job.sections}" if job.sections else ""),
        f"folder: `{job.job_dir}`",
    ]
    if job.error:
        lines.append(f"error: {esc(job.error)}")
    if job.resumable:
        lines.append("This job can be resumed from its last finished section.")
    return "  \n".join(lines)


def header_html(demo: bool, listen: bool) -> str:
    parts = ['<div class="fpl-header"><h1>FramePack Local</h1>'
             "<p>One photo in, a long video out: drop a photo, say what should happen, choose a length, "
             "press Start. A preview appears after every step and a playable video after every section.</p></div>"]
    if demo:
        parts.append('<div class="fpl-banner fpl-demo" id="demo_banner">Demo mode: this runs a tiny random '
                     "model, so every video is noise. Use it to try the page, not to judge results.</div>")
    if listen:
        parts.append('<div class="fpl-banner fpl-warn" id="listen_banner">This page is open to your network '
                     "(--listen): anyone who can reach this computer can run jobs and see your videos.</div>")
    return "".join(parts)


def models_report(models_dir: Path, mode: str = "inverted") -> tuple[bool, str]:
    """(complete, markdown) for the model panel."""
    missing = missing_parts(models_dir, mode)
    if not missing:
        return True, f"Models: `{models_dir}` is complete."
    total = sum(PARTS[name].approx_bytes for name in missing)
    listed = ", ".join(f"{name} ({_size(PARTS[name].approx_bytes)})" for name in missing)
    where = "does not exist" if not Path(models_dir).is_dir() else "is incomplete"
    return False, (f"**The model folder `{models_dir}` {where}.** Missing: {listed} — about **{_size(total)}** "
                   "to download. Press Download below, or point at a folder that already has the models.")


def download_html(progress: Any, running: bool, error: str | None, finished: bool) -> str:
    if error:
        return f'<div class="fpl-download fpl-error">{html.escape(error)}</div>'
    if progress is None:
        return ('<div class="fpl-download">Starting the download…</div>' if running else "")
    pct = 100.0 * progress.fraction
    speed = f"{_size(progress.bytes_per_second)}/s" if progress.bytes_per_second else "measuring speed…"
    left = f"about {_clock(progress.eta_seconds)} left" if progress.eta_seconds is not None else ""
    head = "Download finished." if finished else (
        f"{_size(progress.bytes_done)} of {_size(progress.bytes_total)} · {speed}" + (f" · {left}" if left else ""))
    current = html.escape(progress.current_file or "") if not finished else ""
    return (f'<div class="fpl-download"><div class="fpl-line">{head}</div>'
            f'<div class="fpl-bar"><div class="fpl-fill" style="width:{pct:.1f}%"></div></div>'
            f'<div class="fpl-sub">{current}</div></div>')


def system_html(models_dir: Path, outputs_dir: Path) -> str:
    """GPU, VRAM, RAM and free disk; the memory plan once framepack_local.memory offers one."""
    rows: list[tuple[str, str]] = []
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            rows.append(("GPU", torch.cuda.get_device_name(0)))
            rows.append(("GPU memory", f"{_size(free)} free of {_size(total)}"))
        else:
            rows.append(("GPU", "none found (runs on the CPU: only practical with the tiny demo model)"))
    except Exception as exc:  # noqa: BLE001 - a broken driver must not break the page
        rows.append(("GPU", f"could not be queried ({type(exc).__name__})"))
    try:
        import psutil

        vm = psutil.virtual_memory()
        rows.append(("RAM", f"{_size(vm.available)} available of {_size(vm.total)}"))
    except Exception:  # noqa: BLE001
        rows.append(("RAM", "unknown"))
    for label, folder in (("Disk (outputs)", outputs_dir), ("Disk (models)", models_dir)):
        probe = Path(folder)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            rows.append((label, f"{_size(shutil.disk_usage(probe).free)} free ({folder})"))
        except OSError:
            rows.append((label, f"unknown ({folder})"))
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    plan = memory_plan_text(models_dir, outputs_dir)
    if plan:
        body += (f'<tr><th>Memory plan<br><small>(default job)</small></th>'
                 f'<td><pre class="fpl-plan">{html.escape(plan)}</pre></td></tr>')
    return f'<table class="fpl-system">{body}</table>'


def memory_plan_text(models_dir: Path, outputs_dir: Path) -> str | None:
    """The memory plan ("auto") for a default-size job on this machine; None before the models are there."""
    if missing_parts(models_dir, "inverted"):
        return None
    try:
        from framepack_local import memory

        facts = memory.probe(outputs_dir)
        sizes = memory.model_sizes_from_folder(models_dir, "inverted")
        return memory.plan(facts, sizes, memory.JobShape(), "auto", None).table()
    except Exception as exc:  # noqa: BLE001 - the panel is informative; it must not break the page
        logger.debug("memory plan failed", exc_info=True)
        return f"not available ({type(exc).__name__})"


# ----- model download in the background ---------------------------------------------------------------


class DownloadManager:
    """Runs framepack_local.download.download_models on a thread; the page polls its state."""

    def __init__(self, hub: Any = None) -> None:
        self._hub = hub
        self._lock = threading.Lock()
        self.progress = None
        self.error: str | None = None
        self.running = False
        self.finished = False
        self.version = 0
        self._thread: threading.Thread | None = None

    def start(self, models_dir: Path, variant: str = "inverted") -> bool:
        with self._lock:
            if self.running:
                return False
            self.running, self.finished, self.error, self.progress = True, False, None, None
            self.version += 1
            self._thread = threading.Thread(target=self._run, args=(Path(models_dir), variant),
                                            name="framepack-download", daemon=True)
            self._thread.start()
        return True

    def _on_progress(self, progress) -> None:
        with self._lock:
            self.progress = progress
            self.version += 1

    def _run(self, models_dir: Path, variant: str) -> None:
        from framepack_local.download import download_models

        error = None
        try:
            download_models(models_dir, variant, on_progress=self._on_progress, hub=self._hub)
        except FramePackError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - one sentence, never a traceback in the page
            logger.exception("model download failed")
            error = f"The download failed unexpectedly ({type(exc).__name__}); run it again to resume."
        with self._lock:
            self.running, self.error, self.finished = False, error, error is None
            self.version += 1

    def snapshot(self) -> tuple[Any, bool, str | None, bool, int]:
        with self._lock:
            return self.progress, self.running, self.error, self.finished, self.version

    def wait(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)


# ----- the page's handlers ----------------------------------------------------------------------------------

POLL_OUTPUTS = (
    "progress", "preview", "partial_video", "final_video", "queue_table", "queue_pick", "stop_btn",
    "gallery", "history_pick", "history_ids", "models_md", "models_group", "download_html", "shown",
)


def _warn(message: str) -> None:
    try:
        gr.Warning(message)
    except Exception:  # noqa: BLE001 - outside a request (tests) there is nowhere to show it
        logger.warning("%s", message)


@dataclass
class Page:
    """State shared by every tab: the worker, the folders, the download. Handlers are its methods."""

    worker: Worker
    models_dir: Path
    outputs_dir: Path
    demo: bool = False
    listen: bool = False
    downloads: DownloadManager | None = None

    def __post_init__(self) -> None:
        self.models_dir = Path(self.models_dir)
        self.outputs_dir = Path(self.outputs_dir)
        if self.downloads is None:
            self.downloads = DownloadManager()

    # --- jobs ---

    def start(self, image, end_image, prompt, seconds, seed, steps, distilled_cfg, mode, window, cfg,
              negative_prompt, cfg_rescale, resolution, crf, memory_profile, keep_free_gb) -> tuple[str, str]:
        """Queue a job from the form. Returns (message, ticket); the ticket is "" when refused."""
        values = dict(zip(FORM_FIELDS, (image, end_image, prompt, seconds, seed, steps, distilled_cfg, mode,
                                        window, cfg, negative_prompt, cfg_rescale, resolution, crf,
                                        memory_profile, keep_free_gb)))
        try:
            params = form_to_params(values, self.models_dir, self.outputs_dir)
            complete, _ = models_report(self.models_dir, params.mode)
            if not complete:
                missing = ", ".join(missing_parts(self.models_dir, params.mode))
                raise InputError(f"The model folder {self.models_dir} lacks {missing}; download the models "
                                 "(panel at the top) or point at a folder that has them.")
            from framepack_local.images import load_image

            load_image(params.image, what="start photo")  # a bad photo is refused now, not when its turn comes
            if params.end_image:
                load_image(params.end_image, what="end frame")
            before = self.worker.snapshot()
            key = self.worker.submit(params)
        except FramePackError as exc:
            _warn(str(exc))
            return f"⚠️ {exc}", ""
        except Exception as exc:  # noqa: BLE001 - the server stays up and the page gets one sentence
            logger.exception("start failed")
            message = f"The job could not be started ({type(exc).__name__}); see the log for details."
            _warn(message)
            return f"⚠️ {message}", ""
        if before.running or before.queue:
            position = next((i for i, q in enumerate(self.worker.snapshot().queue, 1) if q.key == key), 1)
            return f"Queued as {key} (number {position} in the queue).", key
        return f"Started {key}.", key

    def stop(self) -> str:
        state = self.worker.snapshot()
        if not state.running or state.key is None:
            return "Nothing is running."
        self.worker.stop(state.key)
        return "Stopping after the current step; the finished sections are kept."

    def remove_queued(self, key: str | None) -> str:
        if not key:
            return "Choose a queued job to remove first."
        if self.worker.remove(key):
            return f"Removed {key} from the queue."
        _warn(f"{key} is no longer in the queue.")
        return f"⚠️ {key} is no longer in the queue (it may have started already)."

    def _job_dir(self, job_id: str | None) -> Path:
        if not job_id:
            raise InputError("Choose a past job first.")
        job_dir = (self.outputs_dir / str(job_id)).resolve()
        if job_dir.parent != self.outputs_dir.resolve() or not (job_dir / "job.json").is_file():
            raise InputError(f"There is no job {job_id} in {self.outputs_dir}.")
        return job_dir

    def _summary(self, job_id: str | None) -> JobSummary | None:
        if not job_id:
            return None
        for job in list_jobs(self.outputs_dir, busy=self.worker.busy_dirs):
            if job.job_id == job_id or job.job_dir.name == job_id:
                return job
        return None

    def resume(self, job_id: str | None, memory_profile: str | None = None, keep_free_gb: float | None = None) -> str:
        """Resume with the form's current memory settings (the fix after an out-of-memory error)."""
        overrides = {}
        if memory_profile:
            overrides["memory_profile"] = str(memory_profile)
        if keep_free_gb not in (None, ""):
            overrides["keep_free_gb"] = float(keep_free_gb)
        try:
            key = self.worker.resume(self._job_dir(job_id), overrides)
        except FramePackError as exc:
            _warn(str(exc))
            return f"⚠️ {exc}"
        return f"Resuming {job_id} as {key}."

    def reuse(self, job_id: str | None) -> tuple:
        """Form values from a past job's job.json (in FORM_FIELDS order), plus a message."""
        try:
            job_dir = self._job_dir(job_id)
            record = json.loads((job_dir / "job.json").read_text(encoding="utf-8"))
            params = record.get("params") if isinstance(record.get("params"), dict) else {}
        except FramePackError as exc:
            _warn(str(exc))
            return tuple(gr.skip() for _ in FORM_FIELDS) + (f"⚠️ {exc}",)
        except (OSError, ValueError):
            message = f"The record of job {job_id} cannot be read."
            _warn(message)
            return tuple(gr.skip() for _ in FORM_FIELDS) + (f"⚠️ {message}",)
        form = params_to_form(params, job_dir)
        return tuple(form[name] for name in FORM_FIELDS) + (f"Settings of {job_id} are in the form.",)

    def history(self) -> tuple[Any, Any, list[str]]:
        """(gallery items, job dropdown update, job ids in gallery order)."""
        jobs = list_jobs(self.outputs_dir, busy=self.worker.busy_dirs, limit=HISTORY_LIMIT)
        shown = [j for j in jobs if j.thumbnail is not None]
        items = [(str(j.thumbnail), history_caption(j)) for j in shown]
        choices = [(history_caption(j), j.job_id) for j in jobs]
        return items, gr.update(choices=choices), [j.job_id for j in shown]

    def select_history(self, job_id: str | None) -> tuple[str, Any, Any, Any]:
        """(details markdown, its video, resume button, reuse button) for a chosen past job."""
        job = self._summary(job_id)
        video = str(job.video) if job is not None and job.video is not None and job.video.is_file() else None
        return (history_details(job), video, gr.update(interactive=bool(job and job.resumable)),
                gr.update(interactive=job is not None))

    def gallery_select(self, ids: list[str], evt: gr.SelectData) -> Any:
        try:
            return ids[evt.index]
        except (IndexError, TypeError):
            return gr.skip()

    def status(self) -> dict:
        """Plain-data snapshot for API clients."""
        s = self.worker.snapshot()
        return {
            "status": s.status, "status_text": s.status_text, "key": s.key, "job_id": s.job_id,
            "job_dir": str(s.job_dir) if s.job_dir else None, "section": s.section, "sections": s.sections,
            "step": s.step, "steps": s.steps, "sections_done": s.sections_done, "elapsed_s": s.elapsed_s,
            "eta_s": s.eta_s, "partial_video": str(s.partial_video) if s.partial_video else None,
            "final_video": str(s.final_video) if s.final_video else None, "error": s.error,
            "queue": [{"key": q.key, "kind": q.kind, "description": q.description} for q in s.queue],
            "recent": [{"key": o.key, "status": o.status, "job_id": o.job_id, "error": o.error}
                       for o in self.worker.recent_outcomes()],
        }

    # --- models ---

    def models_panel(self) -> tuple[str, Any]:
        complete, text = models_report(self.models_dir)
        return text, gr.update(visible=not complete)

    def start_download(self, variant: str) -> tuple[str, str]:
        if self.downloads.start(self.models_dir, variant or "inverted"):
            return "Download started.", download_html(None, True, None, False)
        return "A download is already running.", gr.skip()

    def use_models_folder(self, folder: str | None) -> tuple[str, str, Any]:
        folder = (folder or "").strip()
        if not folder:
            return "⚠️ Enter the path of a model folder first.", gr.skip(), gr.skip()
        path = Path(folder).expanduser()
        complete, text = models_report(path)
        if not complete:
            _warn(f"{path} is not a complete model folder.")
            return f"⚠️ {path} is not a complete model folder; it lacks {', '.join(missing_parts(path, 'inverted'))}.", \
                gr.skip(), gr.skip()
        self.models_dir = path
        return f"Using the models in {path}.", text, gr.update(visible=False)

    def system(self) -> str:
        return system_html(self.models_dir, self.outputs_dir)

    # --- polling ---

    def poll(self, shown: dict | None) -> tuple:
        """Everything that changed since this tab's last poll; gr.skip() for the rest."""
        shown = dict(shown or {})
        out: dict[str, Any] = {name: gr.skip() for name in POLL_OUTPUTS}
        try:
            self._poll_into(shown, out)
        except Exception:  # noqa: BLE001 - a polling slip must never surface as a traceback
            logger.exception("poll failed")
        out["shown"] = shown
        return tuple(out[name] for name in POLL_OUTPUTS)

    def _poll_into(self, shown: dict, out: dict) -> None:
        state = self.worker.snapshot()
        if shown.get("key") != state.key:
            # another job is on display now: clear what belonged to the previous one
            shown.update(key=state.key, preview=None, partial=None, final=None)
            out["preview"] = preview_html(None)
            out["partial_video"] = None
            out["final_video"] = None

        progress = progress_html(state)
        if progress != shown.get("progress"):
            out["progress"] = shown["progress"] = progress

        preview_sig = [state.section, state.step] if state.preview_rgb is not None else None
        if preview_sig != shown.get("preview"):
            out["preview"] = preview_html(state.preview_rgb, f"Latest preview: section {state.section} of "
                                                             f"{state.sections}, step {state.step} of {state.steps}")
            shown["preview"] = preview_sig

        partial = state.partial_video
        partial_sig = [str(partial), state.sections_done] if partial is not None and partial.is_file() else None
        if partial_sig is not None and partial_sig != shown.get("partial") and state.final_video is None:
            out["partial_video"] = str(partial)
            shown["partial"] = partial_sig

        final = state.final_video
        final_sig = str(final) if final is not None and final.is_file() else None
        if final_sig is not None and final_sig != shown.get("final"):
            out["final_video"] = final_sig
            shown["final"] = final_sig

        if state.running != shown.get("running"):
            out["stop_btn"] = gr.update(interactive=state.running)
            shown["running"] = state.running

        queue_sig = [[q.key, q.description] for q in state.queue]
        if queue_sig != shown.get("queue"):
            out["queue_table"] = queue_html(state)
            out["queue_pick"] = gr.update(choices=queue_choices(state), value=None)
            shown["queue"] = queue_sig

        history_sig = [state.key, state.job_id, state.status]
        if history_sig != shown.get("history"):
            out["gallery"], out["history_pick"], out["history_ids"] = self.history()
            shown["history"] = history_sig

        progress_dl, running, error, finished, version = self.downloads.snapshot()
        if version != shown.get("download", 0):
            out["download_html"] = download_html(progress_dl, running, error, finished)
            shown["download"] = version
            if finished:
                out["models_md"], out["models_group"] = self.models_panel()


# ----- layout -------------------------------------------------------------------------------------------------

CSS = """
.fpl-header h1 { margin: 0 0 .2em 0; font-size: 1.6em; }
.fpl-header p { margin: 0; opacity: .8; }
.fpl-banner { padding: .6em .9em; border-radius: 8px; margin-top: .5em; font-weight: 600; }
.fpl-demo { background: #fff4d6; color: #6b4d00; border: 1px solid #f0c850; }
.fpl-warn { background: #ffe1e1; color: #7a0000; border: 1px solid #f08080; }
.fpl-progress { padding: .7em .9em; border-radius: 8px; border: 1px solid var(--border-color-primary); }
.fpl-idle { opacity: .75; }
.fpl-line { margin-bottom: .35em; }
.fpl-sub { font-size: .9em; opacity: .75; margin-top: .3em; }
.fpl-bar { height: 12px; border-radius: 6px; background: var(--background-fill-secondary); overflow: hidden; }
.fpl-fill { height: 100%; background: var(--color-accent); transition: width .5s ease; }
.fpl-fill.fpl-muted { background: #9aa0a6; }
.fpl-error { color: #b00020; }
.fpl-notice { font-size: .9em; margin-top: .3em; color: #6b4d00; }
table.fpl-queue, table.fpl-system { width: 100%; border-collapse: collapse; font-size: .9em; }
table.fpl-queue td, table.fpl-queue th, table.fpl-system td, table.fpl-system th {
  text-align: left; padding: .25em .5em; border-bottom: 1px solid var(--border-color-primary); }
.fpl-empty { opacity: .7; font-size: .9em; }
pre.fpl-plan { font-size: .8em; margin: 0; white-space: pre; overflow-x: auto; }
.fpl-preview img { width: 100%; height: 200px; object-fit: contain; image-rendering: pixelated;
  background: var(--background-fill-secondary); border-radius: 6px; }
#stop_btn:not(:disabled) { background: #d93025; border-color: #d93025; color: #fff; }
"""


def make_theme():
    # System fonts only: the page must not reach out to a font service (offline machines, privacy).
    return gr.themes.Soft(primary_hue="indigo", font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


def build_app(worker: Worker, models_dir: Path, outputs_dir: Path, demo: bool = False, *, listen: bool = False,
              downloads: DownloadManager | None = None) -> gr.Blocks:
    """The page. Nothing runs until it is launched; `app.page` holds the handlers' shared state."""
    page = Page(worker, Path(models_dir), Path(outputs_dir), demo=demo, listen=listen, downloads=downloads)
    complete, models_text = models_report(page.models_dir)
    hidden = dict(show_progress="hidden")
    private = dict(show_progress="hidden", api_visibility="private")

    with gr.Blocks(title="FramePack Local", delete_cache=(1800, 6 * 3600), analytics_enabled=False) as app:
        shown = gr.State({})
        history_ids = gr.State([])
        gr.HTML(header_html(demo, listen), elem_id="header")

        with gr.Group(visible=not complete, elem_id="models_panel") as models_group:
            models_md = gr.Markdown(models_text, elem_id="models_md")
            with gr.Row():
                variant = gr.Radio([("Inverted anti-drift (default)", "inverted"), ("Forward (F1)", "forward"),
                                    ("Both", "both")], value="inverted", label="Models to download", scale=3)
                download_btn = gr.Button("Download", variant="primary", elem_id="download_btn", scale=1)
            download_box = gr.HTML("", elem_id="download_progress")
            with gr.Row():
                folder_box = gr.Textbox(label="…or use an existing model folder", placeholder="/path/to/models",
                                        scale=3, elem_id="models_folder")
                folder_btn = gr.Button("Use this folder", scale=1)

        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                with gr.Row():
                    image = gr.Image(label="Start photo", sources=["upload", "clipboard"],
                                     type="filepath", image_mode=None, height=260, elem_id="start_image")
                    end_image = gr.Image(label="End frame (optional)", sources=["upload", "clipboard"],
                                         type="filepath", image_mode=None, height=260, elem_id="end_image")
                prompt = gr.Textbox(label="What should happen", lines=2, elem_id="prompt",
                                    placeholder="The girl dances gracefully, with clear movements, full of charm.")
                seconds = gr.Slider(MIN_SECONDS_UI, MAX_SECONDS_UI, value=DEFAULTS.seconds, step=0.1,
                                    label="Length (seconds)", elem_id="seconds")
                length_md = gr.Markdown(length_line(DEFAULTS.seconds, DEFAULTS.window), elem_id="length_line")
                with gr.Row(equal_height=True):
                    seed = gr.Number(value=DEFAULTS.seed, precision=0, minimum=0, label="Seed", elem_id="seed",
                                     scale=3)
                    random_btn = gr.Button("Random seed", size="sm", elem_id="random_seed", scale=1, min_width=80)
                steps = gr.Slider(1, MAX_STEPS, value=DEFAULTS.steps, step=1, label="Steps", elem_id="steps")
                distilled_cfg = gr.Slider(1, 32, value=DEFAULTS.distilled_cfg, step=0.1, label="Distilled CFG",
                                          elem_id="distilled_cfg")
                with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                    mode = gr.Radio([("Inverted anti-drift", "inverted"), ("Forward (F1)", "forward")],
                                    value=DEFAULTS.mode, label="Mode", elem_id="mode")
                    gr.Markdown(MODE_HELP)
                    window = gr.Slider(1, MAX_WINDOW, value=DEFAULTS.window, step=1,
                                       label="Latent window size (frames per section = 4 × window)",
                                       elem_id="window")
                    cfg = gr.Slider(1, 32, value=DEFAULTS.cfg, step=0.1, label="Real CFG (1 = off, faster)",
                                    elem_id="cfg")
                    negative_prompt = gr.Textbox(label="Negative prompt (used when real CFG > 1)",
                                                 elem_id="negative_prompt")
                    cfg_rescale = gr.Slider(0, 1, value=DEFAULTS.cfg_rescale, step=0.01, label="CFG rescale",
                                            elem_id="cfg_rescale")
                    resolution = gr.Slider(MIN_RESOLUTION, MAX_RESOLUTION, value=DEFAULTS.resolution, step=16,
                                           label="Resolution (bucket base, px)", elem_id="resolution")
                    crf = gr.Slider(0, 51, value=DEFAULTS.crf, step=1, label="MP4 quality (CRF; lower = better)",
                                    elem_id="crf")
                    with gr.Row():
                        memory_profile = gr.Dropdown(
                            [(MEMORY_LABELS.get(p, p), p) for p in MEMORY_PROFILES], value=DEFAULTS.memory_profile,
                            label="Memory", elem_id="memory_profile")
                        keep_free_gb = gr.Number(value=DEFAULTS.keep_free_gb, minimum=0, maximum=MAX_KEEP_FREE_GB,
                                                 label="GPU memory to keep free (GB, 0 = automatic)",
                                                 elem_id="keep_free_gb")
                with gr.Row():
                    start_btn = gr.Button("Start", variant="primary", elem_id="start_btn")
                    stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop_btn")
                message = gr.Markdown("", elem_id="message")
                ticket = gr.Textbox(visible=False, elem_id="ticket")

            with gr.Column(scale=6):
                progress = gr.HTML(progress_html(None), elem_id="progress")
                with gr.Row():
                    preview = gr.HTML(preview_html(None), elem_id="preview")
                    partial_video = gr.Video(label="Video so far", interactive=False, autoplay=True, loop=True,
                                             height=220, elem_id="partial_video")
                final_video = gr.Video(label="Final video", interactive=False, elem_id="final_video")
                with gr.Accordion("Queue", open=True, elem_id="queue"):
                    queue_table = gr.HTML(queue_html(worker.snapshot()), elem_id="queue_table")
                    with gr.Row():
                        queue_pick = gr.Dropdown([], label="Queued job", value=None, allow_custom_value=True,
                                                 elem_id="queue_pick", scale=3)
                        remove_btn = gr.Button("Remove from queue", elem_id="remove_btn", scale=1)

        with gr.Accordion("History", open=True, elem_id="history"):
            gallery = gr.Gallery(label="Past jobs (newest first)", columns=8, height=220, allow_preview=False,
                                 fit_columns=False, object_fit="cover", elem_id="history_gallery")
            with gr.Row():
                history_pick = gr.Dropdown([], label="Job", value=None, allow_custom_value=True,
                                           elem_id="history_pick", scale=4)
                refresh_btn = gr.Button("Refresh", size="sm", scale=1)
                reuse_btn = gr.Button("Reuse settings", interactive=False, elem_id="reuse_btn", scale=1)
                resume_btn = gr.Button("Resume", interactive=False, elem_id="resume_btn", scale=1)
            with gr.Row():
                details = gr.Markdown(history_details(None), elem_id="history_details")
                history_video = gr.Video(label="Its video", interactive=False, elem_id="history_video")

        with gr.Accordion("System", open=False, elem_id="system_panel"):
            system_box = gr.HTML("", elem_id="system")

        timer = gr.Timer(POLL_SECONDS)

        form = [image, end_image, prompt, seconds, seed, steps, distilled_cfg, mode, window, cfg, negative_prompt,
                cfg_rescale, resolution, crf, memory_profile, keep_free_gb]
        poll_outputs = [progress, preview, partial_video, final_video, queue_table, queue_pick, stop_btn, gallery,
                        history_pick, history_ids, models_md, models_group, download_box, shown]
        assert len(poll_outputs) == len(POLL_OUTPUTS)

        start_btn.click(page.start, inputs=form, outputs=[message, ticket], api_name="start", **hidden)
        stop_btn.click(page.stop, outputs=[message], api_name="stop", **hidden)
        remove_btn.click(page.remove_queued, inputs=[queue_pick], outputs=[message], api_name="remove_queued",
                         **hidden)
        timer.tick(page.poll, inputs=[shown], outputs=poll_outputs, api_name="poll", concurrency_limit=None,
                   **hidden)
        app.load(page.poll, inputs=[shown], outputs=poll_outputs, api_visibility="private",
                 concurrency_limit=None, show_progress="hidden")
        app.load(page.system, outputs=[system_box], api_name="system", show_progress="hidden")

        for control in (seconds, window):
            control.change(length_line, inputs=[seconds, window], outputs=[length_md], **private)
        random_btn.click(lambda: random.randint(0, RANDOM_SEED_MAX), outputs=[seed], **private)

        refresh_btn.click(page.history, outputs=[gallery, history_pick, history_ids], api_name="history", **hidden)
        gallery.select(page.gallery_select, inputs=[history_ids], outputs=[history_pick], **private)
        history_pick.change(page.select_history, inputs=[history_pick],
                            outputs=[details, history_video, resume_btn, reuse_btn], api_name="history_select",
                            **hidden)
        reuse_btn.click(page.reuse, inputs=[history_pick], outputs=form + [message], api_name="reuse", **hidden)
        resume_btn.click(page.resume, inputs=[history_pick, memory_profile, keep_free_gb], outputs=[message],
                         api_name="resume", **hidden)

        download_btn.click(page.start_download, inputs=[variant], outputs=[message, download_box],
                           api_name="download_models", **hidden)
        folder_btn.click(page.use_models_folder, inputs=[folder_box], outputs=[message, models_md, models_group],
                         api_name="set_models_folder", **hidden)
        gr.api(page.status, api_name="status")
    app.page = page  # type: ignore[attr-defined]
    return app


# ----- command line ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="FramePack Local: the page in your browser.")
    parser.add_argument("--port", type=int, default=7860, help="port on this computer (default %(default)s)")
    parser.add_argument("--models", default=None, help=f"model folder (default {DEFAULT_MODELS})")
    parser.add_argument("--outputs", default=str(DEFAULT_OUTPUTS), help="where job folders go (default %(default)s)")
    parser.add_argument("--listen", action="store_true",
                        help="also accept connections from other computers (binds 0.0.0.0); off by default")
    parser.add_argument("--demo", action="store_true",
                        help=f"use a tiny random model (built in {DEMO_MODELS.name}/ when absent); videos are noise")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def resolve_models(args: argparse.Namespace) -> Path:
    """The model folder to use; with --demo, a tiny random one (built on first use)."""
    if not args.demo:
        return Path(args.models).expanduser().resolve() if args.models else DEFAULT_MODELS
    models_dir = Path(args.models).expanduser().resolve() if args.models else DEMO_MODELS
    if missing_parts(models_dir, "inverted") or missing_parts(models_dir, "forward"):
        from framepack_local.tiny import make_tiny_model

        logger.info("Building the tiny demo model in %s ...", models_dir)
        make_tiny_model(models_dir)
    return models_dir


def launch_kwargs(args: argparse.Namespace, models_dir: Path, outputs_dir: Path) -> dict:
    return dict(
        server_name="0.0.0.0" if args.listen else "127.0.0.1",
        server_port=args.port,
        inbrowser=not args.no_browser,
        # Serve the job folders and Gradio's own cache, nothing else (never the models or the source).
        allowed_paths=[str(outputs_dir)],
        blocked_paths=[str(models_dir)],
        max_file_size=MAX_UPLOAD,
        show_error=False,  # errors reach the page as our own sentences, never as tracebacks
        theme=make_theme(),
        css=CSS,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    outputs_dir = Path(args.outputs).expanduser().resolve()
    try:
        outputs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        sys.stderr.write(f"The outputs folder {outputs_dir} cannot be created ({exc.strerror}); "
                         "choose another one with --outputs.\n")
        return 2
    models_dir = resolve_models(args)
    if args.listen:
        logger.warning("--listen: the page is exposed on your network at port %d; anyone who can reach this "
                       "computer can run jobs and see your videos.", args.port)

    try:
        from framepack_local import jobs

        for job_dir in jobs.recover_interrupted(outputs_dir):
            logger.info("Job %s was interrupted when the app last stopped; it can be resumed from the history.",
                        job_dir.name)
    except Exception:  # noqa: BLE001 - the history shows such jobs as interrupted anyway
        logger.debug("could not check for interrupted jobs", exc_info=True)

    # torch and diffusers are imported here, once, before any server or worker thread exists: their
    # first import is not safe to run in two threads at once (the page's system panel and the first
    # job would otherwise race, and diffusers' lazy modules then fail with an ImportError).
    from framepack_local.pipeline import Engine

    worker = Worker(Engine())
    app = build_app(worker, models_dir, outputs_dir, demo=args.demo, listen=args.listen)
    app.queue(default_concurrency_limit=4)
    try:
        app.launch(**launch_kwargs(args, models_dir, outputs_dir))
    except OSError as exc:
        sys.stderr.write(f"The page could not start on port {args.port} ({exc}); "
                         "close the program using it or choose another port with --port.\n")
        return 2
    finally:
        worker.shutdown(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
