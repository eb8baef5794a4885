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
    base = dict(image=str(photo), prompt="a boat on a lake", seconds=0.8, window=2, steps=2, resolution=64,
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
    assert data["frames"] == record["frames"] == 25 and data["seams"] == [9, 17]  # window 2: 8 frames a section
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


def test_retry_forced_to_fail_resamples_n_times_with_the_expected_seeds_and_resume_reproduces_it(
        engine, tiny_model_dir, photo, tmp_path, monkeypatch, finished):
    """Colour correction (neighbour) and retries together, through a stop and a resume: the same attempts,
    the same choices, the same colour maps and bit-identical frames as an uninterrupted run."""
    from framepack_local.engine import retry
    from framepack_local.events import CancelToken, Notice
    from framepack_local.jobs.video import read_frames

    monkeypatch.setattr(retry, "fails", lambda margins: ["similarity"])  # every attempt "drifted"
    n = 1
    kw = dict(auto_retry=n, color_correction="neighbour", color_strength=1.0, drift_report=False)
    notices = []
    clean = engine.generate(tiny(tiny_model_dir, photo, tmp_path / "clean", **kw),
                            on_event=lambda e: notices.append(e.message) if isinstance(e, Notice) else None)
    a = store.read_record(clean.job_dir)
    sections = a["sections"]
    assert [r["section"] for r in a["retries"]] == list(range(sections))
    for r in a["retries"]:
        assert [x["seed"] for x in r["attempts"]] == [None] + [retry.attempt_seed(7, r["section"], k)
                                                              for k in range(1, n + 1)]
        assert r["attempts"][0]["scores"]["similarity"] is not None
    assert len(a["section_scores"]) == sections
    assert sum("drifted" in m for m in notices) == sections

    cancel = CancelToken()
    stopped = engine.generate(tiny(tiny_model_dir, photo, tmp_path / "resumed", **kw),
                              on_event=stop_after(2, cancel), cancel=cancel)
    assert stopped.status == "stopped"
    resumed = engine.resume(stopped.job_dir)
    b = store.read_record(resumed.job_dir)
    assert b["resumed"] == 1
    for key in ("retries", "section_scores", "color_correction"):
        assert a[key] == b[key], key
    assert sum(e["map"] is not None for e in a["color_correction"]) == sections - 1  # the first has no neighbour
    assert store.job_latents(clean.job_dir, "inverted").equal(store.job_latents(resumed.job_dir, "inverted"))
    frames_on = read_frames(clean.video_path)
    assert np.array_equal(frames_on, read_frames(resumed.video_path))
    # The start frame is never corrected (what is left is the mp4 compressing different neighbours).
    frames_off = read_frames(finished.video_path)
    assert not np.array_equal(frames_off[1:], frames_on[1:])
    assert np.abs(frames_off[0].astype(int) - frames_on[0].astype(int)).mean() < 2.0


def test_retry_forced_to_pass_never_resamples(engine, tiny_model_dir, photo, tmp_path, monkeypatch, finished):
    from framepack_local.engine import retry
    from framepack_local.events import StageChanged

    monkeypatch.setattr(retry, "fails", lambda margins: [])
    stages = []
    result = engine.generate(tiny(tiny_model_dir, photo, tmp_path, auto_retry=3, drift_report=False),
                             on_event=lambda e: stages.append(e.message) if isinstance(e, StageChanged) else None)
    record = store.read_record(result.job_dir)
    assert record["retries"] == [] and len(record["section_scores"]) == record["sections"]
    assert not [m for m in stages if "again" in m]
    assert store.job_latents(result.job_dir, "inverted").equal(store.job_latents(finished.job_dir, "inverted"))


def test_scores_judge_a_blurred_or_jumping_section_against_the_ones_before():
    import torch

    from framepack_local.engine import retry

    sharp = torch.from_numpy(cast_section(0, frames=9)).clone()
    blurred = sharp.clone()
    blurred[:] = sharp.mean(dim=(1, 2), keepdim=True)  # all detail gone
    new = slice(0, 5)  # inverted: the new frames first, then the neighbour's re-decoded edge
    kept = [retry.score(sharp, new, True, None, None)] * 2
    limits = retry.Thresholds()
    assert retry.fails(retry.badness(retry.score(sharp, new, True, None, None), kept, limits)) == []
    assert retry.fails(retry.badness(retry.score(blurred, new, True, None, None), kept, limits)) == ["sharpness"]
    cut = sharp.clone()
    cut[5:] = torch.from_numpy(cast_section(1, frames=4))  # the neighbour's edge shows another picture
    steady = sharp.clone()
    steady[:] = sharp[0]
    base = [retry.score(steady, new, True, None, None)]
    assert "seam_jump" in retry.fails(retry.badness(retry.score(torch.cat([steady[:5], cut[5:]]), new, True, None,
                                                                None), base, limits))
    assert retry.fails(retry.badness(retry.score(sharp, new, True, None, None), [], limits)) == []  # no history
    seeds = {retry.attempt_seed(7, s, k) for s in range(3) for k in range(1, 4)}
    assert len(seeds) == 9 and retry.attempt_seed(7, 0, 1) == retry.attempt_seed(7, 0, 1)
