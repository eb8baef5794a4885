"""The page in a real browser (Debian chromium through playwright) against app.py in a subprocess.

Upload a photo, Start, see the latent preview and a playable <video>, close the tab mid-job and
open a new one (the job is still running and shown), Stop, keep the video so far. A screenshot of
the running page goes to test-artifacts/running-page.png.
"""

from pathlib import Path

import pytest

from appserver import REPO, module_turn

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"
TIMEOUT_MS = 120_000

if not CHROMIUM.exists():
    pytest.skip("needs Debian chromium at /usr/bin/chromium (apt-get install chromium); .ci/run installs it",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package "
                                                            "(pip install -r requirements-test.txt)")
pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def server(app_server, request):
    # conftest runs this module first on the shared server: a fresh tab shows no earlier job
    with module_turn(app_server, request.session) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def context(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1100})
    ctx.set_default_timeout(TIMEOUT_MS)
    yield ctx
    ctx.close()


def set_number(page, elem_id: str, value) -> None:
    """Type a number and commit it; again if the field was re-rendered under the typing (an accordion's
    content mounts on first open) and the slider never took the value, which would send the old one."""
    check = """([id, v]) => { const r = document.querySelector('#' + id + ' input[type=range]');
                             return !r || Number(r.value) === Number(v); }"""
    for _ in range(5):
        box = page.locator(f"#{elem_id} input[type=number]")
        box.fill(str(value))
        box.press("Tab")  # commit the value (the slider follows)
        try:
            page.wait_for_function(check, arg=[elem_id, value], timeout=3000)
            return
        except sync_api.TimeoutError:
            continue
    raise AssertionError(f"#{elem_id} did not take the value {value}")


def open_page(context, url):
    page = context.new_page()
    page.goto(url)
    page.locator("#start_btn").wait_for(state="visible")
    return page


def video_duration(page, elem_id: str) -> float:
    """Wait until the <video> of a component has loaded its metadata; return its duration in seconds."""
    page.wait_for_function(
        """id => { const v = document.querySelector('#' + id + ' video');
                   return v && v.readyState >= 1 && v.duration > 0; }""",
        arg=elem_id, timeout=TIMEOUT_MS)
    return page.locator(f"#{elem_id} video").evaluate("v => v.duration")


def test_start_preview_video_reopen_and_stop(server, context, photo):
    page = open_page(context, server.url)
    assert page.title() == "FramePack Local"
    assert page.locator("#models_panel").count() == 0 or not page.locator("#models_panel").is_visible()

    page.locator("#start_image input[type=file]").set_input_files(str(photo))
    page.locator("#start_image img").first.wait_for(state="visible")
    page.locator("#prompt textarea").fill("a boat drifts across the lake")
    set_number(page, "seconds", 20)  # 150 sections of window 1: long enough to look at, stopped below
    set_number(page, "steps", 4)
    page.locator("#advanced .label-wrap").click()
    page.locator("#resolution").wait_for(state="visible")
    set_number(page, "resolution", 64)
    set_number(page, "window", 1)
    page.wait_for_function("() => document.querySelector('#length_line').innerText.includes('150 sections')")

    page.locator("#start_btn").click()
    page.wait_for_function("() => document.querySelector('#message').innerText.includes('Started')")
    # a latent preview appears during sampling, then a playable video of the first section(s)
    page.locator("#preview img").first.wait_for(state="visible")
    assert video_duration(page, "partial_video") > 0
    page.wait_for_function("() => document.querySelector('#progress').innerText.includes('Section')")
    progress = page.locator("#progress").inner_text()
    assert "step" in progress and "elapsed" in progress
    assert page.locator("#stop_btn").is_enabled()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "running-page.png"), full_page=True)
    job = page.locator("#progress .fpl-progress").get_attribute("data-job")
    assert job

    # closing the tab stops nothing: a new tab shows the same running job, with progress and video
    page.close()
    page = open_page(context, server.url)
    page.wait_for_function(
        """job => { const p = document.querySelector('#progress .fpl-progress');
                    return p && p.dataset.job === job && p.dataset.status === 'running'
                           && p.innerText.includes('Section'); }""", arg=job)
    page.locator("#preview img").first.wait_for(state="visible")
    assert video_duration(page, "partial_video") > 0
    # the new tab's progress keeps moving
    first = page.locator("#progress").inner_text()
    page.wait_for_function("t => document.querySelector('#progress').innerText !== t", arg=first)

    page.locator("#stop_btn").click()
    page.wait_for_function(
        "() => { const p = document.querySelector('#progress .fpl-progress'); return p && p.dataset.status === 'stopped'; }")
    assert "the video so far is kept" in page.locator("#progress").inner_text()
    assert video_duration(page, "partial_video") > 0
    page.wait_for_function("() => document.querySelector('#stop_btn').disabled")
    # the stopped job is in the history and can be resumed
    page.wait_for_function("() => document.querySelectorAll('#history_gallery img').length >= 1")
    page.locator("#history_gallery img").first.click()
    page.wait_for_function("() => document.querySelector('#history_details').innerText.includes('stopped')")
    page.wait_for_function("() => !document.querySelector('#resume_btn').disabled")
    assert page.locator(".toast-body.error").count() == 0
    assert (server.outputs / job / "partial.mp4").is_file()
    assert not (server.outputs / job / ".preview").exists()  # a stopped job's video is served as it is


def test_too_large_upload_is_refused_with_a_sentence(server, context, tmp_path):
    page = open_page(context, server.url)
    big = tmp_path / "huge.png"
    with open(big, "wb") as f:
        f.truncate(51 * 1024 * 1024)
    page.locator("#start_image input[type=file]").set_input_files(str(big))
    toast = page.locator(".toast-body").first
    toast.wait_for(state="visible")
    text = toast.inner_text()
    assert "50" in text and ("size" in text.lower() or "large" in text.lower()), text
    assert page.locator("#start_image img").count() == 0
    assert server.alive()


def test_speed_choice_fills_the_step_cache_settings(server, context):
    page = open_page(context, server.url)
    assert page.locator("#speed input[value=balanced]").is_checked()  # MagCache is on by default
    page.locator("#advanced .label-wrap").click()
    threshold = page.locator("#cache_threshold input[type=number]")
    threshold.wait_for(state="visible")
    assert float(threshold.input_value()) == 0.1
    page.locator("#speed label", has_text="Fast").click()
    page.wait_for_function("() => document.querySelector('#cache_threshold input').value === '0.15'")
    assert page.locator("#cache_max_skip input[type=number]").input_value() == "4"
    set_number(page, "cache_max_skip", 3)  # no preset has that: Speed shows none
    page.wait_for_function("() => !document.querySelector('#speed input:checked')")
    page.locator("#speed label", has_text="Off").click()
    page.wait_for_function("() => document.querySelector('#cache input').value === 'Off'")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "speed-settings.png"), full_page=True)


def test_storyboard_rows_reach_the_job(server, context, photo, end_photo):
    import json

    page = open_page(context, server.url)
    page.locator("#start_image input[type=file]").set_input_files(str(photo))
    page.locator("#start_image img").first.wait_for(state="visible")
    page.locator("#prompt textarea").fill("a calm lake")
    set_number(page, "seconds", 1)
    set_number(page, "steps", 2)
    page.locator("#advanced .label-wrap").click()
    page.locator("#resolution").wait_for(state="visible")
    set_number(page, "resolution", 64)
    set_number(page, "window", 1)  # 8 sections of 4 frames: boundaries every 0.13 s

    page.locator("#storyboard .label-wrap").click()
    set_number(page, "story_at_1", 0.3)
    page.locator("#story_prompt_1 textarea").fill("a storm rolls in")
    page.locator("#story_add").click()
    page.locator("#story_at_2").wait_for(state="visible")
    set_number(page, "story_at_2", 0.5)
    page.locator("#story_image_2 input[type=file]").set_input_files(str(end_photo))
    page.locator("#story_image_2 img").first.wait_for(state="visible")
    # The plan shows the keyframe's stretch before anything runs.
    page.wait_for_function("() => document.querySelector('#section_plan').innerText.includes('key@0.5s')")
    assert "a storm rolls in" in page.locator("#section_plan").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "storyboard.png"), full_page=True)

    before = page.locator("#progress .fpl-progress").get_attribute("data-job")  # the last job shown, if any
    page.locator("#start_btn").click()
    page.wait_for_function("() => document.querySelector('#message').innerText.includes('Started')")
    page.wait_for_function(
        """before => { const p = document.querySelector('#progress .fpl-progress');
                       return p && p.dataset.job && p.dataset.job !== before && p.dataset.status === 'done'; }""",
        arg=before or "")
    job = page.locator("#progress .fpl-progress").get_attribute("data-job")
    record = json.loads((server.outputs / job / "job.json").read_text())
    assert record["params"]["timed_prompts"] == [[0.3, "a storm rolls in"]]
    assert [k["at"] for k in record["storyboard"]["keyframes"]] == [0.5]
    assert (server.outputs / job / "keyframe_01.png").is_file()


def test_a_ten_section_job_is_served_from_its_folder_and_the_page_follows_it(server, context, photo):
    cache = server.log_path.parent / "gradio-cache"
    copies_before = len(list(cache.rglob("*.mp4"))) if cache.is_dir() else 0
    page = open_page(context, server.url)
    page.locator("#start_image input[type=file]").set_input_files(str(photo))
    page.locator("#start_image img").first.wait_for(state="visible")
    page.locator("#prompt textarea").fill("a lighthouse at dusk")
    set_number(page, "seconds", 1.3)
    set_number(page, "steps", 12)  # about a second per section here: a few polls see each one
    page.locator("#advanced .label-wrap").click()
    page.locator("#resolution").wait_for(state="visible")
    set_number(page, "resolution", 64)
    set_number(page, "window", 1)
    page.wait_for_function("() => document.querySelector('#length_line').innerText.includes('10 sections')")
    # Start sits with the inputs at the top, above the settings.
    start_box, advanced_box = page.locator("#start_btn").bounding_box(), page.locator("#advanced").bounding_box()
    assert start_box["y"] < advanced_box["y"]

    before = page.locator("#progress .fpl-progress").get_attribute("data-job") or ""
    page.locator("#start_btn").click()
    page.wait_for_function("() => document.querySelector('#message').innerText.includes('Started')")
    message = page.locator("#message").inner_text()
    page.wait_for_function("""before => { const p = document.querySelector('#progress .fpl-progress');
                                          return p && p.dataset.job && p.dataset.job !== before; }""", arg=before)
    job = page.locator("#progress .fpl-progress").get_attribute("data-job")
    assert job in message  # the id Start names is the job's folder and History entry

    sources = set()
    for _ in range(2):  # the video so far is a new file name after each section, so the browser reloads it
        page.wait_for_function(
            """seen => { const v = document.querySelector('#partial_video video');
                         return v && v.currentSrc && !seen.includes(v.currentSrc); }""", arg=list(sources))
        sources.add(page.locator("#partial_video video").evaluate("v => v.currentSrc"))
        if len(sources) == 1:
            page.locator("#preview img.fpl-frame").wait_for(state="visible")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "page-mid-job.png"), full_page=True)
    assert all(f"{job}/.preview/" in src and src.endswith("partial.mp4") for src in sources), sources

    page.wait_for_function(
        "() => { const p = document.querySelector('#progress .fpl-progress'); return p && p.dataset.status === 'done'; }")
    assert video_duration(page, "final_video") > 0
    page.screenshot(path=str(ARTIFACTS / "page-after-job.png"), full_page=True)
    copies_after = len(list(cache.rglob("*.mp4"))) if cache.is_dir() else 0
    assert copies_after - copies_before <= 1, (copies_before, copies_after)
    assert not (server.outputs / job / ".preview").exists()  # the per-section names go with the final video
    import json

    assert json.loads((server.outputs / job / "job.json").read_text())["params"]["resolution"] == 64


def test_lora_picker_reaches_the_job(server, context, photo, tiny_model_dir):
    """A LoRA put into models/loras/ while the page is open: Refresh, pick it, set its weight, Start."""
    import json

    from lora_files import random_lora, write_lora

    config = json.loads((tiny_model_dir / "transformer" / "config.json").read_text())
    (tiny_model_dir / "loras").mkdir(exist_ok=True)
    write_lora(tiny_model_dir / "loras" / "browser-test.safetensors", random_lora(tiny_model_dir), "kohya", config)
    try:
        page = open_page(context, server.url)
        page.locator("#start_image input[type=file]").set_input_files(str(photo))
        page.locator("#start_image img").first.wait_for(state="visible")
        set_number(page, "seconds", 1)
        set_number(page, "steps", 1)
        page.locator("#advanced .label-wrap").click()
        page.locator("#resolution").wait_for(state="visible")
        set_number(page, "resolution", 64)
        set_number(page, "window", 8)  # one section
        page.locator("#lora .label-wrap").click()
        page.locator("#lora_refresh").click()
        page.locator("#lora_files input").click()
        page.locator("ul[role=listbox] li", has_text="browser-test.safetensors").click()
        page.locator("#lora_weight_1").wait_for(state="visible")
        assert "browser-test.safetensors" in page.locator("#lora_weight_1").inner_text()
        set_number(page, "lora_weight_1", -0.5)
        before = page.locator("#progress .fpl-progress").get_attribute("data-job")
        page.locator("#start_btn").click()
        page.wait_for_function("() => document.querySelector('#message').innerText.includes('Started')")
        page.wait_for_function(
            """before => { const p = document.querySelector('#progress .fpl-progress');
                           return p && p.dataset.job && p.dataset.job !== before && p.dataset.status === 'done'; }""",
            arg=before or "")
        job = page.locator("#progress .fpl-progress").get_attribute("data-job")
        record = json.loads((server.outputs / job / "job.json").read_text())
        assert [(e["name"], e["weight"]) for e in record["loras"]] == [("browser-test.safetensors", -0.5)]
    finally:
        (tiny_model_dir / "loras" / "browser-test.safetensors").unlink()
