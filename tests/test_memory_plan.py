"""The memory plan is a pure function of facts; checked on the real 13B configuration built on `meta`."""

import pytest
import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel

from framepack_local.memory import plan as m
from framepack_local.memory.probe import model_sizes_from_folder, probe, transformer_size_from_module
from framepack_local.weights.model_folder import FRAMEPACK_TRANSFORMER_CONFIG
from framepack_local.engine.schedule import find_bucket

GB = m.GB
REAL_CONFIG = FRAMEPACK_TRANSFORMER_CONFIG


@pytest.fixture(scope="module")
def real_sizes():
    with torch.device("meta"):
        model = HunyuanVideoFramepackTransformer3DModel(**REAL_CONFIG)
    return m.ModelSizes(transformer_size_from_module(model))


def facts(vram_gb, ram_gb, bnb=True, used_vram_gb=0.3, ram_free=0.8):
    return m.SystemFacts(
        cuda=vram_gb > 0, gpu_name="test GPU" if vram_gb else None, vram_total=int(vram_gb * GB),
        vram_free=int(max(0, vram_gb - used_vram_gb) * GB), ram_total=int(ram_gb * GB),
        ram_available=int(ram_gb * ram_free * GB), disk_free=500 * GB, bitsandbytes=bnb and vram_gb > 0,
    )


def shape_640():
    h, w = find_bucket(640, 608, 640)
    return m.JobShape(height=h, width=w, window=9, text_tokens=512, image_tokens=729)


def test_real_config_is_13b(real_sizes):
    t = real_sizes.transformer
    assert len(t.blocks) == 60
    assert 25 * 10**9 < t.total < 26.5 * 10**9  # 25.7 GB bf16 as published
    assert t.hidden == 3072


@pytest.mark.parametrize("vram,ram", [(6, 16), (8, 32), (24, 64), (80, 128), (0, 16), (0, 64)])
def test_plans_stay_under_the_facts(real_sizes, vram, ram):
    f = facts(vram, ram)
    p = m.plan(f, real_sizes, shape_640())
    assert p.peak_ram <= f.ram_total
    if vram:
        assert p.device == "cuda"
        assert p.peak_vram <= f.vram_total
        assert p.resident_blocks + p.streamed_blocks == 60
    else:
        assert p.device == "cpu" and p.peak_vram == 0
    assert p.table().count("\n") >= 5 and "sections" in p.table()
    assert p.to_dict()["peak_vram"] == p.peak_vram


def test_small_machines_stream_and_big_ones_keep_resident(real_sizes):
    p6 = m.plan(facts(6, 16), real_sizes, shape_640())
    p8 = m.plan(facts(8, 32), real_sizes, shape_640())
    p24 = m.plan(facts(24, 64), real_sizes, shape_640())
    p80 = m.plan(facts(80, 128), real_sizes, shape_640())
    assert p6.peak_vram <= 6 * GB and p8.peak_vram <= 8 * GB  # the targets, activations included
    assert p6.transformer_storage in ("fp8", "disk") and p6.streamed_blocks > 0
    assert p8.transformer_storage == "fp8"  # 26 GB of bf16 does not fit 32 GB with the rest
    assert p24.transformer_storage == "bf16" and 0 < p24.resident_blocks < 60
    assert p80.streamed_blocks == 0 and p80.transformer_storage == "bf16"
    assert p6.resident_blocks <= p8.resident_blocks <= p24.resident_blocks <= p80.resident_blocks
    # The 8B LLaMA is never in RAM next to the transformer on small machines.
    assert not p6.keep_text_encoder and not p8.keep_text_encoder
    assert p6.text_encoder_mode in ("gpu-int4", "disk-fp16")


def test_without_bitsandbytes_the_text_encoder_streams_from_disk(real_sizes):
    p = m.plan(facts(8, 16, bnb=False), real_sizes, shape_640())
    assert p.text_encoder_mode == "disk-fp16"
    assert p.peak_ram <= 16 * GB


def test_keep_free_reduces_resident_blocks(real_sizes):
    a = m.plan(facts(24, 64), real_sizes, shape_640())
    b = m.plan(facts(24, 64), real_sizes, shape_640(), keep_free_gb=6)
    assert b.resident_blocks < a.resident_blocks
    assert b.peak_vram <= 18 * GB


def test_profile_override(real_sizes):
    assert m.plan(facts(24, 64), real_sizes, shape_640(), profile="fp8").transformer_storage == "fp8"
    assert m.plan(facts(24, 64), real_sizes, shape_640(), profile="disk").transformer_storage == "disk"
    with pytest.raises(ValueError):
        m.plan(facts(24, 64), real_sizes, shape_640(), profile="turbo")


def test_activation_estimate_grows_with_the_window_and_bucket():
    small = m.activation_bytes(m.JobShape(height=416, width=960, window=5))
    big = m.activation_bytes(m.JobShape(height=640, width=608, window=9))
    assert 0 < small < big
    # 640 bucket, window 9: ~18.7k tokens x 3072 x 19 x 2 bytes ~ 2.1 GB
    assert 1.8 * GB < big < 2.4 * GB


def test_sizes_from_tiny_folder_headers(tiny_model_dir):
    sizes = model_sizes_from_folder(tiny_model_dir, "inverted")
    from framepack_local.weights.model_folder import load_part

    model = load_part(tiny_model_dir, "transformer")
    assert sizes.transformer == transformer_size_from_module(model)
    assert sizes.vae > 0 and sizes.text_encoder > 0


def test_probe_reads_this_machine(tmp_path):
    f = probe(tmp_path)
    assert f.ram_total > f.ram_available > 0 and f.disk_free > 0
    assert f.cuda == torch.cuda.is_available()
