"""Background worker: queue order, stop, remove, failures as one sentence, ETA, resume, job listing."""

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from framepack_local.errors import InputError, ModelFolderError
from framepack_local.events import JobFinished, JobStarted, SectionFinished, StageChanged, StepProgress
from framepack_local.params import JobParams
from framepack_local.engine.generate import Engine
from framepack_local.jobs.listing import list_jobs
from framepack_local.worker import Worker, failure_sentence

TIMEOUT = 120


class RecordingEngine:
    """The real tiny-model engine, noting the order in which jobs start."""

    def __init__(self, engine):
        self.engine = engine
        self.started: list[str] = []

    def generate(self, params, on_event=None, cancel=None):
        self.started.append(params.prompt)
        return self.engine.generate(params, on_event=on_event, cancel=cancel)


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu")


@pytest.fixture
def recorder(engine):
    return RecordingEngine(engine)


@pytest.fixture
def worker(recorder):
    w = Worker(recorder)
    yield w
    w.shutdown()


def tiny(tiny_model_dir, photo, outputs, **kw):
    base = dict(image=str(photo), prompt="a boat", seconds=0.2, window=1, steps=1, resolution=64,
                models=str(tiny_model_dir), outputs=str(outputs), seed=1)
    base.update(kw)
    return JobParams(**base)


def slow(tiny_model_dir, photo, outputs, **kw):
    # 30 sections x 4 steps: long enough to act on while it runs, stopped early by every test.
    return tiny(tiny_model_dir, photo, outputs, seconds=4.0, window=1, steps=4, **kw)


def wait_for(predicate, timeout=TIMEOUT, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_jobs_complete_in_order(worker, recorder, tiny_model_dir, photo, tmp_path):
    k1 = worker.submit(tiny(tiny_model_dir, photo, tmp_path, prompt="first"))
    k2 = worker.submit(tiny(tiny_model_dir, photo, tmp_path, prompt="second", window=2, seconds=0.3))
    assert k1 != k2
    o2 = worker.wait(k2, TIMEOUT)
    o1 = worker.outcome(k1)
    assert o1 is not None and o2 is not None
    assert (o1.status, o2.status) == ("done", "done")
    assert recorder.started == ["first", "second"]
    for o in (o1, o2):
        assert o.error is None and o.video_path.name == "video.mp4" and o.video_path.is_file()
        assert json.loads((o.job_dir / "job.json").read_text())["status"] == "done"
    state = worker.snapshot()
    # idle: the snapshot describes the last job, with its final video, and the queue is empty
    assert state.status == "done" and not state.running and state.key == k2
    assert state.final_video == o2.video_path and state.queue == ()
    assert state.sections_done == state.sections >= 1 and state.fraction == 1.0
    assert state.preview_rgb is not None and state.preview_rgb.dtype == np.uint8

    jobs = list_jobs(tmp_path)
    assert [j.job_id for j in jobs] == [o2.job_id, o1.job_id]  # newest first
    assert jobs[0].prompt == "second" and jobs[0].status == "done" and jobs[0].seconds == 0.3
    assert jobs[0].video == o2.video_path and jobs[0].thumbnail.name == "input.png"
    assert not jobs[0].resumable


def test_stop_running_job_keeps_partial_video(worker, tiny_model_dir, photo, tmp_path):
    key = worker.submit(slow(tiny_model_dir, photo, tmp_path))
    state = wait_for(lambda: (s := worker.snapshot()).key == key and s.sections_done >= 1 and s.step >= 1 and s,
                     what="a finished section")
    assert state.running and state.status == "running"
    assert state.partial_video is not None and state.partial_video.is_file()
    assert state.sections == 30 and state.steps == 4 and state.job_dir is not None
    assert state.elapsed_s > 0 and state.eta_s is not None and state.eta_s > 0
    assert state.preview_rgb.ndim == 3 and state.preview_rgb.shape[2] == 3

    assert worker.stop(key)
    outcome = worker.wait(key, TIMEOUT)
    assert outcome.status == "stopped" and outcome.error is None
    assert outcome.video_path.name == "partial.mp4" and outcome.video_path.is_file()
    record = json.loads((outcome.job_dir / "job.json").read_text())
    assert record["status"] == "stopped" and 1 <= record["sections_done"] < 30
    state = worker.snapshot()
    assert state.status == "stopped" and state.partial_video.is_file() and state.final_video is None
    assert state.eta_s is None
    summary = list_jobs(tmp_path)[0]
    assert summary.status == "stopped" and summary.resumable and summary.video.name == "partial.mp4"


def test_remove_queued_job(worker, recorder, tiny_model_dir, photo, tmp_path):
    k1 = worker.submit(slow(tiny_model_dir, photo, tmp_path, prompt="long"))
    k2 = worker.submit(tiny(tiny_model_dir, photo, tmp_path, prompt="removed"))
    k3 = worker.submit(tiny(tiny_model_dir, photo, tmp_path, prompt="kept"))
    queue = worker.snapshot().queue
    assert [q.key for q in queue][-2:] == [k2, k3]
    assert "removed" in queue[-2].description
    assert worker.remove(k2)
    assert not worker.remove(k2)  # only once
    assert [q.key for q in worker.snapshot().queue if q.key != k1] == [k3]
    wait_for(lambda: worker.snapshot().key == k1, what="the long job to start")
    assert not worker.remove(k1)  # running jobs are stopped, not removed
    assert worker.stop(k1)
    assert worker.wait(k3, TIMEOUT).status == "done"
    assert worker.outcome(k2).status == "removed"
    assert recorder.started == ["long", "kept"]


def test_stop_queued_job_removes_it(worker, tiny_model_dir, photo, tmp_path):
    k1 = worker.submit(slow(tiny_model_dir, photo, tmp_path))
    k2 = worker.submit(tiny(tiny_model_dir, photo, tmp_path))
    assert worker.stop(k2)
    assert worker.outcome(k2).status == "removed"
    assert worker.stop(k1)
    assert worker.wait(k1, TIMEOUT).status in ("stopped", "removed")  # removed if it had not started yet


def test_bad_jobs_give_one_sentence_and_the_next_job_runs(worker, recorder, tiny_model_dir, photo, tmp_path,
                                                          monkeypatch):
    doomed = tmp_path / "doomed.png"
    shutil.copy(photo, doomed)
    deleted = threading.Event()
    generate = recorder.generate

    def after_the_deletion(params, **kw):  # the idle worker would otherwise start it at once
        if params.prompt == "gone":
            assert deleted.wait(TIMEOUT)
        return generate(params, **kw)

    monkeypatch.setattr(recorder, "generate", after_the_deletion)
    k1 = worker.submit(tiny(tiny_model_dir, doomed, tmp_path / "out", prompt="gone"))
    doomed.unlink()  # deleted after submit, before it runs
    deleted.set()
    k2 = worker.submit(tiny(tmp_path / "no-models", photo, tmp_path / "out", prompt="no models"))
    k3 = worker.submit(tiny(tiny_model_dir, photo, tmp_path / "out", prompt="fine"))
    o3 = worker.wait(k3, TIMEOUT)
    o1, o2 = worker.outcome(k1), worker.outcome(k2)
    assert o1.status == "failed" and "doomed.png" in o1.error and "\n" not in o1.error
    assert o2.status == "failed" and "no-models" in o2.error and "Traceback" not in o2.error
    with pytest.raises(ModelFolderError) as info:
        from framepack_local.weights.model_folder import check_model_folder
        check_model_folder(tmp_path / "no-models", "inverted")
    assert o2.error == str(info.value)
    assert o3.status == "done" and o3.video_path.is_file()


def test_invalid_params_are_refused_at_submit(tmp_path):
    w = Worker(engine=object())
    with pytest.raises(InputError, match="steps"):
        w.submit(JobParams(image="x.png", steps=0, outputs=str(tmp_path)))
    with pytest.raises(InputError):
        w.submit("not params")
    assert w.snapshot().queue == () and w.snapshot().status == "idle"
    w.shutdown()


class FakeEngine:
    """Emits engine-like events; fails on demand."""

    def __init__(self, tmp_path, fail=None, step_s=0.0, steps=3, sections=2, gate=None):
        self.tmp_path, self.fail, self.step_s, self.steps, self.sections, self.gate = (
            tmp_path, fail, step_s, steps, sections, gate)
        self.calls = []

    def generate(self, params, on_event=None, cancel=None):
        self.calls.append(params.prompt)
        job_dir = self.tmp_path / f"job-{len(self.calls)}"
        job_dir.mkdir(parents=True)
        (job_dir / "job.json").write_text(json.dumps({"job_id": job_dir.name, "status": "running",
                                                      "params": params.to_dict()}))
        on_event(JobStarted(job_dir.name, job_dir, self.sections, self.steps, 33, 64, 64))
        on_event(StageChanged("sampling", "Sampling section 1"))
        if params.prompt == "fail":
            raise self.fail
        for section in range(1, self.sections + 1):
            for step in range(1, self.steps + 1):
                time.sleep(self.step_s)
                on_event(StepProgress(section, self.sections, step, self.steps, 0.0, np.zeros((4, 4, 3), np.uint8)))
                if self.gate is not None and (section, step) == (1, 2):
                    self.gate.wait(10)
            on_event(SectionFinished(section, self.sections, job_dir / "partial.mp4", 9, 0.0))
        (job_dir / "job.json").write_text(json.dumps({"job_id": job_dir.name, "status": "done",
                                                      "params": params.to_dict()}))
        on_event(JobFinished("done", job_dir, job_dir / "video.mp4", 0.0))
        from framepack_local.engine.generate import JobResult
        return JobResult("done", job_dir.name, job_dir, job_dir / "video.mp4")


@pytest.mark.parametrize("exc, expected", [
    (RuntimeError("boom\nsecond line"), "The job failed unexpectedly (RuntimeError: boom second line); "
                                        "the finished sections are kept."),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "GPU memory to keep free"),
    (MemoryError(), "system memory"),
])
def test_unexpected_errors_become_one_sentence(tmp_path, photo, exc, expected, caplog):
    engine = FakeEngine(tmp_path, fail=exc)
    w = Worker(engine)
    k1 = w.submit(JobParams(image=str(photo), prompt="fail", outputs=str(tmp_path)))
    k2 = w.submit(JobParams(image=str(photo), prompt="next", outputs=str(tmp_path)))
    assert w.wait(k2, 30).status == "done"
    o1 = w.outcome(k1)
    assert o1.status == "failed" and expected in o1.error and "\n" not in o1.error
    # the record left behind says "failed" (with the sentence), so the history offers Resume
    record = json.loads((o1.job_dir / "job.json").read_text())
    assert record["status"] == "failed" and record["error"] == o1.error
    assert [j.status for j in list_jobs(tmp_path)] == ["done", "failed"]
    assert any("failed unexpectedly" in r.message for r in caplog.records)
    w.shutdown()


def test_failure_sentence_for_plain_exception():
    assert failure_sentence(ValueError("")) == "The job failed unexpectedly (ValueError); the finished sections are kept."


def test_eta_from_step_durations(tmp_path, photo):
    gate = threading.Event()
    engine = FakeEngine(tmp_path, step_s=0.05, steps=4, sections=3, gate=gate)
    w = Worker(engine)
    key = w.submit(JobParams(image=str(photo), prompt="eta", outputs=str(tmp_path)))
    state = wait_for(lambda: (s := w.snapshot()).step == 2 and s, timeout=10, what="step 2")
    # two steps of ~0.05 s done; 10 of 12 remain -> about 0.5 s (minus the time since the last step)
    assert state.section == 1 and state.sections == 3 and state.steps == 4
    assert 0.2 < state.eta_s < 1.5, state.eta_s
    assert abs(state.fraction - 2 / 12) < 1e-9
    gate.set()
    assert w.wait(key, 10).status == "done"
    w.shutdown()


def test_resume(tmp_path, photo):
    class ResumingEngine(FakeEngine):
        def resume(self, job_dir, on_event=None, cancel=None, overrides=None):
            self.calls.append(("resume", Path(job_dir), overrides))
            on_event(JobFinished("done", Path(job_dir), Path(job_dir) / "video.mp4", 0.0))
            from framepack_local.engine.generate import JobResult
            return JobResult("done", Path(job_dir).name, Path(job_dir), Path(job_dir) / "video.mp4")

    stopped = tmp_path / "20250101-000000-abcdef"
    stopped.mkdir()
    (stopped / "job.json").write_text(json.dumps({"job_id": stopped.name, "status": "stopped",
                                                  "params": {"prompt": "waves"}}))
    done = tmp_path / "20250101-000001-abcdef"
    done.mkdir()
    (done / "job.json").write_text(json.dumps({"job_id": done.name, "status": "done"}))

    engine = ResumingEngine(tmp_path)
    w = Worker(engine)
    key = w.resume(stopped)
    assert w.wait(key, 10).status == "done"
    key = w.resume(stopped, {"keep_free_gb": 2.0})  # the memory fix after an out-of-memory error
    assert w.wait(key, 10).status == "done"
    assert engine.calls == [("resume", stopped, None), ("resume", stopped, {"keep_free_gb": 2.0})]
    with pytest.raises(InputError, match="already finished"):
        w.resume(done)
    with pytest.raises(InputError, match="not a readable job folder"):
        w.resume(tmp_path / "nope")
    w.shutdown()


def test_list_jobs_tolerates_broken_folders(tmp_path):
    def job(name, created, **record):
        d = tmp_path / name
        d.mkdir()
        (d / "job.json").write_text(json.dumps({"job_id": name, "created": created, **record}))
        return d

    old = job("20250101-000000-aaaaaa", "2025-01-01T00:00:00+0000", status="done", params={"prompt": "old", "seconds": 5})
    (old / "video.mp4").write_bytes(b"x")
    (old / "input.png").write_bytes(b"x")
    crashed = job("20250102-000000-bbbbbb", "2025-01-02T00:00:00+0000", status="running", params={"seconds": "bad"})
    (crashed / "partial.mp4").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "job.json").write_text("{not json")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "job.json").write_text("[1, 2]")
    (tmp_path / ".cache").mkdir()
    (tmp_path / "stray.txt").write_text("x")

    jobs = list_jobs(tmp_path)
    assert [j.job_dir for j in jobs] == [crashed, old]
    assert jobs[0].status == "interrupted" and jobs[0].resumable and jobs[0].seconds is None
    assert jobs[0].video.name == "partial.mp4" and jobs[0].thumbnail is None and jobs[0].prompt == ""
    assert jobs[1].video.name == "video.mp4" and jobs[1].thumbnail.name == "input.png" and jobs[1].seconds == 5
    assert list_jobs(tmp_path, busy={crashed})[0].status == "running"
    assert list_jobs(tmp_path / "missing") == []
    assert len(list_jobs(tmp_path, limit=1)) == 1


class StopAfterFirstSection:
    """The real engine, with the job's cancel token pulled as soon as section 1 is published."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, params, on_event=None, cancel=None):
        def relay(event):
            on_event(event)
            if isinstance(event, SectionFinished) and event.section == 1:
                cancel.cancel()

        return self.engine.generate(params, on_event=relay, cancel=cancel)

    def resume(self, job_dir, on_event=None, cancel=None):
        return self.engine.resume(job_dir, on_event=on_event, cancel=cancel)


def test_resume_a_stopped_job_with_the_real_engine(engine, tiny_model_dir, photo, tmp_path):
    if not callable(getattr(engine, "resume", None)):
        pytest.skip("this engine has no resume() yet")
    w = Worker(StopAfterFirstSection(engine))
    key = w.submit(tiny(tiny_model_dir, photo, tmp_path, seconds=0.4, steps=1))  # 3 sections
    stopped = w.wait(key, TIMEOUT)
    assert stopped.status == "stopped" and stopped.video_path.name == "partial.mp4"
    [summary] = list_jobs(tmp_path)
    assert summary.resumable and summary.sections_done == 1 and summary.sections == 3
    key2 = w.resume(stopped.job_dir)
    assert w.snapshot().queue == () or w.snapshot().queue[0].kind == "resume"
    resumed = w.wait(key2, TIMEOUT)
    assert resumed.status == "done", resumed
    assert resumed.job_dir == stopped.job_dir and resumed.video_path.name == "video.mp4"
    state = w.snapshot()
    assert state.status == "done" and state.sections_done == 3 and state.final_video == resumed.video_path
    assert list_jobs(tmp_path)[0].status == "done"
    w.shutdown()
