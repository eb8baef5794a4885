"""LoRA: every layout users have, the same numbers as weights merged by hand, on every storage and with
streaming; switching between jobs without reloading; resume bit-identical; bad files in one sentence.

Tolerances: the adapters compute x A^T B^T beside the layer instead of (W + B A) x, a different order
of float32 roundings, so outputs agree with the hand-merged model to 1e-5 of the output's scale (the
LoRA's own effect is ~0.3 of it, 4 orders larger). fp8 storage uses the storage tests' bound: relative
L2 error under 5 % (tests/test_streaming.py), while the LoRA's effect is far above it.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from framepack_local.__main__ import build_parser, main
from framepack_local.engine.generate import Engine
from framepack_local.errors import InputError
from framepack_local.events import CancelToken, StepProgress
from framepack_local.jobs import store
from framepack_local.memory import plan as mp
from framepack_local.params import JobParams
from framepack_local.weights import lora, lora_runtime, model_folder, storage, streaming
from framepack_local.weights.model_folder import FRAMEPACK_TRANSFORMER_CONFIG
from lora_files import FORMATS, merged_model, random_lora, write_lora
from transformer_inputs import tiny_inputs

F32 = torch.float32


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return json.loads((tiny_model_dir / "transformer" / "config.json").read_text())


@pytest.fixture(scope="module")
def inputs():
    return tiny_inputs()


@pytest.fixture(scope="module")
def factors(tiny_model_dir):
    return random_lora(tiny_model_dir, rank=4, seed=0), random_lora(tiny_model_dir, rank=8, seed=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory, factors, config):
    """LoRA one in all layouts, LoRA two as a kohya file."""
    folder = tmp_path_factory.mktemp("loras")
    one = {fmt: write_lora(folder / f"one-{fmt}.safetensors", factors[0], fmt, config) for fmt in FORMATS}
    return one, write_lora(folder / "two.safetensors", factors[1], "kohya", config)


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return model_folder.load_part(tiny_model_dir, "transformer", "cpu", F32)


@pytest.fixture(scope="module")
def plain_out(plain, inputs):
    return forward(plain, inputs)


@pytest.fixture(scope="module")
def merged_out(tiny_model_dir, factors, inputs):
    model = model_folder.load_part(tiny_model_dir, "transformer", "cpu", F32)
    return forward(merged_model(model, [(factors[0], 0.7)]), inputs)


def with_loras(model, inputs, loaded):
    with lora_runtime.LoraAdapters(model, loaded, F32):
        return forward(model, inputs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_layout_gives_the_hand_merged_output(plain, inputs, plain_out, merged_out, files, config, fmt):
    loaded = lora.load_lora(files[0][fmt], 0.7, config)
    assert loaded.format == fmt.split("-")[0] and loaded.unmatched == 0
    assert len(loaded.factors) == 20  # every Linear of the tiny blocks
    out = with_loras(plain, inputs, [loaded])
    assert (out - merged_out).abs().max() < 1e-5 * merged_out.abs().max()
    assert (merged_out - plain_out).abs().max() > 0.1 * merged_out.abs().max()  # the LoRA does something
    assert torch.equal(forward(plain, inputs), plain_out)  # closing the adapters leaves the plain model


def test_peft_agrees(tiny_model_dir, inputs, factors, merged_out):
    """PEFT's own LoRA layers (diffusers load_lora_adapter + set_adapters) give the same output."""
    model = model_folder.load_part(tiny_model_dir, "transformer", "cpu", F32)
    state = {}
    for name, (a, b) in factors[0].items():
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a.clone(), b.clone()
    model.load_lora_adapter(state, adapter_name="one", prefix=None)
    model.set_adapters(["one"], [0.7])
    assert (forward(model, inputs) - merged_out).abs().max() < 1e-5 * merged_out.abs().max()


def test_weight_zero_is_the_plain_model_and_two_loras_add_up(tiny_model_dir, plain, inputs, plain_out, files,
                                                              factors, config):
    zero = lora.load_lora(files[0]["diffusers"], 0.0, config)
    assert torch.equal(with_loras(plain, inputs, [zero]), plain_out)
    both = [lora.load_lora(files[0]["original"], 0.7, config), lora.load_lora(files[1], -1.5, config)]
    reference = model_folder.load_part(tiny_model_dir, "transformer", "cpu", F32)
    merged = forward(merged_model(reference, [(factors[0], 0.7), (factors[1], -1.5)]), inputs)
    assert (with_loras(plain, inputs, both) - merged).abs().max() < 1e-5 * merged.abs().max()
    # per layer the deltas add: one layer's output with both = its output with each, minus the plain one
    layer = plain.get_submodule("single_transformer_blocks.0.proj_mlp")
    x = torch.randn(3, layer.in_features)
    outs = []
    for loaded in ([both[0]], [both[1]], both, []):
        with lora_runtime.LoraAdapters(plain, loaded, F32), torch.no_grad():
            outs.append(layer(x))
    assert torch.allclose(outs[2] - outs[3], (outs[0] - outs[3]) + (outs[1] - outs[3]), atol=1e-5)


@pytest.mark.parametrize("store_as,resident", [("bf16", 0), ("bf16", 1), ("bf16", 2), ("fp8", 0), ("fp8", 1),
                                               ("fp8", 2), ("disk", 0), ("disk", 2)])
def test_storages_and_streaming_with_a_lora(tiny_model_dir, inputs, files, config, merged_out, tmp_path,
                                            store_as, resident):
    """Adapters attached after storage and streaming are set up (as between two jobs on one Engine)."""
    model = storage.load_transformer(tiny_model_dir / "transformer", store_as, F32, cache_dir=tmp_path)
    streaming.apply_streaming(model, "cpu", resident_blocks=resident)
    without = forward(model, inputs)
    out = with_loras(model, inputs, [lora.load_lora(files[0]["kohya"], 0.7, config)])
    if store_as == "bf16":
        assert (out - merged_out).abs().max() < 1e-5 * merged_out.abs().max()
    else:
        assert 0 < rel(out, merged_out) < 0.05
        assert rel(out, without) > 0.1  # the LoRA's effect is far beyond fp8's rounding
    assert torch.equal(forward(model, inputs), without)


# ---- bad files (one sentence each)


def _write(path, tensors):
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("case,fragment", [
    ("pickle", "is not a safetensors file"),
    ("garbage", "is not a safetensors file"),
    ("wan", "0 of its 4 keys matched"),
    ("wrong size", "does not fit this transformer"),
    ("dora", "not a plain LoRA"),
])
def test_bad_lora_files(tmp_path, config, files, case, fragment):
    if case == "pickle":
        path = tmp_path / "old.pt"
        torch.save({"a": torch.zeros(1)}, path)
    elif case == "garbage":
        path = tmp_path / "broken.safetensors"
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    elif case == "wan":  # Wan 2.1's layer names
        path = _write(tmp_path / "wan.safetensors", {
            "diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 8),
            "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(8, 4),
            "diffusion_model.blocks.0.ffn.0.lora_A.weight": torch.zeros(4, 8),
            "diffusion_model.blocks.0.ffn.0.lora_B.weight": torch.zeros(8, 4)})
    elif case == "wrong size":  # a LoRA for a wider HunyuanVideo
        path = _write(tmp_path / "wide.safetensors", {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)})
    else:
        path = _write(tmp_path / "dora.safetensors", {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4),
            "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector.dora_scale": torch.zeros(32)})
    with pytest.raises(InputError, match=fragment) as err:
        lora.load_lora(path, 1.0, config)
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")


def test_partly_matching_lora_is_used_with_a_notice(tmp_path, config, factors):
    tensors = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": factors[0]["transformer_blocks.0.attn.to_q"][0],
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": factors[0]["transformer_blocks.0.attn.to_q"][1],
               "transformer.not_a_layer.lora_A.weight": torch.zeros(4, 8),
               "transformer.not_a_layer.lora_B.weight": torch.zeros(8, 4)}
    loaded = lora.load_lora(_write(tmp_path / "part.safetensors", tensors), 1.0, config)
    assert len(loaded.factors) == 1 and loaded.unmatched == 2
    assert "2 of the 4 keys" in loaded.notes[0]


def test_lora_flag_and_weights():
    args = build_parser().parse_args(["generate", "--image", "x.png", "--lora", "a.safetensors:0.75",
                                      "--lora", r"C:\loras\b.safetensors", "--lora", "c:d.safetensors:-2"])
    from framepack_local.__main__ import _params

    assert _params(args).loras == (("a.safetensors", 0.75), (r"C:\loras\b.safetensors", 1.0),
                                   ("c:d.safetensors", -2.0))
    with pytest.raises(InputError, match="between -2 and 2; 2.5 is out of range"):
        JobParams(image="x", loras=(("a.safetensors", 2.5),)).validate()
    assert hash(JobParams(image="x", loras=[["a.safetensors", 1.0]])) == hash(
        JobParams(image="x", loras=(("a.safetensors", 1.0),)))  # lists from job.json become tuples


# ---- jobs on one Engine


def _job_params(tiny_model_dir, photo, outputs, seconds=0.27, **kw):
    # 0.27 s at window 2 is one section, 0.54 s two
    return JobParams(image=str(photo), prompt="a lantern swings", seconds=seconds, window=2, steps=2, resolution=64,
                     seed=7, cache="off", models=str(tiny_model_dir), outputs=str(outputs), **kw)


@pytest.fixture(scope="module")
def models_with_loras(tiny_model_dir, tmp_path_factory, files):
    """A model folder whose models/loras/ holds the test LoRAs (the tiny model's parts linked)."""
    root = tmp_path_factory.mktemp("models-loras")
    for part in tiny_model_dir.iterdir():
        if part.name == "loras":  # another test (the browser's picker) may have put LoRAs into the shared folder
            continue
        (root / part.name).symlink_to(part, target_is_directory=part.is_dir())
    (root / "loras").mkdir()
    shutil.copy(files[0]["kohya"], root / "loras" / "one.safetensors")
    shutil.copy(files[1], root / "loras" / "two.safetensors")
    return root


def test_switching_loras_between_jobs_does_not_reload(models_with_loras, photo, tmp_path, monkeypatch):
    loads = []
    real_load = storage.load_transformer
    monkeypatch.setattr(storage, "load_transformer", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    engine = Engine(device="cpu")

    def latents(name, **kw):
        job = engine.generate(_job_params(models_with_loras, photo, tmp_path / name, **kw))
        return store.job_latents(job.job_dir, "inverted"), store.read_record(job.job_dir)

    plain, _ = latents("plain")
    manager = engine._manager
    zero, _ = latents("zero", loras=(("one.safetensors", 0.0),))
    both, record = latents("both", loras=(("one.safetensors", 1.0), ("two.safetensors", -0.5)))
    again, _ = latents("again")
    assert torch.equal(zero, plain) and torch.equal(again, plain)
    assert not torch.allclose(both, plain, atol=1e-3)
    assert len(loads) == 1 and engine._manager is manager
    one = models_with_loras / "loras" / "one.safetensors"
    assert [(e["name"], e["weight"]) for e in record["loras"]] == [("one.safetensors", 1.0), ("two.safetensors", -0.5)]
    assert record["loras"][0]["sha256"] == lora.sha256_of(one) and record["loras"][0]["format"] == "kohya"
    assert record["params"]["loras"] == [[str(one.resolve()), 1.0], [str((one.parent / "two.safetensors").resolve()), -0.5]]
    assert record["memory_plan"]["lora_where"] == "cpu" and record["memory_plan"]["lora_bytes"] > 0


def test_resume_with_loras_is_bit_identical_and_needs_the_file(models_with_loras, photo, tmp_path, capsys):
    engine = Engine(device="cpu")
    # a LoRA given by path (outside models/loras/), and one by name
    mine = tmp_path / "mine.safetensors"
    shutil.copy(models_with_loras / "loras" / "one.safetensors", mine)
    params = _job_params(models_with_loras, photo, tmp_path / "a", seconds=0.54,
                         loras=((str(mine), 0.8), ("two.safetensors", 0.3)))
    cancel = CancelToken()
    stopped = engine.generate(params, cancel=cancel,
                              on_event=lambda e: isinstance(e, StepProgress) and e.section == 2 and cancel.cancel())
    assert stopped.status == "stopped" and store.read_record(stopped.job_dir)["sections_done"] == 1

    mine.rename(tmp_path / "elsewhere.safetensors")
    code = main(["resume", str(stopped.job_dir)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error:")]
    assert code == 2 and len(err) == 1
    assert "mine.safetensors this job used is missing" in err[0] and err[0].endswith("resume the job.")
    assert store.read_record(stopped.job_dir)["status"] == "stopped"  # refused before anything changed

    shutil.copy(models_with_loras / "loras" / "two.safetensors", mine)  # another file under the same name
    with pytest.raises(InputError, match="mine.safetensors has changed since the job started"):
        engine.resume(stopped.job_dir)
    (tmp_path / "elsewhere.safetensors").rename(mine)
    resumed = engine.resume(stopped.job_dir)
    clean = engine.generate(params.replace(outputs=str(tmp_path / "b")))
    assert torch.equal(store.job_latents(resumed.job_dir, "inverted"), store.job_latents(clean.job_dir, "inverted"))
    assert store.read_record(resumed.job_dir)["loras"] == store.read_record(clean.job_dir)["loras"]


@pytest.mark.parametrize("flag,fragment", [
    ("nothing-here.safetensors", "was not found"),
    ("one.safetensors:3", "between -2 and 2"),
    ("one.safetensors:inf", "finite number"),
])
def test_bad_lora_on_the_command_line(models_with_loras, photo, tmp_path, capsys, flag, fragment):
    outputs = tmp_path / "out"
    code = main(["generate", "--image", str(photo), "--models", str(models_with_loras), "--outputs", str(outputs),
                 "--seconds", "0.2", "--steps", "1", "--window", "2", "--resolution", "64", "--lora", flag])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error:")]
    assert code == 2 and len(err) == 1 and fragment in err[0]
    assert not outputs.exists() or not any(p.is_dir() for p in outputs.iterdir())


def test_wrong_model_lora_on_the_command_line(models_with_loras, photo, tmp_path, capsys):
    wan = _write(tmp_path / "wan.safetensors", {"blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 8),
                                                "blocks.0.self_attn.q.lora_up.weight": torch.zeros(8, 4)})
    outputs = tmp_path / "out"
    code = main(["generate", "--image", str(photo), "--models", str(models_with_loras), "--outputs", str(outputs),
                 "--seconds", "0.2", "--steps", "1", "--window", "2", "--resolution", "64", "--lora", str(wan)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error:")]
    assert code == 2 and len(err) == 1 and "matches none" in err[0] and "0 of its 2 keys" in err[0]
    assert not outputs.exists() or not any(p.is_dir() for p in outputs.iterdir())


# ---- the plan (pure)


def test_plan_counts_lora_memory_without_moving_blocks():
    """On the real 13B config: a rank-128 LoRA's factors cost RAM and VRAM, never the storage or blocks."""
    from framepack_local.weights.casting import BLOCK_LISTS, build_meta_model, module_bytes

    model = build_meta_model(dict(FRAMEPACK_TRANSFORMER_CONFIG))
    torch.nn.Module.to(model, dtype=torch.bfloat16)
    block_sizes = tuple(module_bytes(b) for name in BLOCK_LISTS for b in getattr(model, name))
    other = module_bytes(model) - sum(block_sizes)
    # fp8 sizes roughly halved: this test is about the LoRA's share, the fp8 rule has its own tests
    sizes = mp.ModelSizes(mp.TransformerSize(block_sizes, other, tuple(b // 2 for b in block_sizes), other))
    linears = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    blocks = {n: s for n, s in linears.items() if "blocks." in n}
    adapter = sum(128 * (i + o) * 2 for i, o in blocks.values())
    largest = max(128 * (i + o) * 2 for i, o in blocks.values())
    cost = mp.LoraCost(file_bytes=adapter, adapter_bytes=adapter, largest_layer_bytes=largest)
    assert 1.2 * mp.GB < adapter < 1.5 * mp.GB  # rank 128 on every block Linear, bf16

    def facts(vram, ram):
        return mp.SystemFacts(True, "gpu", int(vram * mp.GB), int((vram - 0.3) * mp.GB), int(ram * mp.GB),
                              int(ram * 0.8 * mp.GB), 500 * mp.GB)

    shape = mp.JobShape(height=640, width=608)
    for vram, ram, where in ((8, 32, "cpu"), (80, 128, "gpu")):
        bare = mp.plan(facts(vram, ram), sizes, shape)
        with_lora = mp.plan(facts(vram, ram), sizes, shape, lora=cost)
        assert (with_lora.transformer_storage, with_lora.resident_blocks) == (bare.transformer_storage,
                                                                            bare.resident_blocks)
        assert with_lora.lora_where == where and with_lora.lora_bytes == adapter
        by_stage = {s.stage: (s, b) for s, b in zip(with_lora.stages, bare.stages)}
        assert by_stage["text"][0].ram - by_stage["text"][1].ram == adapter
        sections, sections_bare = by_stage["sections"]
        if where == "gpu":
            assert sections.vram - sections_bare.vram == int(adapter * mp.FRAGMENTATION)
            assert sections.ram == sections_bare.ram
        else:
            assert sections.vram - sections_bare.vram == 2 * largest
            assert sections.ram - sections_bare.ram == adapter
        assert "LoRA factors" in with_lora.table()
    cpu = mp.plan(mp.SystemFacts(False, None, 0, 0, 64 * mp.GB, 50 * mp.GB, 500 * mp.GB), sizes, shape, lora=cost)
    assert cpu.lora_where == "cpu" and cpu.peak_vram == 0
    assert mp.plan(facts(8, 32), sizes, shape, lora=None) == mp.plan(facts(8, 32), sizes, shape)
