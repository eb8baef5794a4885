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


def test_a_finished_job_carries_its_drift_report(engine, tiny_model_dir, photo, tmp_path):
    result = engine.generate(tiny(tiny_model_dir, photo, tmp_path))
    record = store.read_record(result.job_dir)
    found = record["drift"]
    assert set(found["delta"]) == {"sharpness", "color", "motion", "similarity"}
    assert found["delta"]["similarity"] is not None  # the tiny folder has the SigLIP encoder
    data = json.loads((result.job_dir / "drift.json").read_text())
    assert data["frames"] == record["frames"] == 33 and data["seams"] == [9, 17, 25]  # window 2: 8 frames a section
    assert len(data["similarity"]) == record["sections"]  # one frame per section
    assert (result.job_dir / "drift.png").stat().st_size > 5000
    assert record["timings_s"]["drift"] > 0
