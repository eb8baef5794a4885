"""The page's handlers: one Page object shared by every tab, holding the worker, folders and download.

Jobs run in framepack_local.worker.Worker, which belongs to no browser tab: the page polls its snapshot
once a second, so closing the tab stops nothing and a page opened later shows the running job.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from ..engine import lora_job
from ..engine.storyboard import plan_for
from ..errors import FramePackError, InputError
from ..engine import budget
from ..jobs.listing import JobSummary, list_jobs
from ..weights.model_folder import missing_parts
from ..worker import Worker
from .downloads import DownloadManager
from .forms import FORM_FIELDS, form_to_params, params_to_form
from .loras import lora_choices
from .serving import drop_previews, section_video
from .render import (
    download_html, drift_html, history_caption, history_details, models_report, preview_html, progress_html, queue_choices,
    queue_html, system_html,
)

logger = logging.getLogger(__name__)

HISTORY_LIMIT = 60
RATE_TTL_S = 30.0
POLL_OUTPUTS = (
    "progress", "preview", "partial_video", "final_video", "queue_table", "queue_pick", "stop_btn",
    "gallery", "history_pick", "history_ids", "models_md", "models_group", "download_html", "drift_box", "shown",
)


def _warn(message: str) -> None:
    try:
        gr.Warning(message)
    except Exception:  # noqa: BLE001 - outside a request (tests) there is nowhere to show it
        logger.warning("%s", message)


def form_endpoint(fn):
    """fn(*values in FORM_FIELDS order), with one named, optional parameter per field for the API.

    Gradio names an endpoint's parameters after the function's, and lets a client leave out those that
    have a default: so older clients that send only the first fields keep working (the rest keep the
    form's defaults), and every parameter has its field's name.
    """
    def endpoint(*values):
        return fn(*values)

    endpoint.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for name in FORM_FIELDS])
    endpoint.__name__ = getattr(fn, "__name__", "endpoint")
    return endpoint


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

    def step_rate(self) -> budget.StepRate | None:
        """The newest finished job's measured seconds per step here (for time estimates), re-read at most
        every RATE_TTL_S so the live length line does not scan the outputs folder on every slider move."""
        now = time.monotonic()
        cached = getattr(self, "_rate", None)
        if cached is None or now - cached[0] > RATE_TTL_S:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            cached = (now, budget.latest_rate(self.outputs_dir, device))
            self._rate = cached
        return cached[1]

    # --- jobs ---

    def start(self, *form_values) -> tuple[str, str]:
        """Queue a job from the form (values in FORM_FIELDS order; API callers may leave off trailing
        ones, which keep their defaults). Returns (message, ticket); the ticket is "" when refused."""
        values = dict(zip(FORM_FIELDS, form_values))
        try:
            params = form_to_params(values, self.models_dir, self.outputs_dir)
            complete, _ = models_report(self.models_dir, params.mode)
            if not complete:
                missing = ", ".join(missing_parts(self.models_dir, params.mode))
                raise InputError(f"The model folder {self.models_dir} lacks {missing}; download the models "
                                 "(panel at the top) or point at a folder that has them.")
            from ..images import load_image

            load_image(params.image, what="start photo")  # a bad photo is refused now, not when its turn comes
            if params.end_image:
                load_image(params.end_image, what="end frame")
            for at, path in params.keyframes:
                load_image(path, what=f"keyframe at {at:g} s")
            plan_for(params, bool(params.end_image))  # a storyboard that cannot work, in one sentence
            lora_job.prepare(params)  # a LoRA file that cannot be used, in one sentence
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
        try:
            if memory_profile:
                overrides["memory_profile"] = str(memory_profile)
            if keep_free_gb not in (None, ""):
                try:
                    overrides["keep_free_gb"] = float(keep_free_gb)
                except (TypeError, ValueError):
                    raise InputError("GPU memory to keep free must be a number of GB.") from None
            key = self.worker.resume(self._job_dir(job_id), overrides)
        except FramePackError as exc:
            _warn(str(exc))
            return f"⚠️ {exc}"
        return f"Resuming {job_id} as {key}."

    def reuse(self, job_id: str | None) -> tuple:
        """Form values from a past job's job.json (in FORM_FIELDS order), its Speed choice, the storyboard
        rows in use, and a message."""
        try:
            job_dir = self._job_dir(job_id)
            record = json.loads((job_dir / "job.json").read_text(encoding="utf-8"))
            params = record.get("params") if isinstance(record.get("params"), dict) else {}
        except FramePackError as exc:
            _warn(str(exc))
            return tuple(gr.skip() for _ in FORM_FIELDS) + (gr.skip(), gr.skip(), f"⚠️ {exc}")
        except (OSError, ValueError):
            message = f"The record of job {job_id} cannot be read."
            _warn(message)
            return tuple(gr.skip() for _ in FORM_FIELDS) + (gr.skip(), gr.skip(), f"⚠️ {message}")
        form = params_to_form(params, job_dir, self.models_dir)
        note = (f" The page shows the first {form['story_rows']} storyboard rows; {form['story_dropped']} more "
                f"are in job.json." if form["story_dropped"] else "")
        return tuple(form[name] for name in FORM_FIELDS) + (form["speed"], form["story_rows"],
                                                             f"Settings of {job_id} are in the form.{note}")

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

    def lora_files(self) -> Any:
        """The LoRA picker's choices, read again from models/loras/ (its Refresh button)."""
        return gr.update(choices=lora_choices(self.models_dir))

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

    def check_computer(self) -> str:
        """The doctor's report (python -m framepack_local doctor) for the System panel."""
        import html

        from ..doctor import diagnose

        try:
            # The self-test needs GPU memory a running job may be using: the page shows the cached verdict.
            report = diagnose(self.models_dir, self.outputs_dir, run_selftest=False)
        except Exception as exc:  # noqa: BLE001 - the panel gets a sentence, never a traceback
            logger.exception("doctor failed")
            return f'<div class="fpl-plan-error">The check could not run ({type(exc).__name__}); see the log.</div>'
        return f'<pre class="fpl-plan" id="doctor_report">{html.escape(report.table())}</pre>'

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
            out["drift_box"] = ""

        progress = progress_html(state)
        if progress != shown.get("progress"):
            out["progress"] = shown["progress"] = progress

        preview_sig = [state.section, state.step] if state.preview_rgb is not None else None
        if preview_sig != shown.get("preview"):
            out["preview"] = preview_html(state.preview_rgb, f"Latest preview: section {state.section} of "
                                                             f"{state.sections}, step {state.step} of {state.steps}",
                                          state.preview_frame_width)
            shown["preview"] = preview_sig

        partial = state.partial_video
        partial_sig = ([str(partial), state.sections_done, state.running] if partial is not None and partial.is_file()
                       else None)
        if partial_sig is not None and partial_sig != shown.get("partial") and state.final_video is None:
            if state.running:
                out["partial_video"] = str(section_video(partial, state.sections_done))
            else:  # stopped or failed: partial.mp4 no longer changes, so it is served as it is
                out["partial_video"] = str(partial)
                drop_previews(partial.parent)
            shown["partial"] = partial_sig

        final = state.final_video
        final_sig = str(final) if final is not None and final.is_file() else None
        if final_sig is not None and final_sig != shown.get("final"):
            out["final_video"] = final_sig
            shown["final"] = final_sig
            job = self._summary(final.parent.name)
            out["drift_box"] = drift_html(final.parent, job.drift if job is not None else None)
            # The final video stands beside it now; the per-section names it was served under go.
            out["partial_video"] = None
            drop_previews(final.parent)

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
