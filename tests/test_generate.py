"""End to end on the tiny model: the CLI, the Python API, determinism and cancel."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framepack_local.engine import schedule
from framepack_local.jobs import store
from framepack_local.events import CancelToken, JobFinished, JobStarted, Notice, SectionFinished, StepProgress
from framepack_local.params import JobParams
from framepack_local.engine.generate import Engine
from framepack_local.jobs.video import probe_video

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu")


def tiny_params(tiny_model_dir, photo, outputs, **kw):
    base = dict(image=str(photo), prompt="a boat on a lake", seconds=1.0, window=2, steps=2, resolution=64,
                models=str(tiny_model_dir), outputs=str(outputs), seed=123)
    base.update(kw)
    return JobParams(**base)


def test_cli_generate_writes_playable_mp4(tiny_model_dir, photo, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "framepack_local", "generate", "--image", str(photo), "--prompt", "waves",
           "--seconds", "1", "--window", "2", "--steps", "2", "--resolution", "64",
           "--models", str(tiny_model_dir), "--outputs", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    video = Path(proc.stdout.strip().splitlines()[-1])
    assert video.name == "video.mp4" and video.is_file()

    n, w = schedule.section_count(1.0, 2), 2
    info = probe_video(video)
    assert info.frames == 4 * n * w + 1 == 33
    record = json.loads((video.parent / "job.json").read_text())
    assert (info.height, info.width) == (record["height"], record["width"])
    assert (info.height, info.width) == schedule.find_bucket(120, 160, 64)
    assert info.codec == "h264" and info.fps == 30
    # parameters embedded in the mp4 itself
    assert json.loads(info.comment)["framepack_local"]["prompt"] == "waves"
    # job record: every parameter, seed, versions, model identity, timings
    assert record["status"] == "done" and record["seed"] == 31337
    assert record["params"]["window"] == 2 and record["params"]["mode"] == "inverted"
    assert {"torch", "diffusers", "transformers"} <= set(record["versions"])
    assert record["models"]["source"]["kind"] == "tiny-random"
    assert record["timings_s"]["total"] > 0
    # a preview after every section: one log line per section naming a playable partial video
    assert proc.stderr.count("done: ") == n
    assert len(list((video.parent / "sections").glob("section_*.safetensors"))) == n


@pytest.mark.parametrize("mode", ["inverted", "forward"])
def test_events_and_previews(engine, tiny_model_dir, photo, tmp_path, mode):
    events = []
    partial_frames = []

    def on_event(e):
        events.append(e)
        if isinstance(e, SectionFinished):
            partial_frames.append(probe_video(e.video_path).frames)  # playable right now

    result = engine.generate(tiny_params(tiny_model_dir, photo, tmp_path, mode=mode), on_event=on_event)
    assert result.status == "done"
    started = [e for e in events if isinstance(e, JobStarted)][0]
    steps = [e for e in events if isinstance(e, StepProgress)]
    assert len(steps) == started.sections * started.steps
    assert steps[0].preview_rgb.dtype.name == "uint8" and steps[0].preview_rgb.shape[2] == 3
    assert [e.section for e in events if isinstance(e, SectionFinished)] == list(range(1, started.sections + 1))
    # the video so far grows by a section each time
    assert partial_frames == sorted(partial_frames) and len(set(partial_frames)) == len(partial_frames)
    assert isinstance(events[-1], JobFinished) and events[-1].video_path == result.video_path
    assert probe_video(result.video_path).frames == started.frames


def test_same_seed_same_latents(engine, tiny_model_dir, photo, tmp_path):
    a = engine.generate(tiny_params(tiny_model_dir, photo, tmp_path / "a"))
    b = engine.generate(tiny_params(tiny_model_dir, photo, tmp_path / "b"))
    c = engine.generate(tiny_params(tiny_model_dir, photo, tmp_path / "c", seed=124))
    la, lb, lc = (store.job_latents(r.job_dir, "inverted") for r in (a, b, c))
    assert torch.equal(la, lb)
    assert not torch.equal(la, lc)
    # start latent first, then 4 sections of 2 latent frames
    assert la.shape[2] == 1 + schedule.section_count(1.0, 2) * 2


def test_cancel_within_one_step_keeps_finished_sections(engine, tiny_model_dir, photo, tmp_path):
    cancel = CancelToken()
    seen = []

    def on_event(e):
        seen.append(e)
        if isinstance(e, StepProgress) and e.section == 2 and e.step == 1:
            cancel.cancel()

    result = engine.generate(tiny_params(tiny_model_dir, photo, tmp_path, steps=3), on_event=on_event,
                             cancel=cancel)
    assert result.status == "stopped"
    steps_after = [e for e in seen if isinstance(e, StepProgress) and e.section >= 2]
    assert len(steps_after) == 1  # stopped before the next step's transformer call
    assert result.video_path.name == "partial.mp4"
    assert probe_video(result.video_path).frames > 0  # the video so far stays playable
    record = json.loads((result.job_dir / "job.json").read_text())
    assert record["status"] == "stopped" and record["sections_done"] == 1
    assert len(list((result.job_dir / "sections").glob("*.safetensors"))) == 1


def test_long_prompt_is_truncated_with_notice(engine, tiny_model_dir, photo, tmp_path):
    notices = []
    words = " ".join(f"word{i} alpha beta" for i in range(200))
    engine.generate(tiny_params(tiny_model_dir, photo, tmp_path, prompt=words, seconds=0.2),
                    on_event=lambda e: isinstance(e, Notice) and notices.append(e.message))
    assert any("longer than the text encoder takes" in m for m in notices)


def test_empty_prompt_and_end_image(engine, tiny_model_dir, photo, end_photo, tmp_path):
    result = engine.generate(tiny_params(tiny_model_dir, photo, tmp_path, prompt="", end_image=str(end_photo)))
    assert result.status == "done"
    assert (result.job_dir / "end_input.png").is_file()
