"""The page's handlers in-process: form -> JobParams, one-sentence errors, progress HTML, history, reuse,
polling, models panel and download, without a server or a browser."""

import json
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio")
# gr.Warning outside a request falls back to warnings.warn; the sentences themselves are asserted below.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

from framepack_local.errors import InputError  # noqa: E402
from framepack_local.events import JobFinished, JobStarted, SectionFinished, StageChanged, StepProgress  # noqa: E402
from framepack_local.weights.model_folder import PARTS  # noqa: E402
from framepack_local.params import DEFAULT_MODELS, JobParams  # noqa: E402
from framepack_local.engine.generate import JobResult  # noqa: E402
from framepack_local.jobs.listing import list_jobs  # noqa: E402
from framepack_local.ui import downloads, forms, handlers, launch, layout, render  # noqa: E402
from framepack_local.worker import QueuedJob, Worker, WorkerState  # noqa: E402


def form(photo, **changes):
    values = dict(image=str(photo), end_image=None, prompt="  waves roll in ", seconds=5, seed=31337.0, steps=25,
                  distilled_cfg=10, mode="inverted", window=9, cfg=1, negative_prompt="", cfg_rescale=0,
                  resolution=640, crf=16, memory_profile="auto", keep_free_gb=0, cache="mag", cache_threshold=0.1,
                  cache_max_skip=2, cache_retention=0.2, attention="auto", prompt_blend=0)
    values.update({name: None for name in forms.STORY_FIELDS + forms.LORA_FIELDS})
    values.update(changes)
    return values


def one_sentence(text: str) -> bool:
    return "\n" not in text and "Traceback" not in text and text.rstrip().endswith(".") and len(text) < 400


# ----- form -> JobParams ---------------------------------------------------------------------------------------


def test_form_to_params(photo, tmp_path):
    p = forms.form_to_params(form(photo, seed=7.0, steps=12.0, memory_profile="fp8", keep_free_gb=3.5),
                           tmp_path / "m", tmp_path / "o")
    assert isinstance(p, JobParams)
    assert p.image == str(photo) and p.prompt == "waves roll in" and p.end_image is None
    assert p.seed == 7 and isinstance(p.seed, int) and p.steps == 12 and isinstance(p.steps, int)
    assert p.models == str(tmp_path / "m") and p.outputs == str(tmp_path / "o")
    assert (p.memory_profile, p.keep_free_gb) == ("fp8", 3.5)
    assert p.window == 9 and p.resolution == 640 and p.crf == 16 and p.mode == "inverted"
    q = forms.form_to_params(form(photo, end_image=str(photo), keep_free_gb=None), tmp_path, tmp_path)
    assert q.end_image == str(photo) and q.keep_free_gb == JobParams(image="x").keep_free_gb


@pytest.mark.parametrize("changes, words", [
    (dict(image=None), "start photo"),
    (dict(seed=None), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(steps=0), "steps"),
    (dict(steps="many"), "Steps"),
    (dict(seconds=0.5), "between 1 and 3600"),
    (dict(seconds=3601), "between 1 and 3600"),
    (dict(seconds=float("nan")), "length"),
    (dict(window=40), "window"),
    (dict(mode="forward", end_image="end.png"), "end image"),
    (dict(mode="sideways"), "Mode"),
    (dict(keep_free_gb=-1), "keep free"),
    (dict(memory_profile="huge"), "Memory profile"),
    (dict(resolution=8), "resolution"),
    (dict(cfg=0.5), "cfg"),
    (dict(cache="tea"), "step cache"),
    (dict(cache_threshold=2), "cache_threshold"),
    (dict(cache_max_skip=0.5), "skipped in a row"),
    (dict(attention="xformers"), "attention"),
])
def test_bad_form_values_give_one_sentence(photo, tmp_path, changes, words):
    with pytest.raises(InputError) as info:
        forms.form_to_params(form(photo, **changes), tmp_path, tmp_path)
    assert words.lower() in str(info.value).lower()
    assert one_sentence(str(info.value)), str(info.value)


def test_length_line():
    assert forms.length_line(5, 9).startswith("145 frames = 4.8 s at 30 fps, made in 4 sections of 36 frames; ")
    assert "snap to the section starts, every 1.20 s" in forms.length_line(5, 9)
    assert "1 section of 4 frames" in forms.length_line(0.1, 1)
    assert forms.length_line(None, 9) == "Choose a length and a window size."
    line = forms.length_line(120, 9)
    assert "100 sections" in line and "3601 frames" in line


def test_speed_choice_sets_the_step_cache_fields_and_reuse_finds_it_again(photo, tmp_path):
    assert forms.speed_settings("off")[0] == "off"
    assert forms.speed_settings("balanced") == ("mag", 0.1, 2, 0.2)
    fast = forms.form_to_params(form(photo, **dict(zip(("cache", "cache_threshold", "cache_max_skip", "cache_retention"),
                                                       forms.speed_settings("fast")))), tmp_path, tmp_path)
    assert (fast.cache, fast.cache_threshold, fast.cache_max_skip) == ("mag", 0.15, 4)
    assert forms.params_to_form(fast.to_dict())["speed"] == "fast"
    assert forms.params_to_form(JobParams(image="x").to_dict())["speed"] == "balanced"  # the default
    assert forms.params_to_form(fast.replace(cache_max_skip=3).to_dict())["speed"] is None  # custom
    # A record from before the step cache ran uncached: Reuse says so rather than turning it on.
    old = {k: v for k, v in fast.to_dict().items() if not k.startswith("cache") and k != "attention"}
    reused = forms.params_to_form(old)
    assert (reused["cache"], reused["attention"], reused["speed"]) == ("off", "sdpa", "off")
    empty = forms.form_to_params(form(photo, cache_threshold=None), tmp_path, tmp_path)
    assert empty.cache_threshold is None  # the mode's default


def test_params_to_form_round_trip(photo, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    shutil.copy(photo, job_dir / "input.png")
    p = forms.form_to_params(form(photo, seed=99, steps=7, memory_profile="disk", keep_free_gb=2), tmp_path, tmp_path)
    values = forms.params_to_form(p.to_dict(), job_dir)
    assert values["image"] == str(job_dir / "input.png") and values["end_image"] is None
    again = forms.form_to_params(values, tmp_path, tmp_path)
    assert again.replace(image=p.image) == p


# ----- progress HTML -----------------------------------------------------------------------------------------


def state(**kw):
    base = dict(status="running", status_text="Sampling section 2 of 5", key="job-1", job_id="20250101-000000-abcdef",
                job_dir=Path("/x"), description="“waves”, 5 s, inverted, seed 1", stage="sampling", section=2,
                sections=5, step=3, steps=10, computed=None, sections_done=1, elapsed_s=83.0, eta_s=250.0,
                preview_rgb=np.zeros((6, 8, 3), np.uint8), partial_video=None, final_video=None, error=None,
                notices=(), queue=(), version=1)
    base.update(kw)
    return WorkerState(**base)


def test_progress_html_running():
    html = render.progress_html(state())
    assert "Section 2 of 5" in html and "step 3 of 10" in html
    assert "1:23 elapsed" in html and "about 4:10 left" in html
    assert 'style="width:26.0%"' in html  # (1 section * 10 + 3) / 50 steps
    assert "estimating time left" in render.progress_html(state(eta_s=None))
    loading = render.progress_html(state(section=0, step=0, status_text="Loading models"))
    assert "Loading models" in loading and "Section" not in loading
    assert "Stopping after the current step" in render.progress_html(state(status="stopping"))
    # The step cache's count: shown once a step was reused, never when every step ran.
    assert "12 of 25 steps computed" in render.progress_html(state(step=25, steps=25, computed=12))
    assert "job 20250101-000000-abcdef" in html  # the id of the folder and the History entry
    assert "steps computed" not in render.progress_html(state(step=3, computed=3))


def test_progress_html_end_states_and_escaping():
    assert "No job is running" in render.progress_html(None)
    assert "No job is running" in render.progress_html(state(status="idle"))
    done = render.progress_html(state(status="done", sections_done=5, elapsed_s=3725))
    assert "Done" in done and "1:02:05" in done and "width:100%" in done
    stopped = render.progress_html(state(status="stopped", sections_done=2))
    assert "Stopped" in stopped and "after 2 of 5 sections" in stopped
    failed = render.progress_html(state(status="failed", error="The photo <b>x</b> is broken; choose another."))
    assert "Failed" in failed and "&lt;b&gt;x&lt;/b&gt;" in failed and "<b>x</b>" not in failed
    notice = render.progress_html(state(notices=("The prompt is longer than the text encoder takes.",)))
    assert "longer than the text encoder" in notice


def test_queue_html_and_choices():
    empty = state()
    assert "queue is empty" in render.queue_html(empty)
    s = state(queue=(QueuedJob("job-2", "new", "“a <cat>”, 5 s"), QueuedJob("job-3", "resume", "Resume x")))
    table = render.queue_html(s)
    assert table.count("<tr>") == 3 and "job-2" in table and "&lt;cat&gt;" in table
    assert render.queue_choices(s) == [("#1 “a <cat>”, 5 s", "job-2"), ("#2 Resume x", "job-3")]


def test_preview_html_is_an_inline_png():
    import base64
    import io

    from PIL import Image

    rgb = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    html = render.preview_html(rgb, "section 1 <of> 2")
    data = html.split("data:image/png;base64,")[1].split('"')[0]
    back = np.array(Image.open(io.BytesIO(base64.b64decode(data))))
    assert (back == rgb).all() and "section 1 &lt;of&gt; 2" in html
    assert "<img" not in render.preview_html(None)
    # A section's frames side by side: the middle one large, the strip small under it.
    strip = np.concatenate([np.full((6, 4, 3), 40 * i, np.uint8) for i in range(5)], axis=1)  # 5 frames, 4 wide
    images = [np.array(Image.open(io.BytesIO(base64.b64decode(part.split('"')[0]))))
              for part in render.preview_html(strip, "", frame_width=4).split("data:image/png;base64,")[1:]]
    assert [i.shape for i in images] == [(6, 4, 3), (6, 20, 3)] and (images[0] == 80).all()


# ----- the page with a fake engine -------------------------------------------------------------------------------


class GatedEngine:
    """Writes a real-looking job folder, emits events, and waits at a gate so tests can look mid-job."""

    def __init__(self, photo):
        self.photo = photo
        self.gate = threading.Event()
        self.calls = []

    def generate(self, params, on_event=None, cancel=None):
        self.calls.append(params)
        outputs = Path(params.outputs)
        job_id = f"20250101-00000{len(self.calls)}-abcdef"
        job_dir = outputs / job_id
        job_dir.mkdir(parents=True)
        shutil.copy(self.photo, job_dir / "input.png")
        record = {"job_id": job_id, "status": "running", "params": params.to_dict(), "sections": 2,
                  "sections_done": 0, "created": f"2025-01-01T00:00:0{len(self.calls)}+0000"}
        (job_dir / "job.json").write_text(json.dumps(record))
        on_event(JobStarted(job_id, job_dir, 2, 2, 17, 64, 64))
        on_event(StageChanged("sampling", "Sampling section 1 of 2"))
        on_event(StepProgress(1, 2, 1, 2, 0.1, np.full((4, 6, 3), 200, np.uint8)))
        (job_dir / "partial.mp4").write_bytes(b"not really an mp4")
        on_event(SectionFinished(1, 2, job_dir / "partial.mp4", 9, 0.2))
        self.gate.wait(10)
        status = "stopped" if cancel.cancelled else "done"
        video = job_dir / ("partial.mp4" if status == "stopped" else "video.mp4")
        if status == "done":
            video.write_bytes(b"final")
            (job_dir / "partial.mp4").unlink()
        record.update(status=status, sections_done=1 if status == "stopped" else 2)
        (job_dir / "job.json").write_text(json.dumps(record))
        on_event(JobFinished(status, job_dir, video, 0.3))
        return JobResult(status, job_id, job_dir, video)


@pytest.fixture
def page(tiny_model_dir, photo, tmp_path):
    engine = GatedEngine(photo)
    worker = Worker(engine)
    p = handlers.Page(worker, tiny_model_dir, tmp_path / "outputs")
    p.engine = engine
    yield p
    engine.gate.set()
    worker.shutdown()


def start(page, photo, **changes):
    values = form(photo, **{**dict(resolution=64, steps=2, window=1, seconds=1), **changes})
    return page.start(*[values[name] for name in forms.FORM_FIELDS])


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_start_stop_queue_and_poll(page, photo):
    message, key = start(page, photo, prompt="first")
    assert message == f"Started {key}." and key
    wait_for(lambda: page.worker.snapshot().sections_done == 1)
    message2, key2 = start(page, photo, prompt="second")
    assert key2 and key2 != key and "Queued" in message2 and "number 1" in message2

    out = dict(zip(handlers.POLL_OUTPUTS, page.poll({})))
    assert "Section 1 of 2" in out["progress"] and "step 1 of 2" in out["progress"]
    assert "data:image/png;base64," in out["preview"] and "section 1 of 2, step 1 of 2" in out["preview"]
    assert out["partial_video"].endswith("partial.mp4") and out["final_video"] is None
    served = Path(out["partial_video"])  # the job's own bytes under a per-section name: no copy
    assert served.parent.name == ".preview" and served.stat().st_ino == (served.parent.parent / "partial.mp4").stat().st_ino
    assert key2 in out["queue_table"] and out["queue_pick"]["choices"] == [("#1 “second”, 1 s, inverted, seed 31337", key2)]
    assert out["stop_btn"]["interactive"] is True
    assert out["history_ids"] == ["20250101-000001-abcdef"]
    shown = out["shown"]

    # nothing changed: the next poll sends (almost) nothing
    again = dict(zip(handlers.POLL_OUTPUTS, page.poll(shown)))
    skipped = [name for name in handlers.POLL_OUTPUTS if again[name] == gr.skip()]
    assert set(skipped) >= {"preview", "partial_video", "final_video", "queue_table", "queue_pick", "stop_btn",
                            "gallery", "history_pick", "history_ids", "download_html"}

    assert page.remove_queued(key2) == f"Removed {key2} from the queue."
    assert "no longer in the queue" in page.remove_queued(key2)
    assert page.remove_queued(None) == "Choose a queued job to remove first."
    assert page.stop() == "Stopping after the current step; the finished sections are kept."
    page.engine.gate.set()
    assert page.worker.wait(key, 10).status == "stopped"
    assert page.stop() == "Nothing is running."
    out = dict(zip(handlers.POLL_OUTPUTS, page.poll(again["shown"])))
    assert "Stopped" in out["progress"] and out["stop_btn"]["interactive"] is False
    assert "queue is empty" in out["queue_table"]
    assert len(page.engine.calls) == 1


def test_start_refuses_bad_input_with_one_sentence(page, photo, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    for changes, words in [(dict(image=None), "start photo"), (dict(image=str(broken)), "broken.png"),
                           (dict(image=str(tmp_path / "missing.png")), "missing.png"), (dict(steps=0), "steps")]:
        message, key = start(page, photo, **changes)
        assert key == "" and message.startswith("⚠️ ") and words in message
        assert one_sentence(message[3:]), message
    page.models_dir = tmp_path / "no-models"
    message, key = start(page, photo)
    assert key == "" and "no-models" in message and "download" in message
    assert page.engine.calls == []


def test_history_reuse_and_resume(page, photo):
    _, key = start(page, photo, prompt="a boat <on> the lake", seed=4242, steps=3)
    page.engine.gate.set()
    assert page.worker.wait(key, 10).status == "done"
    items, pick, ids = page.history()
    job_id = ids[0]
    assert len(items) == 1 and items[0][0].endswith("input.png")
    assert "a boat <on> the lake · 1 s" in items[0][1] and "done" in items[0][1]
    assert pick["choices"] == [(items[0][1], job_id)]

    details, video, resume_btn, reuse_btn = page.select_history(job_id)
    assert "a boat &lt;on&gt; the lake" in details and "**done**" in details
    assert video.endswith("video.mp4") and resume_btn["interactive"] is False and reuse_btn["interactive"] is True

    values = page.reuse(job_id)
    filled = dict(zip(forms.FORM_FIELDS, values[:-3]))
    assert len(values) == len(forms.FORM_FIELDS) + 3 and values[-3] == forms.params_to_form(filled)["speed"]
    assert values[-2] == 1  # storyboard rows shown: one (empty)
    assert values[-1] == f"Settings of {job_id} are in the form."
    assert filled["prompt"] == "a boat <on> the lake" and filled["seed"] == 4242 and filled["steps"] == 3
    assert filled["image"].endswith(f"{job_id}/input.png") and filled["resolution"] == 64

    # a stopped job offers Resume; the worker queues a resume through the engine
    record_path = page.outputs_dir / job_id / "job.json"
    record = json.loads(record_path.read_text())
    record["status"] = "stopped"
    record_path.write_text(json.dumps(record))
    _, _, resume_btn, _ = page.select_history(job_id)
    assert resume_btn["interactive"] is True
    assert page.resume(job_id, "fp8", 2).startswith(f"Resuming {job_id} as ")

    for bad in ("../outside", "nope", None):
        assert page.resume(bad).startswith("⚠️")
        assert page.reuse(bad)[-1].startswith("⚠️")
    assert page.select_history("nope")[0] == "Select a past job to see it here."


def test_gallery_select_maps_index_to_job(page):
    evt = gr.SelectData(None, {"index": 1, "value": None})
    assert page.gallery_select(["a", "b"], evt) == "b"
    assert page.gallery_select(["a"], evt) == gr.skip()


def test_status_api(page, photo):
    _, key = start(page, photo)
    wait_for(lambda: page.worker.snapshot().sections_done == 1)
    s = page.status()
    assert s["status"] == "running" and s["key"] == key and s["sections"] == 2 and s["partial_video"].endswith(".mp4")
    json.dumps(s)  # plain data for API clients
    page.engine.gate.set()
    page.worker.wait(key, 10)
    s = page.status()
    assert s["recent"][0] == {"key": key, "status": "done", "job_id": s["job_id"], "error": None}


# ----- models panel and download ----------------------------------------------------------------------------------


class FolderHub:
    """Serves a local model folder as if it were the hub repositories (offline download test)."""

    def __init__(self, root: Path):
        self.root = root

    def _files(self, repo_id):
        files = {}
        for spec in PARTS.values():
            if spec.repo_id != repo_id:
                continue
            for f in (self.root / spec.subfolder).iterdir():
                repo_path = f"{spec.repo_subfolder}/{f.name}" if spec.repo_subfolder else f.name
                files[repo_path] = f
        return files

    def list_files(self, repo_id):
        return "rev", {path: f.stat().st_size for path, f in self._files(repo_id).items()}

    def fetch(self, repo_id, revision, repo_path, staging_dir, tqdm_class):
        source = self._files(repo_id)[repo_path]
        bar = tqdm_class(total=source.stat().st_size, initial=0, desc=repo_path)
        target = Path(staging_dir) / repo_path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        bar.update(source.stat().st_size)
        bar.close()
        return target


def test_models_panel_download_and_folder(tiny_model_dir, tmp_path):
    empty = tmp_path / "models"
    complete, text = render.models_report(empty)
    assert not complete and "does not exist" in text and "transformer (25.7 GB)" in text and "GB**" in text
    assert render.models_report(tiny_model_dir) == (True, f"Models: `{tiny_model_dir}` is complete.")

    manager = downloads.DownloadManager(hub=FolderHub(tiny_model_dir))
    page = handlers.Page(Worker(engine=object()), empty, tmp_path / "out", downloads=manager)
    assert page.models_panel()[1]["visible"] is True
    message, box = page.start_download("inverted")
    assert message == "Download started." and "Starting" in box
    manager.wait(60)
    progress, running, error, finished, _ = manager.snapshot()
    assert error is None and finished and not running and progress.fraction == 1.0
    assert render.models_report(empty)[0]
    out = dict(zip(handlers.POLL_OUTPUTS, page.poll({})))
    assert "Download finished" in out["download_html"] and out["models_group"]["visible"] is False

    html = render.download_html(replace(progress, bytes_done=3_200_000_000, bytes_total=42_000_000_000, finished=False,
                                      bytes_per_second=45e6, eta_seconds=862.0, current_file="vae/x.safetensors"),
                             True, None, False)
    assert "3.2 GB of 42.0 GB · 45 MB/s · about 14:22 left" in html and "vae/x.safetensors" in html

    class Offline:
        def list_files(self, repo_id):
            raise ConnectionError("no route to host")

    failing = handlers.Page(Worker(engine=object()), tmp_path / "m2", tmp_path / "out",
                       downloads=downloads.DownloadManager(hub=Offline()))
    failing.start_download("inverted")
    failing.downloads.wait(30)
    _, _, error, finished, _ = failing.downloads.snapshot()
    assert not finished and one_sentence(error) and ("huggingface" in error.lower() or "hub" in error.lower()), error
    assert "fpl-error" in dict(zip(handlers.POLL_OUTPUTS, failing.poll({})))["download_html"]

    message, _, _ = failing.use_models_folder(str(tmp_path / "nothing"))
    assert message.startswith("⚠️") and "not a complete model folder" in message
    message, text, group = failing.use_models_folder(str(tiny_model_dir))
    assert message == f"Using the models in {tiny_model_dir}." and failing.models_dir == tiny_model_dir
    assert group["visible"] is False
    assert failing.use_models_folder("  ")[0].startswith("⚠️")


def test_system_html(tiny_model_dir, tmp_path):
    html = render.system_html(tiny_model_dir, tmp_path / "not-yet")
    assert "GPU" in html and "RAM" in html and "Disk (outputs)" in html and "free" in html
    assert "Memory plan" in html  # the planner's table for a default job
    assert "Memory plan" not in render.system_html(tmp_path / "no-models", tmp_path)


def test_header_banners():
    assert "demo_banner" not in render.header_html(False, False)
    assert "noise" in render.header_html(True, False) and "open to your network" in render.header_html(False, True)


# ----- building the page and the command line -----------------------------------------------------------------------


def test_build_app_has_stable_api_names(tiny_model_dir, tmp_path):
    blocks = layout.build_app(Worker(engine=object()), tiny_model_dir, tmp_path, demo=True)
    names = {fn.api_name for fn in blocks.fns.values() if fn.api_name}
    assert {"start", "stop", "poll", "remove_queued", "history", "history_select", "reuse", "resume",
            "download_models", "set_models_folder", "status", "system"} <= names
    assert isinstance(blocks.page, handlers.Page) and blocks.page.demo


def test_command_line_defaults_are_local_only(tmp_path):
    args = launch.parse_args([])
    assert (args.port, args.listen, args.demo, args.no_browser, args.models) == (7860, False, False, False, None)
    kw = launch.launch_kwargs(args, tmp_path / "models", tmp_path / "outputs")
    assert kw["server_name"] == "127.0.0.1" and kw["inbrowser"] is True
    assert kw["allowed_paths"] == [str(tmp_path / "outputs")] and kw["max_file_size"] == launch.MAX_UPLOAD
    assert kw["show_error"] is True and kw["css"] and kw["theme"] is not None  # Gradio's refusals carry their sentence
    args = launch.parse_args(["--listen", "--no-browser", "--port", "9000", "--demo", "--models", "m", "--outputs", "o"])
    kw = launch.launch_kwargs(args, tmp_path, tmp_path)
    assert (kw["server_name"], kw["server_port"], kw["inbrowser"]) == ("0.0.0.0", 9000, False)


def test_list_jobs_newest_first_through_page(page, photo):
    keys = []
    for prompt in ("one", "two"):
        _, key = start(page, photo, prompt=prompt)
        page.engine.gate.set()
        page.worker.wait(key, 10)
        page.engine.gate.clear()
        keys.append(key)
    assert [j.prompt for j in list_jobs(page.outputs_dir)] == ["two", "one"]


def test_demo_builds_a_tiny_model_once(tmp_path):
    args = launch.parse_args(["--demo", "--models", str(tmp_path / "demo")])
    models = launch.resolve_models(args)
    assert models == (tmp_path / "demo").resolve() and render.models_report(models)[0]
    stamp = (models / "source.json").stat().st_mtime_ns
    assert launch.resolve_models(args) == models and (models / "source.json").stat().st_mtime_ns == stamp
    assert launch.resolve_models(launch.parse_args([])) == DEFAULT_MODELS


def test_a_cpu_page_starts_with_a_job_that_takes_seconds(tiny_model_dir, tmp_path):
    from framepack_local.worker import Worker as RealWorker

    worker = RealWorker(engine=object())
    try:
        app = layout.build_app(worker, tiny_model_dir, tmp_path / "outputs")
    finally:
        worker.shutdown()
    by_id = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    # No GPU here: the small settings, and the page says why.
    assert (by_id["seconds"].value, by_id["steps"].value, by_id["resolution"].value) == (
        forms.SMALL_JOB["seconds"], forms.SMALL_JOB["steps"], forms.SMALL_JOB["resolution"])
    assert "No GPU was found" in by_id["header"].value and "small_banner" in by_id["header"].value
    assert forms.form_defaults(False) == forms.DEFAULTS and forms.DEFAULTS.steps == 25


def test_check_this_computer_shows_the_doctor_report(tiny_model_dir, tmp_path):
    page = handlers.Page(Worker(engine=object()), tiny_model_dir, tmp_path / "outputs")
    try:
        html = page.check_computer()
    finally:
        page.worker.shutdown()
    assert 'id="doctor_report"' in html and "GPU usable" in html and "This computer can run jobs." in html


def test_history_details_show_the_cache_count_and_the_storyboard(tmp_path):
    from framepack_local.jobs.listing import JobSummary

    job = JobSummary("20250101-000000-abcdef", tmp_path, "waves", 5.0, "", "done", None, None, 2, 2, None,
                     {"steps": 25, "cache": "mag", "timed_prompts": [[2.4, "storm"]], "keyframes": []},
                     steps_computed=(13, 13), attention="sdpa")
    text = render.history_details(job)
    assert "mag step cache, 26 of 50 steps computed, sdpa attention" in text
    assert "storyboard: 1 timed prompt, 0 keyframes" in text
    assert "step cache" not in render.history_details(JobSummary(
        "x", tmp_path, "", None, "", "done", None, None, 0, None, None, {}))  # old records: nothing to say


def test_lora_picker_start_reuse_and_refresh(page, photo, tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    from framepack_local.ui import loras as ui_loras
    from lora_files import random_lora, write_lora

    models = tmp_path / "models"
    models.mkdir()
    for part in tiny_model_dir.iterdir():
        (models / part.name).symlink_to(part, target_is_directory=part.is_dir())
    (models / "loras" / "styles").mkdir(parents=True)
    config = json.loads((tiny_model_dir / "transformer" / "config.json").read_text())
    write_lora(models / "loras" / "one.safetensors", random_lora(tiny_model_dir), "kohya", config)
    page.models_dir = models
    assert page.lora_files()["choices"] == ["one.safetensors"]
    write_lora(models / "loras" / "styles" / "two.safetensors", random_lora(tiny_model_dir, seed=3), "original", config)
    import torch

    save_file({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 4)}, str(models / "loras" / "wan.safetensors"))
    assert page.lora_files()["choices"] == ["one.safetensors", "styles/two.safetensors", "wan.safetensors"]
    assert [u["visible"] for u in ui_loras.slider_updates(["one.safetensors", "styles/two.safetensors"])] == [
        True, True, False, False]
    assert ui_loras.slider_updates(["styles/two.safetensors"])[0]["label"] == "Weight of two.safetensors"

    message, key = start(page, photo, lora_files=["one.safetensors", "styles/two.safetensors"], lora_weight_1=0.5,
                         lora_weight_2=-1.25)
    assert key, message
    wait_for(lambda: page.engine.calls)
    assert page.engine.calls[0].loras == ((str(models / "loras" / "one.safetensors"), 0.5),
                                          (str(models / "loras" / "styles" / "two.safetensors"), -1.25))
    page.engine.gate.set()
    assert page.worker.wait(key, 10).status == "done"
    filled = dict(zip(forms.FORM_FIELDS, page.reuse(page.history()[2][0])[:-3]))
    assert filled["lora_files"] == ["one.safetensors", "styles/two.safetensors"]
    assert (filled["lora_weight_1"], filled["lora_weight_2"], filled["lora_weight_3"]) == (0.5, -1.25, 1.0)

    for changes, words in [(dict(lora_files=["wan.safetensors"]), "matches none"),
                           (dict(lora_files=["one.safetensors"], lora_weight_1=2.5), "between -2 and 2"),
                           (dict(lora_files=["gone.safetensors"]), "was not found"),
                           (dict(lora_files=["one.safetensors"] * 5), "at most 4 LoRAs")]:
        message, key = start(page, photo, **changes)
        assert key == "" and words in message and one_sentence(message[3:]), message
    assert len(page.engine.calls) == 1
