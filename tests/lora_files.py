"""Tiny random LoRAs for the tiny transformer, one set of factors written in every layout users have."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# The layers a LoRA targets, in the transformer's (diffusers') names, and the original HunyuanVideo
# layer each belongs to. Fused originals (qkv, single-block linear1) share one down matrix; their up
# matrix is the parts' up matrices stacked in this order.
DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp.fc1": ("ff.net.0.proj",),
    "img_mlp.fc2": ("ff.net.2",),
    "img_mod.linear": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp.fc1": ("ff_context.net.0.proj",),
    "txt_mlp.fc2": ("ff_context.net.2",),
    "txt_mod.linear": ("norm1_context.linear",),
}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.linear": ("norm.linear",),
}
FORMATS = ("diffusers", "original", "kohya", "kohya-framepack")


def _groups(config: dict):
    """(original name, [transformer names]) for every targeted layer."""
    for i in range(config["num_layers"]):
        for orig, parts in DOUBLE.items():
            yield f"double_blocks.{i}.{orig}", [f"transformer_blocks.{i}.{p}" for p in parts]
    for i in range(config["num_single_layers"]):
        for orig, parts in SINGLE.items():
            yield f"single_blocks.{i}.{orig}", [f"single_transformer_blocks.{i}.{p}" for p in parts]


def random_lora(model_dir: Path, rank: int = 4, seed: int = 0, scale: float = 0.2) -> dict:
    """{transformer layer: (A (rank, in), B (out, rank))}: the reference every file below encodes."""
    config = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())
    from framepack_local.weights.lora import transformer_linears

    linears = transformer_linears(config)
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for _orig, parts in _groups(config):
        a = torch.randn(rank, linears[parts[0]][0], generator=g) * scale
        for part in parts:
            factors[part] = (a, torch.randn(linears[part][1], rank, generator=g) * scale)
    return factors


def write_lora(path: Path, factors: dict, fmt: str, config: dict, alpha_scale: float = 0.5) -> Path:
    """``factors`` in one layout. kohya files carry alpha = alpha_scale * rank, their up matrix divided by
    it (exactly, for a power of two), so the update they mean is the same B A."""
    tensors = {}
    for orig, parts in _groups(config):
        a = factors[parts[0]][0]
        rank = a.shape[0]
        if fmt == "diffusers":
            for part in parts:
                tensors[f"transformer.{part}.lora_A.weight"] = a
                tensors[f"transformer.{part}.lora_B.weight"] = factors[part][1]
        elif fmt == "original":
            tensors[f"diffusion_model.{orig}.lora_A.weight"] = a
            tensors[f"diffusion_model.{orig}.lora_B.weight"] = torch.cat([factors[p][1] for p in parts])
        elif fmt == "kohya":
            name = "lora_unet_" + orig.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = a
            tensors[f"{name}.lora_up.weight"] = torch.cat([factors[p][1] for p in parts]) / alpha_scale
            tensors[f"{name}.alpha"] = torch.tensor(alpha_scale * rank)
        elif fmt == "kohya-framepack":  # musubi-tuner's FramePack trainer: the transformer's names, flattened
            for part in parts:
                name = "lora_unet_" + part.replace(".", "_")
                tensors[f"{name}.lora_down.weight"] = a
                tensors[f"{name}.lora_up.weight"] = factors[part][1] / alpha_scale
                tensors[f"{name}.alpha"] = torch.tensor(alpha_scale * rank)
        else:
            raise ValueError(fmt)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path))
    return Path(path)


def merged_model(model, factors_by_weight: list[tuple[dict, float]]):
    """The model with W + w B A written into its weights by hand (the reference for the adapters)."""
    with torch.no_grad():
        for factors, weight in factors_by_weight:
            for name, (a, b) in factors.items():
                layer = model.get_submodule(name)
                layer.weight += weight * (b @ a)
    return model
