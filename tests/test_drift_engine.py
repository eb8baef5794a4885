"""Drift inside jobs on the tiny model: the report after the final video, colour correction, retries."""

import json

import numpy as np
import pytest

from framepack_local.engine.generate import Engine
from framepack_local.jobs import store
from framepack_local.params import JobParams


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu")


def tiny(tiny_model_dir, photo, outputs, **kw):
    base = dict(image=str(photo), prompt="a boat on a lake", seconds=1.0, window=2, steps=2, resolution=64,
                models=str(tiny_model_dir), outputs=str(outputs), seed=7, cache="off")
    return JobParams(**{**base, **kw})


@pytest.fixture(scope="module")
def finished(engine, tiny_model_dir, photo, tmp_path_factory):
    return engine.generate(tiny(tiny_model_dir, photo, tmp_path_factory.mktemp("drift-job")))


def test_a_finished_job_carries_its_drift_report(finished):
    result = finished
    record = store.read_record(result.job_dir)
    found = record["drift"]
    assert set(found["delta"]) == {"sharpness", "color", "motion", "similarity"}
    assert found["delta"]["similarity"] is not None  # the tiny folder has the SigLIP encoder
    data = json.loads((result.job_dir / "drift.json").read_text())
    assert data["frames"] == record["frames"] == 33 and data["seams"] == [9, 17, 25]  # window 2: 8 frames a section
    assert len(data["similarity"]) == record["sections"]  # one frame per section
    assert (result.job_dir / "drift.png").stat().st_size > 5000
    assert record["timings_s"]["drift"] > 0


def test_the_page_shows_the_deltas_and_the_chart_under_the_video_and_in_history(finished):
    from framepack_local.jobs.listing import list_jobs
    from framepack_local.ui.render import drift_html, history_details

    job = list_jobs(finished.job_dir.parent)[0]
    assert job.drift is not None
    box = drift_html(job.job_dir, job.drift)
    chart = (finished.job_dir / "drift.png").resolve()
    assert f'src="/gradio_api/file={chart}"' in box and "Δ colour" in box and "Δ similarity" in box
    assert box in history_details(job)
    assert drift_html(job.job_dir, None) == ""


# ---- colour correction (engine/color.py)

def cast_section(seed=0, frames=9, size=48):
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(0.2, 0.8, (frames, size // 4, size // 4, 3))
    return np.kron(blocks, np.ones((1, 4, 4, 1))).astype(np.float32)


def test_a_colour_cast_section_comes_out_with_the_reference_statistics():
    import torch

    from framepack_local.engine import color

    clean = cast_section()
    reference = color.lab_stats(clean)
    cast = clean.copy()
    cast[..., 0] = np.clip(cast[..., 0] * 1.15 + 0.05, 0, 1)  # warmer and brighter
    cast[..., 2] *= 0.85
    before = color.lab_stats(cast)
    corrector = color.ColourCorrector("start", 1.0, reference)
    out, entry = corrector.correct(torch.from_numpy(cast), slice(None), keep_first=True)
    after = color.lab_stats(out[1:].numpy())
    # Tolerance: 1.5 CIELAB units on each channel mean, 8% on each spread (gamut clipping is the rest).
    gap_before = np.abs(np.subtract(before["mean"], reference["mean"])).max()
    assert gap_before > 5
    assert np.abs(np.subtract(after["mean"], reference["mean"])).max() < 1.5
    assert np.allclose(after["std"], reference["std"], rtol=0.08)
    assert torch.equal(out[0], torch.from_numpy(cast[0]))  # the start frame itself is untouched
    again, _ = color.ColourCorrector("start", 1.0, reference).correct(torch.from_numpy(cast), slice(None), True)
    assert torch.equal(out, again)  # deterministic
    half, _ = color.ColourCorrector("start", 0.5, reference).correct(torch.from_numpy(cast), slice(None), True)
    half_gap = np.abs(np.subtract(color.lab_stats(half[1:].numpy())["mean"], reference["mean"])).max()
    assert 0.3 * gap_before < half_gap < 0.7 * gap_before
    neighbour = color.ColourCorrector("neighbour", 1.0, reference)
    same, entry = neighbour.correct(torch.from_numpy(cast), slice(None), False)
    assert entry["map"] is None and same is not None  # the first section has no neighbour yet


def stop_after(sections, cancel):
    from framepack_local.events import SectionFinished

    def on_event(event):
        if isinstance(event, SectionFinished) and event.section == sections:
            cancel.cancel()
    return on_event


@pytest.mark.parametrize("mode,correction", [("inverted", "start"), ("forward", "neighbour")])
def test_colour_correction_survives_a_resume_bit_identically(engine, tiny_model_dir, photo, tmp_path, mode,
                                                             correction):
    from framepack_local.events import CancelToken
    from framepack_local.jobs.video import read_frames

    kw = dict(mode=mode, color_correction=correction, color_strength=1.0, drift_report=False, seconds=1.4)
    clean = engine.generate(tiny(tiny_model_dir, photo, tmp_path / "clean", **kw))
    cancel = CancelToken()
    stopped = engine.generate(tiny(tiny_model_dir, photo, tmp_path / "resumed", **kw),
                              on_event=stop_after(2, cancel), cancel=cancel)
    assert stopped.status == "stopped"
    resumed = engine.resume(stopped.job_dir)
    a, b = store.read_record(clean.job_dir), store.read_record(resumed.job_dir)
    assert b["resumed"] == 1 and len(a["color_correction"]) == a["sections"] == 5
    assert a["color_correction"] == b["color_correction"]
    assert sum(e["map"] is not None for e in a["color_correction"]) >= 4
    assert np.array_equal(read_frames(clean.video_path), read_frames(resumed.video_path))
    off = engine.generate(tiny(tiny_model_dir, photo, tmp_path / "off", **{**kw, "color_correction": "off"}))
    frames_off, frames_on = read_frames(off.video_path), read_frames(clean.video_path)
    assert not np.array_equal(frames_off[1:], frames_on[1:])
    # The start frame is never corrected (what is left is the mp4's compression of a different neighbourhood).
    assert np.abs(frames_off[0].astype(int) - frames_on[0].astype(int)).mean() < 2.0
