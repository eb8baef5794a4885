"""Transformer storages ("bf16", "fp8", "disk") and block streaming, on the tiny model and a mid-size one.

Numbers: "bf16" (stored in the compute dtype) and CPU streaming must be bit-identical to the plain
diffusers model; "disk" must be bit-identical to "fp8" (same numbers, different residence); "fp8"
only close. Memory: loading converts tensor by tensor, measured as anonymous RSS (file pages of a
memory map or the page cache are not counted, see measure.anon_rss_bytes).
"""

import ctypes
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from framepack_local.memory import measure
from framepack_local.weights import casting, fp8_cache, model_folder, streaming
from framepack_local.weights import storage as weight_storage
from framepack_local.errors import ModelFolderError
from transformer_inputs import tiny_inputs  # noqa: E402 (tests/ helper)

F32 = torch.float32


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.fixture(scope="module")
def folder(tiny_model_dir):
    return tiny_model_dir / "transformer"


@pytest.fixture(scope="module")
def inputs():
    return tiny_inputs()


@pytest.fixture(scope="module")
def plain_out(tiny_model_dir, inputs):
    model = model_folder.load_part(tiny_model_dir, "transformer", "cpu", F32)
    return forward(model, inputs)


@pytest.fixture(scope="module")
def fp8_out(folder, inputs):
    return forward(weight_storage.load_transformer(folder, "fp8", F32), inputs)


def test_bf16_storage_is_the_plain_model(folder, inputs, plain_out):
    model = weight_storage.load_transformer(folder, "bf16", F32)
    assert not model.training
    assert all(p.dtype == F32 and not p.requires_grad and not p.is_meta for p in model.parameters())
    assert torch.equal(forward(model, inputs), plain_out)


@pytest.mark.parametrize("resident", [0, 1, 2])
def test_cpu_streaming_is_lossless(folder, inputs, plain_out, resident):
    model = weight_storage.load_transformer(folder, "bf16", F32)
    summary = streaming.apply_streaming(model, "cpu", resident_blocks=resident)
    assert summary["resident_blocks"] == resident and summary["streamed_blocks"] == 2 - resident
    assert summary["use_stream"] is False
    assert summary["bytes_per_block"] == weight_storage.transformer_block_bytes(folder, "bf16", F32)
    # the resident head really is outside the prefetcher, the tail inside
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    assert streaming.prefetcher_of(model).blocks == blocks[resident:]
    assert torch.equal(forward(model, inputs), plain_out)
    assert torch.equal(forward(model, inputs), plain_out)  # hooks survive a second call unchanged


def test_fp8_is_close_to_the_plain_model(folder, plain_out, fp8_out):
    model = weight_storage.load_transformer(folder, "fp8", F32)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["transformer_blocks.0.attn.to_q.weight"] == torch.float8_e4m3fn
    assert dtypes["single_transformer_blocks.0.proj_mlp.weight"] == torch.float8_e4m3fn
    # diffusers' skip patterns keep norms (AdaLN modulation included), embedders and the head in compute dtype
    assert dtypes["transformer_blocks.0.norm1.linear.weight"] == F32
    assert dtypes["context_embedder.proj_in.weight"] == F32
    assert dtypes["proj_out.weight"] == F32
    assert model.dtype == F32  # what the pipeline casts its inputs to
    # e4m3 keeps 3 mantissa bits: each weight is rounded by at most 2^-4 = 6.25 % (about 2 % RMS for
    # uniformly spread values). Independent roundings average out in every dot product, so the output's
    # relative L2 error is well below one weight's worst case (measured ~0.6 % here); 5 % still
    # catches a wrong scale, a wrong dtype rule or a layer cast twice, and > 0 proves fp8 is in use.
    rel = ((fp8_out - plain_out).norm() / plain_out.norm()).item()
    assert 0 < rel < 0.05, rel
    assert torch.isfinite(fp8_out).all()


def test_fp8_forward_keeps_its_stored_tensors(folder, inputs, fp8_out):
    """Layers are upcast into temporaries; the stored fp8 tensors are never replaced, even after an error."""
    model = weight_storage.load_transformer(folder, "fp8", F32)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}

    layer = model.single_transformer_blocks[0].proj_mlp
    with pytest.raises(RuntimeError):
        layer(torch.zeros(1, 3))  # fails between the hook's upcast and its restore
    assert layer.weight.dtype == F32  # left upcast...
    assert torch.equal(forward(model, inputs), fp8_out)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
    assert layer.weight.dtype == torch.float8_e4m3fn  # ...and restored by its next call


@pytest.mark.parametrize("resident", [0, 1])
def test_disk_is_fp8_kept_on_file_pages(folder, inputs, fp8_out, tmp_path, resident):
    model = weight_storage.load_transformer(folder, "disk", F32, cache_dir=tmp_path)
    params = dict(model.named_parameters())
    # every weight is a view of the memory-mapped copy, not an allocation of its own
    assert all(not p.untyped_storage().resizable() for p in params.values())
    pointers = {name: p.data_ptr() for name, p in params.items()}
    streaming.apply_streaming(model, "cpu", resident_blocks=resident)
    assert torch.equal(forward(model, inputs), fp8_out)
    # the casting hooks put the mapped tensors back instead of re-casting into fresh RAM
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
    assert torch.equal(forward(model, inputs), fp8_out)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_disk_cache_is_reused_and_atomic(folder, tmp_path):
    cache = fp8_cache.fp8_cache_dir(folder, F32, tmp_path)
    stale = tmp_path / f".tmp-{cache.name}-{_dead_pid()}-deadbeef"  # left by a crashed conversion
    stale.mkdir()
    (stale / "half-written.safetensors").write_bytes(b"x" * 100)
    weight_storage.load_transformer(folder, "disk", F32, cache_dir=tmp_path)
    assert cache.is_dir()
    assert [p.name for p in tmp_path.iterdir()] == [cache.name]  # no temp folders, stale one removed
    files = sorted(cache.glob("*.safetensors"))
    assert [f.name for f in files] == sorted(f.name for f in folder.glob("*.safetensors"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    # the copy is a valid safetensors file holding exactly the fp8 model's numbers
    fp8 = dict(weight_storage.load_transformer(folder, "fp8", F32).named_parameters())
    seen = set()
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if name in fp8:
                    assert torch.equal(handle.get_tensor(name).view(torch.uint8), fp8[name].data.view(torch.uint8))
                    seen.add(name)
    assert seen == set(fp8)

    weight_storage.load_transformer(folder, "disk", F32, cache_dir=tmp_path)
    assert {f: f.stat().st_mtime_ns for f in sorted(cache.glob("*.safetensors"))} == stamps
    assert [p.name for p in tmp_path.iterdir()] == [cache.name]


def test_damaged_disk_cache_is_rewritten(folder, inputs, fp8_out, tmp_path):
    weight_storage.load_transformer(folder, "disk", F32, cache_dir=tmp_path)
    cache = fp8_cache.fp8_cache_dir(folder, F32, tmp_path)
    victim = sorted(cache.glob("*.safetensors"))[0]
    with victim.open("r+b") as handle:
        handle.truncate(victim.stat().st_size - 10)
    model = weight_storage.load_transformer(folder, "disk", F32, cache_dir=tmp_path)
    assert torch.equal(forward(model, inputs), fp8_out)


@pytest.mark.parametrize("storage", casting.STORAGES)
def test_truncated_shard_is_a_model_folder_error(folder, tmp_path, storage):
    broken = tmp_path / "models" / "transformer"
    shutil.copytree(folder, broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ModelFolderError) as info:
        weight_storage.load_transformer(broken, storage, F32, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert shard.name in message and "\n" not in message and message.endswith(".")
    assert message.count(". ") == 0  # one sentence
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_missing_tensor_is_a_model_folder_error(folder, tmp_path):
    broken = tmp_path / "transformer"
    shutil.copytree(folder, broken)
    index_path = broken / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = broken / index["weight_map"]["proj_out.weight"]
    with safe_open(str(shard), framework="pt") as handle:
        kept = {k: handle.get_tensor(k) for k in handle.keys() if k != "proj_out.weight"}
    save_file(kept, str(shard))
    with pytest.raises(ModelFolderError, match="lacks 1 of"):
        weight_storage.load_transformer(broken, "fp8", F32)


def test_unload_frees_everything(folder, tmp_path):
    model = weight_storage.load_transformer(folder, "disk", F32, cache_dir=tmp_path)
    streaming.apply_streaming(model, "cpu", resident_blocks=1)
    streaming.unload(model)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert not streaming._is_streaming(model)


def test_block_bytes_of_the_real_config_on_meta():
    from framepack_local.weights.model_folder import FRAMEPACK_TRANSFORMER_CONFIG as real

    bf16 = weight_storage.transformer_block_bytes(real, "bf16")
    fp8 = weight_storage.transformer_block_bytes(real, "fp8")
    assert fp8 == weight_storage.transformer_block_bytes(real, "disk")
    assert len(bf16) == 60
    # dual block: 36 h^2 weights, 12 h^2 of them AdaLN modulation (kept bf16); single block: 15 h^2, 3 h^2 kept
    h = 3072
    assert bf16[0] == pytest.approx(2 * 36 * h * h, rel=0.01)
    assert fp8[0] == pytest.approx((24 + 2 * 12) * h * h, rel=0.01)
    assert bf16[-1] == pytest.approx(2 * 15 * h * h, rel=0.01)
    assert fp8[-1] == pytest.approx((12 + 2 * 3) * h * h, rel=0.01)
    total = sum(bf16) + weight_storage.transformer_nonblock_bytes(real, "bf16")
    assert 25.5e9 < total < 26.0e9  # the published 25.7 GB checkpoint


# ---------------------------------------------------------------------------------------------
# Memory: a synthetic mid-size checkpoint (~140 MB bf16), written block by block
# ---------------------------------------------------------------------------------------------

MID_CONFIG = dict(
    in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=128, num_layers=2,
    num_single_layers=12, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=512, pooled_projection_dim=64, rope_theta=256.0,
    rope_axes_dim=(16, 56, 56), image_condition_type=None, has_image_proj=True, image_proj_dim=64,
    has_clean_x_embedder=True,
)


@pytest.fixture(scope="module")
def mid_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mid") / "transformer"
    folder.mkdir()
    meta = casting.build_meta_model(MID_CONFIG)
    (folder / "config.json").write_text(json.dumps(dict(meta.config)))
    g = torch.Generator().manual_seed(0)
    groups = [("", None)] + [(f"{ln}.{i}.", b) for ln in casting.BLOCK_LISTS for i, b in enumerate(getattr(meta, ln))]
    weight_map = {}
    for k, (prefix, module) in enumerate(groups):
        if module is None:  # everything outside the blocks in one shard
            named = [(n, t) for n, t in meta.named_parameters() if not n.startswith(casting.BLOCK_LISTS)]
        else:
            named = [(prefix + n, t) for n, t in module.named_parameters()]
        shard = f"diffusion_pytorch_model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: (torch.randn(t.shape, generator=g) * 0.02).to(torch.bfloat16) for n, t in named},
                  str(folder / shard))
        weight_map.update({n: shard for n, _ in named})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _trim_heap():
    """Give freed heap back to the OS so it cannot hide new allocations from RssAnon (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _bf16_bytes(folder):
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RssAnon is Linux only")
def test_fp8_load_converts_while_reading(mid_folder):
    bf16_size = _bf16_bytes(mid_folder)
    expected_fp8 = (sum(weight_storage.transformer_block_bytes(MID_CONFIG, "fp8", torch.bfloat16))
                    + weight_storage.transformer_nonblock_bytes(MID_CONFIG, "fp8", torch.bfloat16))
    assert 100e6 < bf16_size < 200e6 and expected_fp8 < 0.67 * bf16_size
    _trim_heap()
    with measure.PeakSampler(interval=0.005) as peak:
        model = weight_storage.load_transformer(mid_folder, "fp8", torch.bfloat16)
    # The whole bf16 model never sat in RAM: the peak is the fp8 model plus about one tensor.
    assert peak.growth < 0.75 * bf16_size, (peak.growth, bf16_size)
    assert peak.growth < expected_fp8 + 24e6, (peak.growth, expected_fp8)
    assert peak.growth > 0.8 * expected_fp8  # the sampler does see the weights
    del model


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RssAnon is Linux only")
def test_disk_load_maps_instead_of_copying(mid_folder, tmp_path):
    bf16_size = _bf16_bytes(mid_folder)
    weight_storage.load_transformer(mid_folder, "disk", torch.bfloat16, cache_dir=tmp_path)  # writes the copy
    _trim_heap()
    with measure.PeakSampler(interval=0.005) as peak:
        model = weight_storage.load_transformer(mid_folder, "disk", torch.bfloat16, cache_dir=tmp_path)
    assert peak.growth < 0.25 * bf16_size, (peak.growth, bf16_size)
    # ...and a forward (fp8 -> bf16 one layer at a time) leaves the weights on their file pages
    mid_inputs = tiny_inputs(text_dim=512, pooled_dim=64, image_dim=64, h=4, w=4, window=1)
    mid_inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                  for k, v in mid_inputs.items()}
    _trim_heap()
    before = measure.anon_rss_bytes()
    out = forward(model, mid_inputs)
    assert torch.isfinite(out.float()).all()
    _trim_heap()
    assert measure.anon_rss_bytes() - before < 0.25 * bf16_size


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RssAnon is Linux only")
def test_fp8_keep_mapped_owns_only_the_fp8_weights(mid_folder):
    # For GPU compute: the uncast bf16 tensors stay views of the checkpoint's file map (page cache).
    bf16_size = _bf16_bytes(mid_folder)
    fp8_total = (sum(weight_storage.transformer_block_bytes(MID_CONFIG, "fp8", torch.bfloat16))
                 + weight_storage.transformer_nonblock_bytes(MID_CONFIG, "fp8", torch.bfloat16))
    owned_fp8 = bf16_size - fp8_total  # C/2 where C = bf16 bytes of the cast tensors
    _trim_heap()
    with measure.PeakSampler(interval=0.005) as peak:
        mapped = weight_storage.load_transformer(mid_folder, "fp8", torch.bfloat16, keep_mapped=True)
    assert peak.growth < owned_fp8 + 24e6, (peak.growth, owned_fp8)
    assert peak.growth < 0.8 * fp8_total  # clearly below the all-owned fp8 load
    owned = weight_storage.load_transformer(mid_folder, "fp8", torch.bfloat16)
    for (name, a), (_, b) in zip(mapped.state_dict().items(), owned.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
