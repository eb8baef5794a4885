"""LoRA files for the FramePack transformer: read (safetensors only), recognise the layout, convert, check.

Three layouts are in circulation, told apart by their keys:

- ``diffusers``: diffusers/PEFT names, ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``.
- ``original``: the original HunyuanVideo module names (diffusion-pipe and others),
  ``diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight``, with q, k and v fused in one layer.
  diffusers' own converter (``HunyuanVideoLoraLoaderMixin.lora_state_dict`` calls it) maps these;
  it hard-codes the 13B model's width for the fused single-block ``linear1``, so we split that one
  ourselves with the width of the transformer at hand before handing the rest over.
- ``kohya``: kohya-ss / musubi-tuner, flat names with ``lora_down``/``lora_up``/``alpha``. musubi's
  HunyuanVideo trainer writes original names (``lora_unet_double_blocks_0_img_attn_qkv``), its FramePack
  trainer diffusers names (``lora_unet_transformer_blocks_0_attn_to_q``); diffusers has no converter
  for either, so the flat names are matched against the transformer's own module names here, and
  ``alpha / rank`` is folded into the up matrix.

Every layout ends as {module name: (down (rank, in), up (out, rank), scale)}: the delta of a layer is
``weight * scale * up @ down``, scale being the file's alpha / rank (1 without alpha). The tensors stay
as the file has them (no float32 copies of a whole file); lora.py never touches the model, lora_runtime.py
does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError

logger = logging.getLogger(__name__)

LORA_FOLDER = "loras"  # inside the model folder: models/loras/
LORA_SUFFIX = ".safetensors"
FORMATS = ("diffusers", "original", "kohya")

# Original HunyuanVideo block layers (musubi-tuner targets the two block classes only).
_ORIGINAL_DOUBLE = ("img_attn_qkv", "img_attn_proj", "img_mlp.fc1", "img_mlp.fc2", "img_mod.linear",
                    "txt_attn_qkv", "txt_attn_proj", "txt_mlp.fc1", "txt_mlp.fc2", "txt_mod.linear")
_ORIGINAL_SINGLE = ("linear1", "linear2", "modulation.linear")
_ORIGINAL_ROOTS = ("double_blocks.", "single_blocks.", "txt_in.", "img_in.", "time_in.", "vector_in.",
                   "guidance_in.", "final_layer.")
_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.")
# Other adapter kinds we do not compute (their keys would be silently dropped by a plain LoRA loader).
_UNSUPPORTED = ("dora_scale", "hada_", "lokr_", ".diff_b", ".diff")


@dataclass
class LoadedLora:
    """One LoRA file, converted and checked against the transformer, with the weight the job asked for."""

    path: Path
    sha256: str
    weight: float
    format: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module -> (down, up, alpha / rank)
    unmatched: int = 0  # LoRA layers that name nothing in the transformer (left out)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def rank(self) -> int:
        return max((down.shape[0] for down, _, _ in self.factors.values()), default=0)

    @property
    def file_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for down, up, _ in self.factors.values() for t in (down, up))

    def record(self) -> dict:
        """What job.json keeps: enough to find the very same file again on resume."""
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256, "weight": self.weight,
                "format": self.format, "layers": len(self.factors), "rank": self.rank,
                "unmatched_layers": self.unmatched}


# ---- files and arguments


def lora_folder(models: Path | str) -> Path:
    return Path(models) / LORA_FOLDER


def list_lora_files(models: Path | str) -> list[str]:
    """LoRA files offered in the page: names relative to models/loras/, sorted."""
    folder = lora_folder(models)
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(f"*{LORA_SUFFIX}") if p.is_file())


def parse_lora_arg(text: str, default_weight: float = 1.0) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` -> (file, weight). Only a number after the last colon is a weight, so Windows
    drive letters and colons in names stay part of the file."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return text, default_weight
        if not math.isfinite(weight):
            raise InputError(f"The LoRA weight in {text!r} must be a finite number between -2 and 2.")
        return head, weight
    return text, default_weight


def resolve_lora_path(spec: str, models: Path | str) -> Path:
    """A path as given, else a name inside models/loras/; InputError when neither is a file."""
    given = Path(spec).expanduser()
    for candidate in (given, lora_folder(models) / spec):
        if candidate.is_file():
            return candidate.resolve()
    raise InputError(f"The LoRA file {spec} was not found (looked for it as a path and in "
                     f"{lora_folder(models)}); check the name or put the file there.")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_lora_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors LoRA (never unpickled); one sentence for anything else."""
    path = Path(path)
    not_st = (f"{path.name} is not a safetensors file; LoRAs are loaded only from .safetensors files "
              f"(convert .pt/.ckpt/.bin ones first).")
    if path.suffix.lower() != LORA_SUFFIX:
        raise InputError(not_st)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(not_st) from exc


# ---- layouts


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def detect_format(keys) -> str | None:
    keys = list(keys)
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    stripped = [_strip(k) for k in keys]
    if any(k.startswith(_ORIGINAL_ROOTS) for k in stripped):
        return "original"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    return None


def _pairs(tensors: dict[str, torch.Tensor], down: str, up: str) -> tuple[dict, int]:
    """{module: (down, up, alpha / rank)}, and the count of keys that are none of them."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    stray = 0
    for key, tensor in tensors.items():
        for part, marker in (("down", f".{down}."), ("up", f".{up}."), ("alpha", ".alpha")):
            if marker in key and (part != "alpha" or key.endswith(".alpha")):
                module = key.split(marker)[0]
                if part != "alpha" and not key.endswith(".weight"):
                    part = f"{part}_bias"  # a LoRA bias (rare): left out, counted as unmatched below
                modules.setdefault(module, {})[part] = tensor
                break
        else:
            stray += 1
    pairs = {}
    for module, parts in modules.items():
        if "down" not in parts or "up" not in parts:
            stray += len(parts)
            continue
        d, u = parts["down"], parts["up"]
        if d.ndim != 2 or u.ndim != 2:
            raise InputError(f"The LoRA layer {module} is not a pair of matrices (shapes {tuple(d.shape)} and "
                             f"{tuple(u.shape)}); only LoRAs of linear layers can be used.")
        stray += sum(1 for p in parts if p.endswith("_bias"))
        # kohya: the update is (alpha / rank) * up @ down
        pairs[module] = (d, u, float(parts["alpha"]) / d.shape[0] if "alpha" in parts else 1.0)
    return pairs, stray


def _kohya_names(model_linears: dict[str, tuple[int, int]], config: dict) -> dict[str, str]:
    """Flat kohya name -> dotted name, for both the transformer's own names and the original ones."""
    names = {f"lora_unet_{name.replace('.', '_')}": name for name in model_linears}
    for i in range(config.get("num_layers", 0)):
        for layer in _ORIGINAL_DOUBLE:
            names[f"lora_unet_double_blocks_{i}_{layer.replace('.', '_')}"] = f"double_blocks.{i}.{layer}"
    for i in range(config.get("num_single_layers", 0)):
        for layer in _ORIGINAL_SINGLE:
            names[f"lora_unet_single_blocks_{i}_{layer.replace('.', '_')}"] = f"single_blocks.{i}.{layer}"
    return names


def _from_original(pairs: dict, hidden: int) -> dict:
    """Original names -> the transformer's, through diffusers' converter (fused q/k/v split there).

    One original layer at a time, so each part keeps its layer's scale. diffusers splits single-block
    ``linear1`` at 3 x 3072 (the 13B width); we split it at the width of this transformer first and name
    the parts as the converter would.
    """
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    out = {}
    for module, (down, up, scale) in pairs.items():
        flat = {}
        if module.startswith("single_blocks.") and module.endswith(".linear1"):
            block = module[: -len(".linear1")]
            q, k, v, mlp = torch.split(up, (hidden, hidden, hidden, up.shape[0] - 3 * hidden), dim=0)
            for target, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
                flat[f"{block}.{target}.lora_A.weight"] = down
                flat[f"{block}.{target}.lora_B.weight"] = part
        else:
            flat[f"{module}.lora_A.weight"] = down
            flat[f"{module}.lora_B.weight"] = up
        converted = _convert_hunyuan_video_lora_to_diffusers({f"diffusion_model.{k}": v for k, v in flat.items()})
        for name, (d, u, _) in _pairs({_strip(k): v for k, v in converted.items()}, "lora_A", "lora_B")[0].items():
            out[name] = (d, u, scale)
    return out


def convert(tensors: dict[str, torch.Tensor], model_linears: dict[str, tuple[int, int]], config: dict
            ) -> tuple[str | None, dict, int]:
    """(format, {module: (down, up, scale)} in the transformer's names, count of keys left out)."""
    unsupported = sorted({m for k in tensors for m in _UNSUPPORTED if m in k})
    if unsupported:
        raise InputError(f"This file is a {unsupported[0].strip('_.')} adapter, not a plain LoRA; only plain "
                         f"LoRA files (down/up or A/B matrices) can be used.")
    fmt = detect_format(tensors)
    hidden = config.get("num_attention_heads", 24) * config.get("attention_head_dim", 128)
    if fmt == "kohya":
        names = _kohya_names(model_linears, config)
        raw, stray = _pairs(tensors, "lora_down", "lora_up")
        unknown = {m for m in raw if m not in names}
        dotted = {names[m]: pair for m, pair in raw.items() if m not in unknown}
        original = {m: p for m, p in dotted.items() if m.startswith(("double_blocks.", "single_blocks."))}
        pairs = {m: p for m, p in dotted.items() if m not in original}
        pairs.update(_from_original(original, hidden) if original else {})
        return fmt, pairs, stray + sum(1 for k in tensors if k.split(".")[0] in unknown)
    if fmt == "original":
        raw, stray = _pairs({_strip(k): v for k, v in tensors.items()}, "lora_A", "lora_B")
        return fmt, _from_original(raw, hidden), stray
    if fmt == "diffusers":
        pairs, stray = _pairs({_strip(k): v for k, v in tensors.items()}, "lora_A", "lora_B")
        return fmt, pairs, stray
    return None, {}, len(tensors)


# ---- the transformer's side


@functools.lru_cache(maxsize=4)
def _linears_of_config(config_json: str) -> dict[str, tuple[int, int]]:
    from .casting import build_meta_model

    model = build_meta_model(json.loads(config_json))
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def transformer_linears(config: dict) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of every Linear, from a meta model (no weights)."""
    return _linears_of_config(json.dumps(config, sort_keys=True))


def load_lora(path: Path, weight: float, config: dict, sha256: str | None = None) -> LoadedLora:
    """Read, convert and check one LoRA against the transformer of ``config``; InputError if it cannot fit."""
    path = Path(path)
    tensors = read_lora_file(path)
    linears = transformer_linears(config)
    fmt, pairs, stray = convert(tensors, linears, config)
    matched = {m: p for m, p in pairs.items() if m in linears}
    unmatched = stray + 2 * (len(pairs) - len(matched))
    total = len(tensors)
    if not matched:
        raise InputError(f"{path.name} matches none of this transformer's layers (0 of its {total} keys "
                         f"matched); it is probably a LoRA for another model (Wan, Flux, SDXL...): choose a "
                         f"HunyuanVideo or FramePack LoRA.")
    for module, (down, up, _) in matched.items():
        in_features, out_features = linears[module]
        if down.shape[1] != in_features or up.shape[0] != out_features or up.shape[1] != down.shape[0]:
            raise InputError(f"{path.name} does not fit this transformer: its layer {module} is "
                             f"{up.shape[0]}x{down.shape[1]} (rank {down.shape[0]}) where the transformer has "
                             f"{out_features}x{in_features}; it was made for a different HunyuanVideo size.")
    lora = LoadedLora(path, sha256 or sha256_of(path), float(weight), fmt or "unknown", matched, unmatched)
    if unmatched:
        lora.notes.append(f"{unmatched} of the {total} keys of {path.name} match no layer of this transformer "
                          f"and are left out.")
    logger.info("LoRA %s: %s layout, %d layers, rank %d, weight %g%s", path.name, lora.format, len(matched),
                lora.rank, weight, f", {unmatched} keys left out" if unmatched else "")
    return lora


def adapter_bytes(loras: list[LoadedLora], dtype_bytes: int) -> tuple[int, int]:
    """(bytes of all active factors in the compute dtype, bytes of the largest layer's) - for the plan."""
    per_layer: dict[str, int] = {}
    for lora in loras:
        if lora.weight == 0:
            continue  # a weight of 0 attaches nothing
        for module, (down, up, _) in lora.factors.items():
            per_layer[module] = per_layer.get(module, 0) + (down.numel() + up.numel()) * dtype_bytes
    return sum(per_layer.values()), max(per_layer.values(), default=0)
