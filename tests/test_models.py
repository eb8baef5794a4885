"""Tiny model folder, folder checks and loading: offline, on the real library classes."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from framepack_local.errors import ModelFolderError
from transformer_inputs import tiny_inputs  # tests/ helper
from framepack_local.weights.model_folder import (
    MODE_PARTS,
    PARTS,
    check_model_folder,
    default_dtype,
    load_models,
    load_part,
    missing_parts,
    model_identity,
)
from framepack_local.weights.tiny import TEMPLATE_PREAMBLE, TEMPLATE_PREAMBLE_TOKENS, make_tiny_model

SHARED = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae", "image_encoder", "feature_extractor"]


def assert_one_sentence(message: str) -> None:
    assert "\n" not in message
    assert message.endswith("."), message
    # A sentence break is ". " followed by a capital letter; commands and paths contain neither.
    assert re.search(r"[.!?]\s+[A-Z]", message) is None, message


def file_hashes(root: Path, pattern: str = "*") -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob(pattern))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "models"
    started = time.perf_counter()
    make_tiny_model(root, seed=0)
    print(f"tiny model folder built in {time.perf_counter() - started:.2f} s")
    return root


@pytest.fixture(scope="module")
def loaded(tiny_root):
    return load_models(tiny_root, ["inverted", "forward"])


@pytest.fixture()
def tiny_copy(tiny_root, tmp_path) -> Path:
    """A private copy (a few MB) for tests that break the folder."""
    return Path(shutil.copytree(tiny_root, tmp_path / "models"))


# ---------------------------------------------------------------------------------------------
# The tiny folder
# ---------------------------------------------------------------------------------------------


def test_tiny_folder_has_the_full_layout(tiny_root):
    for mode in ("inverted", "forward"):
        assert missing_parts(tiny_root, mode) == []
        check_model_folder(tiny_root, mode)
    for spec in PARTS.values():
        assert (tiny_root / spec.subfolder).is_dir(), spec.subfolder
    source = json.loads((tiny_root / "source.json").read_text())
    assert source == {"kind": "tiny-random", "seed": 0, "created_by": "framepack_local make-tiny-model"}
    # safetensors only, never a pickle
    suffixes = {p.suffix for p in tiny_root.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors"}, suffixes
    # sharded like the real checkpoints, so the index handling is exercised
    for folder in ("transformer", "transformer_f1"):
        index = json.loads((tiny_root / folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    assert (tiny_root / "text_encoder" / "model.safetensors.index.json").is_file()


def test_tiny_build_is_deterministic(tiny_root, tmp_path):
    again = make_tiny_model(tmp_path / "again", seed=0)
    assert file_hashes(again) == file_hashes(tiny_root)
    other = make_tiny_model(tmp_path / "other", seed=1)
    weights_0 = file_hashes(tiny_root, "*.safetensors")
    weights_1 = file_hashes(other, "*.safetensors")
    assert weights_0.keys() == weights_1.keys()
    assert all(weights_0[k] != weights_1[k] for k in weights_0)
    # the two transformers are different checkpoints, like the real ones
    assert weights_0["transformer/diffusion_pytorch_model-00001-of-00003.safetensors"] != (
        weights_0["transformer_f1/diffusion_pytorch_model-00001-of-00003.safetensors"]
    )


def test_load_models_uses_the_real_classes(loaded):
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
    from transformers import CLIPTextModel, CLIPTokenizer, LlamaModel, SiglipVisionModel

    assert isinstance(loaded.text_encoder, LlamaModel)
    assert isinstance(loaded.text_encoder_2, CLIPTextModel)
    assert isinstance(loaded.tokenizer_2, CLIPTokenizer)
    assert isinstance(loaded.vae, AutoencoderKLHunyuanVideo)
    assert isinstance(loaded.image_encoder, SiglipVisionModel)
    assert type(loaded.feature_extractor).__name__.startswith("SiglipImageProcessor")
    assert set(loaded.transformers) == {"inverted", "forward"}
    for model in loaded.transformers.values():
        assert isinstance(model, HunyuanVideoFramepackTransformer3DModel)
    for model in (loaded.text_encoder, loaded.vae, loaded.transformers["inverted"]):
        param = next(model.parameters())
        assert param.dtype == torch.float32 and param.device.type == "cpu" and not param.requires_grad
        assert not model.training


def test_configs_keep_the_real_relations(loaded):
    t = loaded.transformers["inverted"].config
    assert (t.in_channels, t.out_channels, t.patch_size, t.patch_size_t) == (16, 16, 2, 1)
    assert t.has_image_proj and t.has_clean_x_embedder and t.guidance_embeds and t.image_condition_type is None
    assert t.text_embed_dim == loaded.text_encoder.config.hidden_size
    assert t.pooled_projection_dim == loaded.text_encoder_2.config.hidden_size
    assert t.image_proj_dim == loaded.image_encoder.config.hidden_size
    assert sum(t.rope_axes_dim) == t.attention_head_dim
    llama = loaded.text_encoder.config
    assert llama.num_hidden_layers >= 3 and llama.max_position_embeddings >= 512
    assert llama.vocab_size == len(loaded.tokenizer)
    assert loaded.text_encoder_2.config.vocab_size == len(loaded.tokenizer_2)
    vae = loaded.vae.config
    assert vae.latent_channels == 16 and vae.scaling_factor == pytest.approx(0.476986)
    assert vae.spatial_compression_ratio == 8 and vae.temporal_compression_ratio == 4
    size = loaded.image_encoder.config.image_size
    assert loaded.feature_extractor.size == {"height": size, "width": size}


def test_llama_tokenizer(loaded):
    tok = loaded.tokenizer
    assert tok.padding_side == "right"
    assert tok.bos_token is not None and tok.pad_token is not None
    for special in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        ids = tok(special, add_special_tokens=False).input_ids
        assert len(ids) == 1, special
    prefix = "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    ids = tok(prefix).input_ids
    assert ids[0] == tok.bos_token_id
    print(f"template prefix: {len(ids)} tokens")
    # like the real LLaMA-3 tokenizer: the preamble diffusers crops (crop_start=95) is 95 tokens
    assert TEMPLATE_PREAMBLE_TOKENS == 95
    assert len(tok(TEMPLATE_PREAMBLE).input_ids) == 95
    # byte-level: any text survives a round trip, newlines included (the template relies on them)
    text = "Zyzzyva quokka\n\nnaïve 東京 émigré — 42%"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    # long prompts are possible: the pipeline crops at 256 tokens
    words = ("a misty valley where ancient castles glow under a purple sky while dragons circle slowly " * 20).split()
    assert len(words) >= 300
    assert len(tok(" ".join(words[:300])).input_ids) > 256
    batch = tok(["a cat", "a cat walks across the room"], padding="max_length", max_length=16, return_tensors="pt")
    assert batch.input_ids[0, 0] == tok.bos_token_id  # prompt at the start
    assert batch.attention_mask[0, 0] == 1 and batch.attention_mask[0, -1] == 0
    assert batch.input_ids[0, -1] == tok.pad_token_id


def test_llama_tokenizer_declared_as_llama_class_keeps_byte_level(tiny_copy):
    """The real tokenizer_config may declare LlamaTokenizerFast; transformers 5's class of that name
    would rebuild it as Metaspace and drop the newlines, so the loader must not use it."""
    config_path = tiny_copy / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "LlamaTokenizerFast"
    config["padding_side"] = "left"
    config_path.write_text(json.dumps(config))
    tok = load_part(tiny_copy, "tokenizer")
    assert tok.padding_side == "right"
    text = "<|start_header_id|>user<|end_header_id|>\n\na cat"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_clip_tokenizer(loaded):
    tok = loaded.tokenizer_2
    assert tok.model_max_length == 77
    assert tok.padding_side == "right"
    batch = tok(["A Cat walks. " * 60], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (1, 77)
    assert batch.input_ids[0, 0] == tok.bos_token_id
    assert (batch.input_ids[0] == tok.eos_token_id).any()


def test_encoders_run(loaded):
    with torch.no_grad():
        batch = loaded.tokenizer(["a cat"], padding="max_length", max_length=512, return_tensors="pt")
        hidden = loaded.text_encoder(**batch, output_hidden_states=True).hidden_states
        assert hidden[-3].shape == (1, 512, loaded.text_encoder.config.hidden_size)
        clip = loaded.tokenizer_2(["a cat"], padding="max_length", max_length=77, return_tensors="pt")
        pooled = loaded.text_encoder_2(clip.input_ids).pooler_output
        assert pooled.shape == (1, loaded.transformers["inverted"].config.pooled_projection_dim)

        from PIL import Image

        image = Image.new("RGB", (70, 50), (200, 30, 90))
        pixels = loaded.feature_extractor(images=image, return_tensors="pt").pixel_values
        cfg = loaded.image_encoder.config
        assert pixels.shape == (1, 3, cfg.image_size, cfg.image_size)
        tokens = loaded.image_encoder(pixels).last_hidden_state
        assert tokens.shape == (1, (cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size)


def test_vae_compression(loaded):
    with torch.no_grad():
        latents = loaded.vae.encode(torch.randn(1, 3, 1, 64, 64)).latent_dist.mode()
        assert latents.shape == (1, 16, 1, 8, 8)
        frames = loaded.vae.decode(torch.randn(1, 16, 3, 8, 8)).sample
        assert frames.shape == (1, 3, 9, 64, 64)  # causal VAE: 1 + 4 * (3 - 1) frames


def test_transformer_forward_runs(loaded):
    outputs = {}
    for mode, model in loaded.transformers.items():
        inputs = tiny_inputs(loaded.text_encoder.config.hidden_size, model.config.pooled_projection_dim,
                             model.config.image_proj_dim, h=8, w=8)
        with torch.no_grad():
            outputs[mode] = model(**inputs)[0]
        assert outputs[mode].shape == inputs["hidden_states"].shape
        assert torch.isfinite(outputs[mode]).all()
    assert not torch.allclose(outputs["inverted"], outputs["forward"])


# ---------------------------------------------------------------------------------------------
# Folder checks
# ---------------------------------------------------------------------------------------------


def test_missing_vae_is_named_with_the_fix(tiny_copy):
    shutil.rmtree(tiny_copy / "vae")
    assert missing_parts(tiny_copy, "inverted") == ["vae"]
    with pytest.raises(ModelFolderError) as info:
        check_model_folder(tiny_copy, "inverted")
    message = str(info.value)
    assert_one_sentence(message)
    assert "vae" in message and str(tiny_copy) in message
    assert f"python -m framepack_local download --models {tiny_copy}" in message
    assert "GB" in message
    assert "text_encoder" not in message


def test_missing_transformer_shard(tiny_copy):
    (tiny_copy / "transformer" / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    assert missing_parts(tiny_copy, "inverted") == ["transformer"]
    assert missing_parts(tiny_copy, "forward") == []
    with pytest.raises(ModelFolderError, match="transformer"):
        check_model_folder(tiny_copy, "inverted")
    check_model_folder(tiny_copy, "forward")


def test_missing_shard_index_or_tokenizer_file(tiny_copy):
    (tiny_copy / "text_encoder" / "model.safetensors.index.json").unlink()
    (tiny_copy / "tokenizer_2" / "tokenizer.json").unlink()
    assert missing_parts(tiny_copy, "forward") == ["text_encoder", "tokenizer_2"]


def test_forward_needs_transformer_f1(tiny_copy):
    shutil.rmtree(tiny_copy / "transformer_f1")
    check_model_folder(tiny_copy, "inverted")
    with pytest.raises(ModelFolderError) as info:
        check_model_folder(tiny_copy, "forward")
    assert_one_sentence(str(info.value))
    assert "transformer_f1" in str(info.value)
    assert f"download --models {tiny_copy} --variant forward`" in str(info.value)
    with pytest.raises(ModelFolderError):
        load_models(tiny_copy, ["inverted", "forward"])
    only_inverted = load_models(tiny_copy, ["inverted"])
    assert set(only_inverted.transformers) == {"inverted"}


def test_empty_and_nonexistent_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert missing_parts(empty, "inverted") == SHARED + [MODE_PARTS["inverted"]]
    with pytest.raises(ModelFolderError) as info:
        check_model_folder(empty, "inverted")
    assert_one_sentence(str(info.value))
    assert "make-tiny-model" in str(info.value)

    nowhere = tmp_path / "nowhere"
    with pytest.raises(ModelFolderError) as info:
        check_model_folder(nowhere, "forward")
    message = str(info.value)
    assert_one_sentence(message)
    assert "does not exist" in message and f"download --models {nowhere}" in message
    with pytest.raises(ModelFolderError):
        load_models(nowhere, ["forward"])


def test_unknown_mode_is_a_programming_error(tiny_root):
    with pytest.raises(ValueError):
        missing_parts(tiny_root, "sideways")


# ---------------------------------------------------------------------------------------------
# Damaged files
# ---------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("part", "relative"),
    [
        ("vae", "vae/diffusion_pytorch_model.safetensors"),
        ("transformer", "transformer/diffusion_pytorch_model-00003-of-00003.safetensors"),
        ("text_encoder", "text_encoder/model-00001-of-00003.safetensors"),
        ("image_encoder", "image_encoder/model.safetensors"),
    ],
)
def test_truncated_weights_are_reported_as_damaged(tiny_copy, part, relative):
    _truncate(tiny_copy / relative)
    check_model_folder(tiny_copy, "inverted")  # present: the damage shows only when loading
    with pytest.raises(ModelFolderError) as info:
        load_models(tiny_copy, ["inverted"])
    message = str(info.value)
    assert_one_sentence(message)
    assert message == (
        f"The model file {part} in {tiny_copy} is damaged or incomplete; "
        f"run `python -m framepack_local download --models {tiny_copy}` again."
    )
    assert info.value.__cause__ is not None


def test_garbage_header_and_config_are_reported_as_damaged(tiny_copy):
    weights = tiny_copy / "text_encoder_2" / "model.safetensors"
    weights.write_bytes(b"\xff" * weights.stat().st_size)
    with pytest.raises(ModelFolderError, match="text_encoder_2"):
        load_part(tiny_copy, "text_encoder_2")
    (tiny_copy / "vae" / "config.json").write_text("{ not json")
    with pytest.raises(ModelFolderError, match="vae"):
        load_part(tiny_copy, "vae")


# ---------------------------------------------------------------------------------------------
# Misc
# ---------------------------------------------------------------------------------------------


def test_dtype_choice(tiny_root):
    assert default_dtype("cpu") == torch.float32
    assert default_dtype("cuda") == torch.bfloat16
    assert default_dtype(torch.device("cuda", 0)) == torch.bfloat16
    vae = load_part(tiny_root, "vae", dtype=torch.bfloat16)
    assert next(vae.parameters()).dtype == torch.bfloat16


def test_model_identity(tiny_root, tiny_copy):
    identity = model_identity(tiny_root)
    json.dumps(identity)  # goes into job metadata
    assert identity["source"]["kind"] == "tiny-random" and identity["source"]["seed"] == 0
    assert set(identity["parts"]) == set(PARTS)
    parts = identity["parts"]
    assert all(len(p["config_sha256"]) == 12 for p in parts.values())
    # same config, different checkpoints: only the weights fingerprint tells them apart
    assert parts["transformer"]["config_sha256"] == parts["transformer_f1"]["config_sha256"]
    assert parts["transformer"]["weights_fingerprint"] != parts["transformer_f1"]["weights_fingerprint"]
    # a changed config changes the identity
    (tiny_copy / "vae" / "config.json").write_text(
        (tiny_copy / "vae" / "config.json").read_text().replace("0.476986", "0.5")
    )
    assert model_identity(tiny_copy)["parts"]["vae"]["config_sha256"] != parts["vae"]["config_sha256"]
