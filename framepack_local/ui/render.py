"""All of the page's HTML and Markdown, rendered from plain data (worker snapshots, job summaries).

Pure functions: no gradio, no widgets, so every string the page shows is tested in-process.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from ..jobs.listing import JobSummary
from ..weights.model_folder import PARTS, missing_parts
from ..worker import WorkerState

logger = logging.getLogger(__name__)

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


def _png_data(rgb: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def preview_html(rgb: np.ndarray | None, caption: str = "", frame_width: int = 0) -> str:
    """The latest latent preview as inline PNGs: nothing is written to disk for it, however long the job.

    The preview holds the section's frames side by side at 1/8 of the video's size: the middle frame is
    shown large (the browser enlarges it without smoothing), the whole strip small beneath it.
    """
    if rgb is None:
        return '<div class="fpl-preview fpl-empty">The latest preview appears here while a job samples.</div>'
    frames = rgb.shape[1] // frame_width if frame_width and rgb.shape[1] % frame_width == 0 else 1
    middle = rgb[:, (frames // 2) * frame_width:(frames // 2 + 1) * frame_width] if frames > 1 else rgb
    strip = (f'<img class="fpl-strip" alt="every frame of the section" src="data:image/png;base64,{_png_data(rgb)}">'
             if frames > 1 else "")
    return (f'<div class="fpl-preview"><img class="fpl-frame" alt="latest latent preview, middle frame" '
            f'src="data:image/png;base64,{_png_data(middle)}">{strip}'
            f'<div class="fpl-sub">{html.escape(caption)}</div></div>')


def progress_html(state: WorkerState | None) -> str:
    """The progress bar: section i/n, step j/m, elapsed, time left; or how the last job ended."""
    if state is None or state.status == "idle":
        return ('<div class="fpl-progress fpl-idle" data-status="idle">No job is running. Choose a photo, '
                "describe what should happen and press Start.</div>")
    esc = html.escape
    pct = 100.0 * state.fraction
    line2 = esc(state.description) + (f" · job {esc(state.job_id)}" if state.job_id else "")
    if state.running:
        if state.sections and state.step:
            computed = ("" if state.computed is None or state.computed >= state.step
                        else f" · {state.computed} of {state.step} steps computed")  # the rest reused (step cache)
            head = (f"<b>Section {state.section} of {state.sections}</b> · step {state.step} of {state.steps}"
                    f"{computed} · {_clock(state.elapsed_s)} elapsed · "
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
    ]
    steps = job.params.get("steps")
    if job.steps_computed and isinstance(steps, int):
        total = steps * len(job.steps_computed)
        lines.append(f"speed: {esc(str(job.params.get('cache', 'off')))} step cache, {sum(job.steps_computed)} of "
                     f"{total} steps computed" + (f", {esc(job.attention)} attention" if job.attention else ""))
    timed, keys = job.params.get("timed_prompts") or (), job.params.get("keyframes") or ()
    if timed or keys:
        lines.append(f"storyboard: {len(timed)} timed prompt{'s' if len(timed) != 1 else ''}, "
                     f"{len(keys)} keyframe{'s' if len(keys) != 1 else ''}")
    if job.drift:
        lines.append(drift_html(job.job_dir, job.drift))
    lines.append(f"folder: `{job.job_dir}`")
    if job.error:
        lines.append(f"error: {esc(job.error)}")
    if job.resumable:
        lines.append("This job can be resumed from its last finished section.")
    return "  \n".join(lines)


def drift_html(job_dir: Path | None, found: dict | None) -> str:
    """The drift report's start-end contrast and its chart (README "Drift"); empty without a report."""
    if not found or job_dir is None:
        return ""
    esc = html.escape
    if found.get("error"):
        return f'<div class="fpl-drift" id="drift_box">drift report: {esc(str(found["error"]))}</div>'
    delta = found.get("delta") or {}

    def cell(name: str, digits: int) -> str:
        value = delta.get(name)
        return "-" if not isinstance(value, (int, float)) else f"{value:.{digits}f}"

    ratio = found.get("sharpness_ratio")
    jump = (found.get("seam_jump") or {}).get("max")
    parts = [f"Δ sharpness {cell('sharpness', 4)}" + (f" (end/start {ratio:.2f})" if isinstance(ratio, float) else ""),
             f"Δ colour {cell('color', 2)} ΔE", f"Δ motion {cell('motion', 2)}", f"Δ similarity {cell('similarity', 3)}"]
    if isinstance(jump, (int, float)):
        parts.append(f"largest seam jump {jump:.2f}")
    chart = Path(job_dir) / str(found.get("chart") or "drift.png")
    img = (f'<img src="/gradio_api/file={quote(str(chart.resolve()))}" alt="drift chart" '
           f'style="max-width:100%">' if chart.is_file() else "")
    return (f'<div class="fpl-drift" id="drift_box"><b>Drift</b> (first vs last 15%): '
            f'{esc(" · ".join(parts))}{img}</div>')


def header_html(demo: bool, listen: bool, small: dict | None = None, gpu_problem: str | None = None) -> str:
    parts = ['<div class="fpl-header"><h1>FramePack Local</h1>'
             "<p>One photo in, a long video out: drop a photo, say what should happen, choose a length, "
             "press Start. A preview appears after every step and a playable video after every section.</p></div>"]
    if demo:
        parts.append('<div class="fpl-banner fpl-demo" id="demo_banner">Demo mode: this runs a tiny random '
                     "model, so every video is noise. Use it to try the page, not to judge results.</div>")
    if gpu_problem:
        parts.append(f'<div class="fpl-banner fpl-warn" id="gpu_banner">{html.escape(gpu_problem)}</div>')
    if small:
        why = "Demo mode" if demo else "No GPU was found"
        parts.append(f'<div class="fpl-banner fpl-demo" id="small_banner">{why}: the form starts small '
                     f'({small["seconds"]:g} s, {small["steps"]} steps, {small["resolution"]} px) so a job takes seconds '
                     "instead of minutes. Raise them for a real video.</div>")
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
    """GPU, VRAM, RAM and free disk; and the memory plan once the models are there."""
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
    rows.append(("Attention", attention_text()))
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


def attention_text() -> str:
    """What "auto" attention picks on this machine, and why the faster kernels are not used."""
    try:
        from ..engine import attention
        from ..engine.generate import default_device

        reasons = attention.unavailable_reasons(default_device())
        chosen = attention.choose("auto", reasons).backend
    except Exception as exc:  # noqa: BLE001 - the panel must render even if the probe breaks
        return f"could not be checked ({type(exc).__name__})"
    names = {"sdpa": "PyTorch SDPA", "flash": "FlashAttention 2", "sage": "SageAttention"}
    missing = "; ".join(f"{names[k]}: {why}" for k, why in reasons.items() if why)
    return f"auto uses {names[chosen]}" + (f" ({missing})" if missing else "")


def memory_plan_text(models_dir: Path, outputs_dir: Path) -> str | None:
    """The memory plan ("auto") for a default-size job on this machine; None before the models are there."""
    if missing_parts(models_dir, "inverted"):
        return None
    try:
        from ..memory.plan import JobShape, plan
        from ..memory.probe import model_sizes_from_folder, probe

        facts = probe(outputs_dir)
        sizes = model_sizes_from_folder(models_dir, "inverted")
        return plan(facts, sizes, JobShape(), "auto", None).table()
    except Exception as exc:  # noqa: BLE001 - the panel is informative; it must not break the page
        logger.debug("memory plan failed", exc_info=True)
        return f"not available ({type(exc).__name__})"
