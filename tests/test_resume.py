"""No job is ever lost: SIGKILL mid-section, resume, and get bit-identical latents."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from framepack_local.jobs import store
from framepack_local.errors import InputError
from framepack_local.events import CancelToken, SectionFinished, StepProgress
from framepack_local.params import JobParams
from framepack_local.engine.generate import Engine
from framepack_local.jobs.video import probe_video

REPO = Path(__file__).resolve().parent.parent
ARGS = ["--prompt", "a lighthouse in a storm", "--seconds", "1.4", "--window", "2", "--steps", "12",
        "--resolution", "64", "--seed", "99"]


def cli(*args, **kw):
    return [sys.executable, "-m", "framepack_local", *args]


def only_job(outputs: Path) -> Path:
    dirs = [p for p in outputs.iterdir() if p.is_dir()]
    assert len(dirs) == 1
    return dirs[0]


@pytest.mark.parametrize("mode", ["inverted", "forward"])
def test_sigkill_mid_section_then_resume_is_bit_identical(tiny_model_dir, photo, tmp_path, mode):
    common = ["--image", str(photo), "--models", str(tiny_model_dir), "--mode", mode, *ARGS]
    killed_out, clean_out = tmp_path / "killed", tmp_path / "clean"

    # The uninterrupted reference runs in this process (the same engine the CLI runs; saves a process
    # start), in a thread while the two CLI processes below start up and run.
    reference = {}

    def clean_run():
        try:
            reference["job_dir"] = Engine().generate(JobParams(
                image=str(photo), models=str(tiny_model_dir), mode=mode, outputs=str(clean_out), prompt=ARGS[1],
                seconds=float(ARGS[3]), window=int(ARGS[5]), steps=int(ARGS[7]), resolution=int(ARGS[9]),
                seed=int(ARGS[11]))).job_dir
        except BaseException as e:  # noqa: BLE001 - re-raised in the test below
            reference["error"] = e

    clean_thread = threading.Thread(target=clean_run, name="clean-reference")
    clean_thread.start()
    try:
        killed_and_resumed(common, killed_out)
    finally:
        clean_thread.join()
    if "error" in reference:
        raise reference["error"]
    job_dir, clean_dir = only_job(killed_out), reference["job_dir"]

    a, b = store.job_latents(job_dir, mode), store.job_latents(clean_dir, mode)
    assert torch.equal(a, b)
    final = store.read_record(job_dir)
    assert final["status"] == "done" and final["resumed"] == 1
    assert probe_video(job_dir / store.FINAL_VIDEO).frames == probe_video(clean_dir / store.FINAL_VIDEO).frames \
        == final["frames"]


def killed_and_resumed(common, killed_out):
    """`generate` killed with SIGKILL while sampling section 3, found interrupted, then `resume`d."""
    proc = subprocess.Popen(cli("generate", *common, "--outputs", str(killed_out)), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    job_dir = None
    while time.monotonic() < deadline:
        if killed_out.is_dir() and [p for p in killed_out.iterdir() if p.is_dir()]:
            job_dir = only_job(killed_out)
            try:
                if store.read_record(job_dir).get("sections_done", 0) >= 2:
                    break  # sampling section 3 now
            except (OSError, ValueError):
                pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    record = store.read_record(job_dir)
    assert record["status"] == "running" and 2 <= record["sections_done"] < record["sections"]

    # A restarted app finds it and marks it resumable instead of "running" forever.
    assert store.recover_interrupted(killed_out) == [job_dir]
    assert store.read_record(job_dir)["status"] == "interrupted"
    # The video so far survived the kill and plays.
    assert probe_video(job_dir / store.PARTIAL_VIDEO).frames > 0

    resumed = subprocess.run(cli("resume", str(job_dir)), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert Path(resumed.stdout.strip().splitlines()[-1]) == job_dir / store.FINAL_VIDEO


def test_stop_and_resume_through_the_api(tiny_model_dir, photo, tmp_path):
    engine = Engine(device="cpu")
    params = JobParams(image=str(photo), prompt="snow falls", seconds=1.0, window=2, steps=2, resolution=64,
                       models=str(tiny_model_dir), outputs=str(tmp_path / "a"), seed=5)
    cancel = CancelToken()

    def stop_in_section_3(e):
        if isinstance(e, StepProgress) and e.section == 3:
            cancel.cancel()

    stopped = engine.generate(params, on_event=stop_in_section_3, cancel=cancel)
    assert stopped.status == "stopped"
    assert store.read_record(stopped.job_dir)["sections_done"] == 2

    sections_seen = []
    resumed = engine.resume(stopped.job_dir, on_event=lambda e: isinstance(e, SectionFinished)
                            and sections_seen.append(e.section))
    assert resumed.status == "done" and sections_seen == [3, 4]
    clean = engine.generate(params.replace(outputs=str(tmp_path / "b")))
    assert torch.equal(store.job_latents(resumed.job_dir, "inverted"), store.job_latents(clean.job_dir, "inverted"))
    # the stitched video equals the uninterrupted one frame for frame in count
    assert probe_video(resumed.video_path).frames == probe_video(clean.video_path).frames

    with pytest.raises(InputError, match="already finished"):
        engine.resume(resumed.job_dir)


def test_resume_refuses_a_folder_without_record(tmp_path):
    with pytest.raises(InputError, match="job.json"):
        Engine(device="cpu").resume(tmp_path)


def test_recover_leaves_live_and_finished_jobs_alone(tmp_path):
    outputs = tmp_path / "out"
    for status, pid in (("running", os.getpid()), ("done", 1), ("stopped", 1)):
        job_id, job_dir = store.create_job_dir(outputs)
        import socket
        store.write_record(job_dir, {"job_id": job_id, "status": status, "pid": pid, "host": socket.gethostname()})
    assert store.recover_interrupted(outputs) == []
    statuses = sorted(json.loads((p / "job.json").read_text())["status"] for p in outputs.iterdir())
    assert statuses == ["done", "running", "stopped"]


@pytest.mark.parametrize("mode", ["inverted", "forward"])
def test_resume_of_a_long_job_reads_only_the_sections_the_history_holds(tiny_model_dir, photo, tmp_path,
                                                                         monkeypatch, mode):
    from framepack_local.engine.history import sections_to_replay
    from framepack_local.events import CancelToken, SectionFinished

    engine = Engine(device="cpu")
    params = JobParams(image=str(photo), prompt="dunes", seconds=4.0, window=1, steps=1, resolution=64, seed=8,
                       models=str(tiny_model_dir), outputs=str(tmp_path / "a"), cache="off", mode=mode)  # 30 sections
    cancel = CancelToken()
    stopped = engine.generate(params, cancel=cancel,
                              on_event=lambda e: isinstance(e, SectionFinished) and e.section == 26 and cancel.cancel())
    assert store.read_record(stopped.job_dir)["sections_done"] == 26
    reads = []
    real = store.load_file
    monkeypatch.setattr(store, "load_file", lambda path: reads.append(Path(path).name) or real(path))
    resumed = engine.resume(stopped.job_dir)
    monkeypatch.undo()
    tail = sections_to_replay(1)
    assert tail < 26 and reads == [store.section_file(stopped.job_dir, n).name for n in range(26 - tail, 26)]
    clean = engine.generate(params.replace(outputs=str(tmp_path / "b")))
    assert torch.equal(store.job_latents(resumed.job_dir, mode), store.job_latents(clean.job_dir, mode))
    assert probe_video(resumed.video_path).frames == probe_video(clean.video_path).frames
