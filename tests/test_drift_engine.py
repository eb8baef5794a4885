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
