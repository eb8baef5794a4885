"""Attention backend: the choice (pure), unavailable backends and a backend that raises fall back to SDPA."""

from __future__ import annotations

import pytest
import torch

from framepack_local.engine import attention
from framepack_local.engine.generate import Engine
from framepack_local.errors import InputError
from framepack_local.events import Notice
from framepack_local.jobs import store
from framepack_local.params import JobParams

NONE_HERE = {"sage": "the sageattention package is not installed", "flash": "it needs an NVIDIA GPU"}


def test_choice_prefers_sage_then_flash_and_explains_what_is_missing():
    assert attention.choose("auto", {"sage": None, "flash": None}).backend == "sage"
    assert attention.choose("auto", {"sage": "x", "flash": None}).backend == "flash"
    quiet = attention.choose("auto", NONE_HERE)
    assert (quiet.backend, quiet.note) == ("sdpa", None)  # nothing faster here: no Notice for the default
    flash = attention.choose("flash", NONE_HERE)
    assert flash.backend == "sdpa" and "flash attention is not available (it needs an NVIDIA GPU)" in flash.note
    assert attention.choose("sage", {"sage": None, "flash": "x"}).backend == "sage"
    assert attention.choose("sdpa", {"sage": None, "flash": None}).backend == "sdpa"
    cpu = attention.unavailable_reasons(torch.device("cpu"))
    assert set(cpu) == {"sage", "flash"} and all(cpu.values())  # neither can run on a CPU
    with pytest.raises(InputError, match="attention backend must be one of"):
        JobParams(image="x", attention="xformers").validate()


def job(models, photo, outputs, **kw):
    base = dict(image=str(photo), prompt="waves", seconds=0.3, window=2, steps=3, resolution=64, seed=2,
                mode="forward", models=str(models), outputs=str(outputs), cache="off")
    return JobParams(**{**base, **kw})


def test_unavailable_and_failing_backends_fall_back_to_sdpa_with_a_notice(tiny_model_dir, photo, tmp_path,
                                                                          monkeypatch):
    from diffusers.models import attention_dispatch as dispatch

    engine = Engine(device="cpu")
    sdpa = engine.generate(job(tiny_model_dir, photo, tmp_path / "sdpa", attention="sdpa"))
    notices = []
    on_event = lambda e: isinstance(e, Notice) and notices.append(e.message)  # noqa: E731

    missing = engine.generate(job(tiny_model_dir, photo, tmp_path / "missing", attention="flash"), on_event=on_event)
    assert any("flash attention is not available" in n for n in notices)
    assert store.read_record(missing.job_dir)["attention"]["used"] == "sdpa"

    # "flash" looks usable, is set on the model through diffusers, and raises at its first call.
    calls = []

    def broken_kernel(**_kwargs):
        calls.append(1)
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(attention, "unavailable_reasons", lambda device: {"flash": None, "sage": "x"})
    monkeypatch.setattr(dispatch, "_check_attention_backend_requirements", lambda backend: None)
    monkeypatch.setitem(dispatch._AttentionBackendRegistry._backends, dispatch.AttentionBackendName.FLASH,
                        broken_kernel)
    notices.clear()
    failed = engine.generate(job(tiny_model_dir, photo, tmp_path / "failed", attention="auto"), on_event=on_event)
    record = store.read_record(failed.job_dir)
    assert calls == [1] and record["status"] == "done"  # tried once, never again
    assert record["attention"] == {"requested": "auto", "used": "sdpa", "fallback": notices[0]}
    assert "flash attention failed on this GPU (RuntimeError)" in notices[0]
    for result in (missing, failed):  # SDPA after the fallback computes exactly what SDPA computes
        assert torch.equal(store.job_latents(result.job_dir, "forward"), store.job_latents(sdpa.job_dir, "forward"))
    # The transformer outlives the job: it is left on the default kernel.
    assert dispatch._AttentionBackendRegistry.get_active_backend()[0] == dispatch.AttentionBackendName.NATIVE


def test_a_resume_keeps_the_kernel_the_job_started_with(tiny_model_dir, photo, tmp_path, monkeypatch):
    from diffusers.models import attention_dispatch as dispatch

    from framepack_local.events import CancelToken, SectionFinished

    engine = Engine(device="cpu")
    cancel = CancelToken()
    stopped = engine.generate(job(tiny_model_dir, photo, tmp_path / "a", seconds=0.6),  # 2 sections; auto -> SDPA
                              on_event=lambda e: isinstance(e, SectionFinished) and cancel.cancel(), cancel=cancel)
    assert store.read_record(stopped.job_dir)["attention"]["used"] == "sdpa"
    calls = []  # now "flash" would be chosen by auto: the resume must not switch to it
    monkeypatch.setattr(attention, "unavailable_reasons", lambda device: {"flash": None, "sage": "x"})
    monkeypatch.setattr(dispatch, "_check_attention_backend_requirements", lambda backend: None)
    monkeypatch.setitem(dispatch._AttentionBackendRegistry._backends, dispatch.AttentionBackendName.FLASH,
                        lambda **kw: calls.append(1))
    resumed = engine.resume(stopped.job_dir)
    assert resumed.status == "done" and calls == []
    assert store.read_record(resumed.job_dir)["attention"]["used"] == "sdpa"
