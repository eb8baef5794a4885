"""The page's layout (Gradio 6 Blocks) and its wiring to the handlers; theme and CSS for launch()."""

from __future__ import annotations

import random
from pathlib import Path

import gradio as gr

from ..params import (
    ATTENTION_BACKENDS, MAX_RESOLUTION, MAX_STEPS, MAX_WINDOW, MEMORY_PROFILES, MIN_RESOLUTION, speed_of,
)
from ..worker import Worker
from .downloads import DownloadManager
from .forms import (
    DEFAULTS, FORM_FIELDS, MAX_KEEP_FREE_GB, MAX_SECONDS_UI, MIN_SECONDS_UI, RANDOM_SEED_MAX, SMALL_JOB,
    form_defaults, length_line,
    speed_choice, speed_settings,
)
from .handlers import POLL_OUTPUTS, Page, form_endpoint
from .serving import drop_all_previews, serve_static
from .loras import LORA_HELP, LORA_SLOTS, lora_choices, slider_updates
from .story import STORY_FIELDS, STORY_ROWS, plan_preview_html
from .render import header_html, history_details, models_report, preview_html, progress_html, queue_html

POLL_SECONDS = 1.0
MEMORY_LABELS = {
    "auto": "auto (plan from this machine)",
    "bf16": "bf16: transformer in RAM, exact",
    "fp8": "fp8: half the RAM",
    "disk": "disk: least RAM (memory-mapped)",
}
ATTENTION_LABELS = {
    "auto": "auto (SageAttention or FlashAttention when installed, else SDPA)",
    "sdpa": "PyTorch SDPA",
    "flash": "FlashAttention 2",
    "sage": "SageAttention",
}
STORY_HELP = ("Each row takes over at its time: a new prompt, a keyframe image the video passes through "
              "(inverted mode), or both. The main prompt applies from 0 s. The plan below shows every section.")
SPEED_HELP = ("Skips sampling steps whose result barely changes (MagCache). Balanced runs about 13 of 25 steps, "
              "fast about 10; off runs every step. Exact settings under Advanced.")
MODE_HELP = (
    "**Inverted anti-drift**: samples from the end of the video back to your photo, so long videos stay "
    "consistent (recommended).  \n"
    "**Forward (F1)**: samples forward in time from your photo; livelier motion, may drift in long videos "
    "(needs the F1 model)."
)
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
.fpl-plan-box { max-height: 240px; overflow-y: auto; }
.fpl-plan-error { font-size: .9em; color: #7a0000; }
.fpl-preview img { width: 100%; object-fit: contain; image-rendering: pixelated;
  background: var(--background-fill-secondary); border-radius: 6px; }
.fpl-preview img.fpl-frame { height: 300px; }
.fpl-preview img.fpl-strip { height: 48px; margin-top: .3em; }
#stop_btn:not(:disabled) { background: #d93025; border-color: #d93025; color: #fff; }
"""


def make_theme():
    # System fonts only: the page must not reach out to a font service (offline machines, privacy).
    return gr.themes.Soft(primary_hue="indigo", font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken driver: treat it as no GPU
        return False


def _gpu_problem() -> str | None:
    from ..memory.gpu_check import check_gpu

    try:
        return check_gpu()
    except Exception:  # noqa: BLE001 - the check must never keep the page from starting
        return None


def photo_box(**kwargs) -> gr.Image:
    """gr.Image whose unreadable upload reaches the handler, which refuses it in one sentence (Gradio's own
    decoding would fail first, with a message the API caller never sees). Wrapped per instance: a
    subclass of a Gradio component makes Gradio write a .pyi file next to this module."""
    box = gr.Image(**kwargs)
    decode = box.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except Exception:  # noqa: BLE001 - not an image: load_image in the handler says so
            return str(payload.path) if payload is not None and getattr(payload, "path", None) else None

    box.preprocess = preprocess
    return box


def remove_story_row(count) -> list:
    """Hide the last row and clear it (a hidden row must not still reach the job)."""
    count = int(count)
    out = [max(1, count - 1)] + [gr.skip()] * (3 * STORY_ROWS)
    if count > 1:
        base = 1 + 3 * (count - 1)
        out[base:base + 3] = [None, "", None]
    return out


def section_plan_html(seconds, window, mode, end_image, prompt, blend, *story_values) -> str:
    values = dict(zip(STORY_FIELDS, story_values))
    return plan_preview_html(seconds, window, mode, bool(end_image), prompt, blend, values)


def build_app(worker: Worker, models_dir: Path, outputs_dir: Path, demo: bool = False, *, listen: bool = False,
              downloads: DownloadManager | None = None) -> gr.Blocks:
    """The page. Nothing runs until it is launched; `app.page` holds the handlers' shared state."""
    page = Page(worker, Path(models_dir), Path(outputs_dir), demo=demo, listen=listen, downloads=downloads)
    serve_static(Path(outputs_dir))  # videos straight from the job folders, never copied per section
    drop_all_previews(Path(outputs_dir))
    complete, models_text = models_report(page.models_dir)
    gpu_problem = _gpu_problem()  # an NVIDIA GPU that torch cannot use: say so instead of running on the CPU
    small = demo or not _has_cuda()  # start with a job that finishes in seconds (forms.SMALL_JOB)
    start = form_defaults(small)
    hidden = dict(show_progress="hidden")
    private = dict(show_progress="hidden", api_visibility="private")

    with gr.Blocks(title="FramePack Local", delete_cache=(1800, 6 * 3600), analytics_enabled=False) as app:
        shown = gr.State({})
        history_ids = gr.State([])
        gr.HTML(header_html(demo, listen, SMALL_JOB if small else None, gpu_problem), elem_id="header")

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
                    image = photo_box(label="Start photo", sources=["upload", "clipboard"],
                                     type="filepath", image_mode=None, height=260, elem_id="start_image")
                    end_image = photo_box(label="End frame (optional)", sources=["upload", "clipboard"],
                                         type="filepath", image_mode=None, height=260, elem_id="end_image")
                prompt = gr.Textbox(label="What should happen", lines=2, elem_id="prompt",
                                    placeholder="The girl dances gracefully, with clear movements, full of charm.")
                seconds = gr.Slider(MIN_SECONDS_UI, MAX_SECONDS_UI, value=start.seconds, step=0.1,
                                    label="Length (seconds)", elem_id="seconds")
                length_md = gr.Markdown(length_line(start.seconds, start.window, start.steps, start.resolution,
                                                    page.step_rate()), elem_id="length_line")
                with gr.Row():
                    start_btn = gr.Button("Start", variant="primary", elem_id="start_btn")
                    stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop_btn")
                message = gr.Markdown("", elem_id="message")
                ticket = gr.Textbox(visible=False, elem_id="ticket")

                with gr.Row(equal_height=True):
                    seed = gr.Number(value=DEFAULTS.seed, precision=0, minimum=0, label="Seed", elem_id="seed",
                                     scale=3)
                    random_btn = gr.Button("Random seed", size="sm", elem_id="random_seed", scale=1, min_width=80)
                steps = gr.Slider(1, MAX_STEPS, value=start.steps, step=1, label="Steps", elem_id="steps")
                distilled_cfg = gr.Slider(1, 32, value=DEFAULTS.distilled_cfg, step=0.1, label="Distilled CFG",
                                          elem_id="distilled_cfg")
                speed = gr.Radio([("Off (exact)", "off"), ("Balanced", "balanced"), ("Fast", "fast")],
                                 value=speed_of(DEFAULTS.to_dict()), label="Speed", info=SPEED_HELP, elem_id="speed")
                with gr.Accordion("Storyboard: prompts over time, keyframes", open=False, elem_id="storyboard"):
                    gr.Markdown(STORY_HELP)
                    story_count = gr.State(1)
                    story_rows, story_fields = [], []
                    for i in range(1, STORY_ROWS + 1):
                        with gr.Row(visible=i == 1, equal_height=True) as row:
                            story_fields.append(gr.Number(label="At (s)", minimum=0, elem_id=f"story_at_{i}",
                                                          scale=1, min_width=80))
                            story_fields.append(gr.Textbox(label="Prompt from here on (optional)", lines=2,
                                                           elem_id=f"story_prompt_{i}", scale=4))
                            story_fields.append(photo_box(label="Keyframe (optional)", sources=["upload", "clipboard"],
                                                         type="filepath", image_mode=None, height=110,
                                                         elem_id=f"story_image_{i}", scale=2, min_width=120))
                        story_rows.append(row)
                    with gr.Row():
                        add_row = gr.Button("Add row", size="sm", elem_id="story_add")
                        remove_row = gr.Button("Remove last row", size="sm", elem_id="story_remove")
                    prompt_blend = gr.Slider(0, 16, value=DEFAULTS.prompt_blend, step=1,
                                             label="Blend a prompt change over this many sections (0 = at once)",
                                             elem_id="prompt_blend")
                    plan_box = gr.HTML("", elem_id="section_plan")
                with gr.Accordion("LoRA", open=False, elem_id="lora"):
                    gr.Markdown(LORA_HELP)
                    with gr.Row(equal_height=True):
                        # Custom values: Reuse may bring back a file given by path on the command line.
                        lora_files = gr.Dropdown(lora_choices(page.models_dir), value=[], multiselect=True,
                                                 allow_custom_value=True, label="LoRA files", elem_id="lora_files",
                                                 scale=4)
                        lora_refresh = gr.Button("Refresh", size="sm", elem_id="lora_refresh", scale=1,
                                                 min_width=80)
                    lora_weights = [gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight", visible=False,
                                              elem_id=f"lora_weight_{i}") for i in range(1, LORA_SLOTS + 1)]
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
                    resolution = gr.Slider(MIN_RESOLUTION, MAX_RESOLUTION, value=start.resolution, step=16,
                                           label="Resolution (bucket base, px)", elem_id="resolution")
                    crf = gr.Slider(0, 51, value=DEFAULTS.crf, step=1, label="MP4 quality (CRF; lower = better)",
                                    elem_id="crf")
                    with gr.Row():
                        cache = gr.Dropdown([("MagCache", "mag"), ("First-block cache", "first-block"),
                                             ("Off", "off")], value=DEFAULTS.cache, label="Step cache",
                                            elem_id="cache")
                        cache_threshold = gr.Number(value=speed_settings("balanced")[1], minimum=0, maximum=1,
                                                    label="Cache threshold (higher skips more)",
                                                    elem_id="cache_threshold")
                    with gr.Row():
                        cache_max_skip = gr.Slider(1, MAX_STEPS, value=DEFAULTS.cache_max_skip, step=1,
                                                   label="MagCache: most steps skipped in a row",
                                                   elem_id="cache_max_skip")
                        cache_retention = gr.Slider(0, 1, value=DEFAULTS.cache_retention, step=0.05,
                                                    label="MagCache: share of first steps that always run",
                                                    elem_id="cache_retention")
                    attention = gr.Dropdown([(ATTENTION_LABELS[a], a) for a in ATTENTION_BACKENDS],
                                            value=DEFAULTS.attention, label="Attention", elem_id="attention")
                    with gr.Row():
                        memory_profile = gr.Dropdown(
                            [(MEMORY_LABELS.get(p, p), p) for p in MEMORY_PROFILES], value=DEFAULTS.memory_profile,
                            label="Memory", elem_id="memory_profile")
                        keep_free_gb = gr.Number(value=DEFAULTS.keep_free_gb, minimum=0, maximum=MAX_KEEP_FREE_GB,
                                                 label="GPU memory to keep free (GB, 0 = automatic)",
                                                 elem_id="keep_free_gb")
            with gr.Column(scale=6, elem_id="results"):
                progress = gr.HTML(progress_html(None), elem_id="progress")
                preview = gr.HTML(preview_html(None), elem_id="preview")
                with gr.Row():
                    partial_video = gr.Video(label="Video so far", interactive=False, autoplay=True, loop=True,
                                             height=260, elem_id="partial_video")
                    final_video = gr.Video(label="Final video", interactive=False, height=260, elem_id="final_video")
                drift_box = gr.HTML("", elem_id="drift")

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
            check_btn = gr.Button("Check this computer", size="sm", elem_id="check_computer")
            doctor_box = gr.HTML("", elem_id="doctor")

        timer = gr.Timer(POLL_SECONDS)

        form = [image, end_image, prompt, seconds, seed, steps, distilled_cfg, mode, window, cfg, negative_prompt,
                cfg_rescale, resolution, crf, memory_profile, keep_free_gb, cache, cache_threshold, cache_max_skip,
                cache_retention, attention, prompt_blend, *story_fields, lora_files, *lora_weights]
        assert len(form) == len(FORM_FIELDS)
        poll_outputs = [progress, preview, partial_video, final_video, queue_table, queue_pick, stop_btn, gallery,
                        history_pick, history_ids, models_md, models_group, download_box, drift_box, shown]
        assert len(poll_outputs) == len(POLL_OUTPUTS)

        start_btn.click(form_endpoint(page.start), inputs=form, outputs=[message, ticket], api_name="start", **hidden)
        stop_btn.click(page.stop, outputs=[message], api_name="stop", **hidden)
        remove_btn.click(page.remove_queued, inputs=[queue_pick], outputs=[message], api_name="remove_queued",
                         **hidden)
        timer.tick(page.poll, inputs=[shown], outputs=poll_outputs, api_name="poll", concurrency_limit=None,
                   **hidden)
        app.load(page.poll, inputs=[shown], outputs=poll_outputs, api_visibility="private",
                 concurrency_limit=None, show_progress="hidden")
        app.load(page.system, outputs=[system_box], api_name="system", show_progress="hidden")
        check_btn.click(page.check_computer, outputs=[doctor_box], api_name="check_computer")

        length_inputs = [seconds, window, steps, resolution]
        for control in length_inputs:
            control.change(lambda *v: length_line(*v, page.step_rate()), inputs=length_inputs, outputs=[length_md],
                           **private)

        # Storyboard rows: a count in a State shows that many rows; removing a row clears it.
        add_row.click(lambda n: min(int(n) + 1, STORY_ROWS), inputs=[story_count], outputs=[story_count], **private)
        remove_row.click(remove_story_row, inputs=[story_count], outputs=[story_count, *story_fields], **private)
        story_count.change(lambda n: [gr.Row(visible=i < int(n)) for i in range(STORY_ROWS)], inputs=[story_count],
                           outputs=story_rows, **private)
        plan_inputs = [seconds, window, mode, end_image, prompt, prompt_blend, *story_fields]
        for control in plan_inputs:
            control.change(section_plan_html, inputs=plan_inputs, outputs=[plan_box], **private)
        app.load(section_plan_html, inputs=plan_inputs, outputs=[plan_box], **private)
        app.load(lambda *v: length_line(*v, page.step_rate()), inputs=length_inputs, outputs=[length_md], **private)
        random_btn.click(lambda: random.randint(0, RANDOM_SEED_MAX), outputs=[seed], **private)
        # One weight slider per picked file, labelled with its name (values stay: Reuse sets them too).
        lora_files.change(lambda picked: [gr.update(**u) for u in slider_updates(picked)], inputs=[lora_files],
                          outputs=lora_weights, **private)
        lora_refresh.click(page.lora_files, outputs=[lora_files], api_name="lora_files", **hidden)

        refresh_btn.click(page.history, outputs=[gallery, history_pick, history_ids], api_name="history", **hidden)
        gallery.select(page.gallery_select, inputs=[history_ids], outputs=[history_pick], **private)
        history_pick.change(page.select_history, inputs=[history_pick],
                            outputs=[details, history_video, resume_btn, reuse_btn], api_name="history_select",
                            **hidden)
        reuse_btn.click(page.reuse, inputs=[history_pick], outputs=form + [speed, story_count, message],
                        api_name="reuse", **hidden)
        # .input, not .change: only the user's choice sets the fields (Reuse sets both, in step).
        cache_fields = [cache, cache_threshold, cache_max_skip, cache_retention]
        speed.input(speed_settings, inputs=[speed], outputs=cache_fields, **private)
        for field in cache_fields:  # an edited setting shows which preset it is now (none: custom)
            field.input(speed_choice, inputs=cache_fields, outputs=[speed], **private)
        resume_btn.click(page.resume, inputs=[history_pick, memory_profile, keep_free_gb], outputs=[message],
                         api_name="resume", **hidden)

        download_btn.click(page.start_download, inputs=[variant], outputs=[message, download_box],
                           api_name="download_models", **hidden)
        folder_btn.click(page.use_models_folder, inputs=[folder_box], outputs=[message, models_md, models_group],
                         api_name="set_models_folder", **hidden)
        gr.api(page.status, api_name="status")
    app.page = page  # type: ignore[attr-defined]
    return app
