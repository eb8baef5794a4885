"""Faults in the middle of a job: one sentence, everything finished kept, the next job works.

Out-of-GPU-memory cannot happen on this CPU machine, so it is injected where it would be raised
(the transformer call, the VAE decode) as the real torch.cuda.OutOfMemoryError. A full disk is a
real 1 MB tmpfs where the machine allows mounting one, an injected ENOSPC otherwise.
"""

import errno
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from framepack_local.engine import generate
from framepack_local.jobs import store
from framepack_local.errors import GpuMemoryError, ModelFolderError, OutputFolderError
from framepack_local.events import SectionFinished
from framepack_local.params import JobParams
from framepack_local.engine.generate import Engine
from framepack_local.jobs.video import probe_video


def params(models, photo, outputs, **kw):
    base = dict(image=str(photo), prompt="rain on a window", seconds=0.6, window=1, steps=2, resolution=64,
                models=str(models), outputs=str(outputs), seed=11)
    base.update(kw)
    return JobParams(**base)


def one_sentence(text: str) -> bool:
    return "\n" not in text and text.endswith(".") and "Traceback" not in text


def assert_kept_and_resumable(engine, job_dir: Path, done: int):
    record = store.read_record(job_dir)
    assert record["status"] == "failed" and one_sentence(record["error"])
    assert record["sections_done"] == done
    assert len(list((job_dir / "sections").glob("section_*.safetensors"))) >= done
    assert probe_video(job_dir / store.PARTIAL_VIDEO).frames > 0
    resumed = engine.resume(job_dir)
    assert resumed.status == "done" and probe_video(resumed.video_path).frames == record["frames"]


@pytest.fixture
def engine():
    return Engine(device="cpu")


def test_gpu_oom_during_sampling(engine, tiny_model_dir, photo, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = generate.sample_flow

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # second section
            raise __import__("torch").cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)

    monkeypatch.setattr(generate, "sample_flow", failing)
    with pytest.raises(GpuMemoryError) as err:
        engine.generate(params(tiny_model_dir, photo, tmp_path))
    assert one_sentence(str(err.value)) and "GPU memory to keep free" in str(err.value)
    monkeypatch.setattr(generate, "sample_flow", real)
    job_dir = next(tmp_path.iterdir())
    assert_kept_and_resumable(engine, job_dir, done=1)
    assert engine.generate(params(tiny_model_dir, photo, tmp_path / "next")).status == "done"


def test_gpu_oom_during_decode(engine, tiny_model_dir, photo, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = generate.vae_decode

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise __import__("torch").cuda.OutOfMemoryError("CUDA out of memory")
        return real(*a, **k)

    monkeypatch.setattr(generate, "vae_decode", failing)
    with pytest.raises(GpuMemoryError):
        engine.generate(params(tiny_model_dir, photo, tmp_path))
    monkeypatch.setattr(generate, "vae_decode", real)
    job_dir = next(tmp_path.iterdir())
    # the third section was sampled and saved but never decoded: resume redoes it from its latents
    assert_kept_and_resumable(engine, job_dir, done=2)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                        capture_output=True).returncode == 0
    yield mount if ok else None
    if ok:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_while_writing(engine, tiny_model_dir, photo, tmp_path, small_disk, monkeypatch):
    outputs = (small_disk or tmp_path) / "outputs"
    filler = (small_disk or tmp_path) / "filler.bin"

    def fill_after_first_section(event):
        if isinstance(event, SectionFinished) and event.section == 1:
            if small_disk is not None:
                with open(filler, "wb") as f:  # take every free byte of the real small disk
                    try:
                        while True:
                            f.write(b"\0" * 65536)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC
            else:  # no mount allowed here: fail the next section write the way a full disk does
                def enospc(*a, **k):
                    raise OSError(errno.ENOSPC, "No space left on device")
                monkeypatch.setattr(store, "save_section", enospc)

    with pytest.raises(OutputFolderError) as err:
        engine.generate(params(tiny_model_dir, photo, outputs), on_event=fill_after_first_section)
    assert one_sentence(str(err.value)) and "full" in str(err.value)
    monkeypatch.undo()
    filler.unlink(missing_ok=True)
    job_dir = next(outputs.iterdir())
    record = store.read_record(job_dir)
    assert record["sections_done"] >= 1 and probe_video(job_dir / store.PARTIAL_VIDEO).frames > 0
    if record["status"] == "failed":  # the record itself could be written (it usually can: space was freed)
        assert "full" in record["error"]
    resumed = engine.resume(job_dir)
    assert resumed.status == "done"


def test_model_file_corrupt_or_deleted_between_jobs(tiny_model_dir, photo, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models)
    engine = Engine(device="cpu")
    assert engine.generate(params(models, photo, tmp_path / "out")).status == "done"

    vae_file = models / "vae" / "diffusion_pytorch_model.safetensors"
    backup = vae_file.read_bytes()
    vae_file.unlink()
    with pytest.raises(ModelFolderError) as err:
        engine.generate(params(models, photo, tmp_path / "out"))
    assert one_sentence(str(err.value)) and "vae" in str(err.value) and "download" in str(err.value)

    vae_file.write_bytes(backup[: len(backup) // 3])  # truncated: present but damaged
    with pytest.raises(ModelFolderError) as err:
        Engine(device="cpu").generate(params(models, photo, tmp_path / "out", prompt=f"p {uuid.uuid4()}"))
    assert one_sentence(str(err.value)) and "damaged" in str(err.value)

    vae_file.write_bytes(backup)
    assert Engine(device="cpu").generate(params(models, photo, tmp_path / "out")).status == "done"


def test_outputs_folder_removed_while_running(engine, tiny_model_dir, photo, tmp_path):
    outputs = tmp_path / "outputs"

    def remove_outputs(event):
        if isinstance(event, SectionFinished) and event.section == 1:
            shutil.rmtree(outputs)

    with pytest.raises(OutputFolderError) as err:
        engine.generate(params(tiny_model_dir, photo, outputs), on_event=remove_outputs)
    assert one_sentence(str(err.value)) and "removed" in str(err.value)
    # the app goes on: the next job recreates the folder
    assert engine.generate(params(tiny_model_dir, photo, outputs)).status == "done"


def test_pickle_weights_are_never_loaded(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from framepack_local.weights.model_folder import check_model_folder, load_part

    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models)
    st = models / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(st)), models / "vae" / "diffusion_pytorch_model.bin")  # a pickle beside it
    st.unlink()
    with pytest.raises(ModelFolderError, match="vae"):
        check_model_folder(models, "inverted")
    with pytest.raises(ModelFolderError):
        load_part(models, "vae")


def test_failure_while_publishing_is_resumable(engine, tiny_model_dir, photo, tmp_path, monkeypatch):
    # The pending piece is re-encoded before publish; if publish then fails, the record still
    # describes the previous pending piece. Resume must rebuild the edge, not refuse.
    from framepack_local.jobs import video

    calls = {"n": 0}
    real = video.SegmentedVideo.publish

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OutputFolderError("Could not write the video x.mp4: the disk is full; free some space and "
                                    "resume the job.")
        return real(self, *a, **k)

    monkeypatch.setattr(video.SegmentedVideo, "publish", failing)
    with pytest.raises(OutputFolderError):
        engine.generate(params(tiny_model_dir, photo, tmp_path))
    monkeypatch.undo()
    job_dir = next(tmp_path.iterdir())
    assert store.read_record(job_dir)["sections_done"] == 1
    resumed = engine.resume(job_dir, overrides={"keep_free_gb": 1.0})
    assert resumed.status == "done"
    assert probe_video(resumed.video_path).frames == store.read_record(job_dir)["frames"]


def test_resume_refuses_changes_to_what_is_computed(engine, tiny_model_dir, photo, tmp_path):
    from framepack_local.errors import InputError
    from framepack_local.events import CancelToken

    cancel = CancelToken()
    cancel.cancel()
    stopped = engine.generate(params(tiny_model_dir, photo, tmp_path), cancel=cancel)
    with pytest.raises(InputError, match="Only the memory settings"):
        engine.resume(stopped.job_dir, overrides={"seed": 1})
