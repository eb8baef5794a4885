"""Step cache on the tiny model: diffusers' MagCache / FirstBlockCache hooks under the engine's contexts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from framepack_local.engine import mag_ratios, step_cache
from framepack_local.engine.generate import Engine
from framepack_local.errors import InputError
from framepack_local.events import CancelToken, SectionFinished
from framepack_local.jobs import store
from framepack_local.params import JobParams
from framepack_local.weights.model_folder import load_part, model_identity
from transformer_inputs import tiny_inputs


def mag(steps=25, **kw):
    return step_cache.plan_step_cache("mag", "forward", steps, **kw)


def test_plan_defaults_refusals_and_interpolation():
    assert JobParams(image="x").cache == "mag"  # on by default, as in every peer
    plan = mag()
    assert (plan.threshold, plan.max_skip_steps, plan.retention_ratio) == (0.1, 2, 0.2)
    assert plan.mag_ratios == mag_ratios.FRAMEPACK_F1_MAG_RATIOS and "MagCache4FramePack" in plan.ratios_source
    inverted = step_cache.plan_step_cache("mag", "inverted", 25)
    assert inverted.mag_ratios == mag_ratios.FRAMEPACK_INVERTED_MAG_RATIOS and "FramePack-Studio" in inverted.ratios_source
    assert len(mag(steps=10).mag_ratios) == 10 and mag(steps=10).mag_ratios[-1] == 0.78516
    assert "interpolated to 10" in mag(steps=10).ratios_source
    assert step_cache.plan_step_cache("off", "inverted", 25).record()["mode"] == "off"
    assert step_cache.plan_step_cache("first-block", "inverted", 25).threshold == 0.05
    with pytest.raises(InputError, match="must be one of"):
        step_cache.plan_step_cache("tea", "forward", 25)
    with pytest.raises(InputError, match="step cache"):
        JobParams(image="x", cache="tea").validate()


def test_planned_schedule_skips_about_half_at_25_steps():
    computed = step_cache.planned_computed_steps(mag(), 25)
    assert computed[:5] == [True] * 5  # retention: int(0.2 * 25 + 0.5) steps always run
    assert sum(computed) == 13  # 25 / 13 = 1.92x fewer transformer evaluations
    assert step_cache.planned_computed_steps(mag(threshold=0.0), 25) == [True] * 25
    assert step_cache.planned_computed_steps(step_cache.plan_step_cache("off", "forward", 25), 25) == [True] * 25


@pytest.fixture(scope="module")
def transformer(tiny_model_dir):
    return load_part(tiny_model_dir, "transformer", "cpu", torch.float32)


def run_steps(transformer, cache, steps, inputs):
    outputs, computed = [], []
    with cache.pass_context("cond"):
        for _ in range(steps):
            before = cache.steps_computed()
            outputs.append(transformer(**inputs)[0])
            computed.append(cache.steps_computed() > before)
    return outputs, computed


@pytest.mark.parametrize("steps", [25, 10])
def test_counted_block_runs_follow_the_ratio_schedule_and_reset_each_section(transformer, steps):
    plan = mag(steps=steps)
    inputs = tiny_inputs()
    cache = step_cache.AttachedCache(transformer, plan, steps)
    try:
        cache.new_section()
        first, computed = run_steps(transformer, cache, steps, inputs)
        assert computed == step_cache.planned_computed_steps(plan, steps)
        assert sum(computed) < steps
        # A section cut short (Stop) must not leave its step index to the next one.
        run_steps(transformer, cache, 3, inputs)
        cache.new_section()
        again, computed_again = run_steps(transformer, cache, steps, inputs)
        assert computed_again == computed
        assert all(torch.equal(a, b) for a, b in zip(first, again))  # deterministic
    finally:
        cache.close()
    assert getattr(transformer, "_cache_config", None) is None  # detached: the next job starts clean


def test_zero_threshold_and_off_equal_the_uncached_model(transformer):
    inputs = tiny_inputs(seed=3)
    plain = [transformer(**inputs)[0] for _ in range(5)]
    for plan in (mag(steps=5, threshold=0.0), step_cache.plan_step_cache("off", "forward", 5)):
        cache = step_cache.AttachedCache(transformer, plan, 5)
        try:
            cache.new_section()
            outputs, computed = run_steps(transformer, cache, 5, inputs)
        finally:
            cache.close()
        assert computed == [True] * 5
        assert all(torch.equal(a, b) for a, b in zip(plain, outputs))


def job(models, photo, outputs, **kw):
    base = dict(image=str(photo), prompt="waves", seconds=0.5, window=2, steps=10, resolution=64, seed=5,
                mode="forward", models=str(models), outputs=str(outputs))
    return JobParams(**{**base, **kw})


def test_engine_records_steps_computed_positive_pass_only_and_zero_threshold_changes_nothing(tiny_model_dir, photo, tmp_path):
    engine = Engine(device="cpu")
    off = engine.generate(job(tiny_model_dir, photo, tmp_path / "off", cache="off"))
    zero = engine.generate(job(tiny_model_dir, photo, tmp_path / "zero", cache="mag", cache_threshold=0.0))
    # Real CFG on the cached job as well: only the positive pass is counted in steps_computed.
    cached = engine.generate(job(tiny_model_dir, photo, tmp_path / "mag", cache="mag", cfg=3.0, negative_prompt="blur"))

    rec_off, rec_mag = store.read_record(off.job_dir), store.read_record(cached.job_dir)
    sections = rec_off["sections"]
    assert rec_off["steps_computed"] == [10] * sections and rec_off["step_cache"]["mode"] == "off"
    planned = sum(step_cache.planned_computed_steps(mag(steps=10), 10))
    assert planned < 10 and rec_mag["steps_computed"] == [planned] * sections
    assert rec_mag["step_cache"]["threshold"] == 0.1 and len(rec_mag["step_cache"]["mag_ratios"]) == 10

    latents = {r: store.job_latents(r.job_dir, "forward") for r in (off, zero, cached)}
    assert torch.equal(latents[off], latents[zero])
    assert not torch.equal(latents[off], latents[cached])


def test_stop_and_resume_with_the_cache_is_bit_identical(tiny_model_dir, photo, tmp_path):
    engine = Engine(device="cpu")
    params = job(tiny_model_dir, photo, tmp_path / "a", cache="mag", seconds=0.8)
    cancel = CancelToken()

    def stop_after_first(event):
        if isinstance(event, SectionFinished):
            cancel.cancel()

    stopped = engine.generate(params, on_event=stop_after_first, cancel=cancel)
    assert stopped.status == "stopped"
    assert len(store.read_record(stopped.job_dir)["steps_computed"]) == 1
    resumed = engine.resume(stopped.job_dir)
    clean = engine.generate(params.replace(outputs=str(tmp_path / "b")))
    assert resumed.status == "done"
    assert torch.equal(store.job_latents(resumed.job_dir, "forward"), store.job_latents(clean.job_dir, "forward"))
    assert store.read_record(resumed.job_dir)["steps_computed"] == store.read_record(clean.job_dir)["steps_computed"]


def test_first_block_cache_and_inverted_mag_follow_their_rules(tiny_model_dir, photo, tmp_path):
    engine = Engine(device="cpu")
    result = engine.generate(job(tiny_model_dir, photo, tmp_path / "fb", cache="first-block", mode="inverted"))
    record = store.read_record(result.job_dir)
    assert record["status"] == "done" and record["step_cache"]["mode"] == "first-block"
    assert all(1 <= n <= 10 for n in record["steps_computed"])
    inverted = engine.generate(job(tiny_model_dir, photo, tmp_path / "inv", mode="inverted", steps=25))
    record = store.read_record(inverted.job_dir)
    planned = sum(step_cache.planned_computed_steps(step_cache.plan_step_cache("mag", "inverted", 25), 25))
    assert record["step_cache"]["mode"] == "mag" and record["steps_computed"] == [planned] * record["sections"]
    assert planned < 25


def test_skipped_steps_onload_no_streamed_block(tiny_model_dir):
    """Streamed blocks (CPU -> CPU here: the prefetcher's ordering is the same) are not copied on skipped steps."""
    from framepack_local.weights.streaming import apply_streaming

    model = load_part(tiny_model_dir, "transformer", "cpu", torch.float32)
    trace = []
    apply_streaming(model, "cpu", resident_blocks=0, trace=trace)
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    inputs = tiny_inputs(seed=1)
    plan = mag()
    for p in (step_cache.plan_step_cache("off", "forward", 25), plan):
        cache = step_cache.AttachedCache(model, p, 25)
        try:
            cache.new_section()
            trace.clear()
            _, computed = run_steps(model, cache, 25, inputs)
        finally:
            cache.close()
        copies = [e for e in trace if e[0] == "copy"]
        assert len(copies) == sum(computed) * blocks  # every block, once per computed step, no more
    assert sum(computed) == sum(step_cache.planned_computed_steps(plan, 25)) < 25


def test_calibration_is_stored_per_transformer_and_preferred_by_later_jobs_but_not_by_resumes(
        tiny_model_dir, photo, tmp_path, capsys):
    import shutil

    from framepack_local.__main__ import main

    models = tmp_path / "models"  # a copy: the session's model folder must stay uncalibrated
    shutil.copytree(tiny_model_dir, models)
    engine = Engine(device="cpu")
    # A job stopped after its first section, with the shipped ratios.
    params = job(models, photo, tmp_path / "out", steps=10, seconds=0.8)
    cancel = CancelToken()
    stopped = engine.generate(params, on_event=lambda e: isinstance(e, SectionFinished) and cancel.cancel(),
                              cancel=cancel)
    shipped = store.read_record(stopped.job_dir)["step_cache"]
    assert shipped["ratios_source"].startswith("shipped")

    # The CLI measures the F1 transformer at 10 steps, uncached, and stores the ratios by fingerprint.
    assert main(["calibrate-cache", "--mode", "forward", "--steps", "10", "--resolution", "64", "--device", "cpu",
                 "--models", str(models), "--outputs", str(tmp_path / "out")]) == 0
    stored = Path(capsys.readouterr().out.strip().splitlines()[-1])
    fingerprint = model_identity(models)["parts"]["transformer_f1"]["weights_fingerprint"]
    assert stored == mag_ratios.store_path(models, fingerprint) and stored.is_file()
    calibrated = mag_ratios.load_calibrated(models, fingerprint)[10]
    assert len(calibrated) == 10 and calibrated[0] == 1.0 and calibrated != mag(steps=10).mag_ratios
    assert mag_ratios.load_calibrated(models, model_identity(models)["parts"]["transformer"]["weights_fingerprint"]) == {}
    records = [store.read_record(d) for d in (tmp_path / "out").iterdir()]  # ids of one second sort at random
    calibration = [r for r in records if r["step_cache"]["mode"] == step_cache.CALIBRATE]
    assert len(calibration) == 1 and calibration[0]["steps_computed"] == [10]  # nothing skipped while measuring

    # A new job uses the calibration; the stopped job resumes with the ratios it started with.
    fresh = store.read_record(engine.generate(params.replace(seconds=0.5)).job_dir)
    assert fresh["step_cache"]["ratios_source"] == "calibrated on this model folder (10 steps)"
    assert tuple(fresh["step_cache"]["mag_ratios"]) == calibrated
    plan = step_cache.plan_step_cache("mag", "forward", 10, calibrated={10: calibrated})
    assert fresh["steps_computed"] == [sum(step_cache.planned_computed_steps(plan, 10))] * fresh["sections"]
    resumed = store.read_record(engine.resume(stopped.job_dir).job_dir)
    assert resumed["step_cache"]["mag_ratios"] == shipped["mag_ratios"]
    # Another step count interpolates the nearest calibration.
    assert mag_ratios.choose("forward", 20, {10: calibrated}).source.endswith("(10 steps, interpolated to 20)")


@pytest.mark.parametrize("profile", ["fp8", "disk"])
def test_cache_schedule_and_determinism_hold_on_fp8_and_disk_storage(tiny_model_dir, photo, tmp_path, profile):
    engine = Engine(device="cpu")
    params = job(tiny_model_dir, photo, tmp_path / "a", memory_profile=profile, cache="mag")
    first = engine.generate(params)
    again = engine.generate(params.replace(outputs=str(tmp_path / "b")))
    record = store.read_record(first.job_dir)
    assert record["memory_plan"]["transformer_storage"] == profile
    assert record["steps_computed"] == [sum(step_cache.planned_computed_steps(mag(steps=10), 10))] * record["sections"]
    assert torch.equal(store.job_latents(first.job_dir, "forward"), store.job_latents(again.job_dir, "forward"))
