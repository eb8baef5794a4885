"""What a long job costs before it starts: the disk check (the real limit on length), the time estimate
from a finished job's measured rate, and the page's section plan for thousands of sections."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from framepack_local.engine import budget, schedule, storyboard
from framepack_local.engine.generate import Engine
from framepack_local.errors import InputError
from framepack_local.jobs import store
from framepack_local.params import MAX_SECONDS, JobParams
from framepack_local.ui import forms
from framepack_local.ui.story import plan_preview_html

REPO = Path(__file__).resolve().parents[1]


def test_ten_minutes_and_an_hour_are_accepted_and_more_is_refused(photo):
    assert JobParams(image="x", seconds=600.0).validate().seconds == 600.0
    assert JobParams(image="x", seconds=MAX_SECONDS).validate()
    with pytest.raises(InputError, match="seconds"):
        JobParams(image="x", seconds=MAX_SECONDS + 1).validate()
    assert schedule.total_frames(schedule.section_count(600, 9), 9) >= 18_000


def test_the_disk_need_grows_with_the_video_and_a_resume_needs_less():
    need = budget.disk_need(500, 9, 640, 608, 16)
    double = budget.disk_need(1000, 9, 640, 608, 16)
    assert double.latents == 2 * need.latents and 1.9 < double.video / need.video < 2.1
    # One section file: 16 channels x 10 latent frames x 80 x 76, float32.
    assert budget.section_bytes(9, 640, 608) == 4 * 16 * 10 * 80 * 76 + budget.SECTION_FILE_OVERHEAD
    half_done = budget.disk_need(500, 9, 640, 608, 16, sections_done=250)
    assert half_done.latents == need.latents // 2 and half_done.video < need.video
    assert budget.disk_need(500, 9, 640, 608, 28).video < need.video / 3  # CRF 28 is 4x smaller than 16
    measured = budget.disk_need(500, 9, 640, 608, 16, measured_bytes_per_frame=1000.0)
    frames = schedule.total_frames(500, 9)
    assert measured.video == int(1000.0 * frames * budget.VIDEO_COPIES)
    assert budget.measured_bytes_per_frame({"segments": [{"frames": 10, "bytes": 5000}, {"frames": 30, "bytes": 15000}]}) == 500


def test_a_job_that_cannot_fit_on_the_disk_is_refused_before_anything_is_written(
        tiny_model_dir, photo, tmp_path, monkeypatch):
    out = tmp_path / "out"
    params = JobParams(image=str(photo), seconds=600.0, steps=1, resolution=64, models=str(tiny_model_dir),
                       outputs=str(out))
    need = budget.disk_need(schedule.section_count(600.0, 9), 9, 48, 64, params.crf)
    monkeypatch.setattr(budget, "free_bytes", lambda folder: need.total - 1)
    with pytest.raises(InputError) as caught:
        Engine(device="cpu").generate(params)
    sentence = str(caught.value)
    assert "600 s video needs about" in sentence and "free some space" in sentence
    assert sentence.count(".") <= 4 and str(out) in sentence
    assert not any(p.is_dir() for p in out.iterdir())  # no job folder


def test_a_resume_checks_the_disk_for_what_is_left(tiny_model_dir, photo, tmp_path, monkeypatch):
    from framepack_local.events import CancelToken, SectionFinished

    params = JobParams(image=str(photo), seconds=4.0, steps=1, resolution=64, window=2, cache="off",
                       models=str(tiny_model_dir), outputs=str(tmp_path / "out"))
    cancel = CancelToken()
    engine = Engine(device="cpu")
    result = engine.generate(params, on_event=lambda e: isinstance(e, SectionFinished) and e.section == 2
                             and cancel.cancel(), cancel=cancel)
    assert result.status == "stopped"
    monkeypatch.setattr(budget, "free_bytes", lambda folder: 1000)
    with pytest.raises(InputError, match="free some space"):
        engine.resume(result.job_dir)
    assert store.read_record(result.job_dir)["status"] == "stopped"  # untouched: it can still be resumed


def _record(**changes) -> dict:
    record = {"job_id": "20261202-120000-abcdef", "status": "done", "sections": 10, "height": 640, "width": 608,
              "params": {"steps": 25, "window": 9, "resolution": 640}, "device": "cuda",
              "timings_s": {"sampling": 400.0, "decode": 40.0, "write": 10.0, "load": 99.0}}
    record.update(changes)
    return record


def test_a_finished_jobs_rate_estimates_another_jobs_time():
    rate = budget.rate_of(_record())
    assert rate.seconds_per_step == pytest.approx(400.0 / 250)  # sampling per step
    assert rate.seconds_per_section == pytest.approx(50.0 / 10)  # decode and write per section; load is neither
    assert budget.rate_of(_record(status="stopped")) is None and budget.rate_of(_record(resumed=1)) is None
    assert budget.rate_of(_record(timings_s={})) is None and budget.rate_of({"status": "done"}) is None
    assert budget.estimate_seconds(10, 50, rate.tokens, rate) - budget.estimate_seconds(10, 25, rate.tokens, rate) == (
        pytest.approx(10 * 25 * 1.6))  # more steps cost sampling only
    same = budget.estimate_seconds(500, 25, rate.tokens, rate)
    assert same == pytest.approx(500 * (25 * 1.6 + 5.0))
    assert budget.estimate_seconds(500, 25, rate.tokens // 2, rate) == pytest.approx(same / 2)
    assert [budget.duration_text(s) for s in (42, 600, 3 * 3600 + 600, 5 * 86400)] == [
        "42 s", "10 min", "3 h 10 min", "5.0 days"]


def test_the_latest_rate_comes_from_the_newest_finished_job_on_this_device(tmp_path):
    for job_id, record in (("20261201-100000-aaaaaa", _record(job_id="old")),
                           ("20261202-100000-bbbbbb", _record(job_id="new-cpu", device="cpu")),
                           ("20261202-110000-cccccc", _record(job_id="newest-failed", status="failed"))):
        store.write_record((tmp_path / job_id).mkdir() or tmp_path / job_id, record)
    assert budget.latest_rate(tmp_path, "cuda").job_id == "old"
    assert budget.latest_rate(tmp_path, "cpu").job_id == "new-cpu"
    assert budget.latest_rate(tmp_path / "missing") is None


def test_the_length_line_says_how_long_a_job_takes_here():
    rate = budget.rate_of(_record())
    line = forms.length_line(600, 9, 25, 640, rate)
    assert "made in 500 sections" in line and "About 6 h 15 min" in line and "20261202-120000-abcdef" in line
    assert "roughly" not in line and "roughly" in forms.length_line(600, 9, 25, 320, rate)
    assert "once a first job has finished" in forms.length_line(600, 9, 25, 640, None)


def test_the_page_shows_a_thousand_section_plan_in_a_few_rows():
    plans = storyboard.plan_sections(1500, 2, "inverted", False, [300.0], [], 0)
    table = storyboard.plan_table(plans, ["a road", "rain"], ["photo"], collapse_over=40)
    rows = table.splitlines()[1:]
    assert len(rows) < 10 and any("rain" in r for r in rows) and any("a road" in r for r in rows)
    assert rows[-1].split()[0] == "1500"
    short = storyboard.plan_sections(12, 9, "inverted", False, [], [], 0)
    assert len(storyboard.plan_table(short, ["x"], ["photo"], collapse_over=40).splitlines()) == 13  # one row each
    html = plan_preview_html(600, 9, "inverted", False, "a road", 0, {})
    assert 'data-sections="500"' in html and html.count("\n") < 10


def test_the_command_line_takes_a_ten_minute_job(photo, tiny_model_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "framepack_local", "generate", "--image", str(photo),
                           "--seconds", "600", "--plan-only", "--models", str(tiny_model_dir),
                           "--outputs", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 501  # the header and one row per section
