"""Find, check and load a model folder (the real weights or the tiny random ones).

A model folder holds one subfolder per part (DESIGN.md section 2), each loadable by its class's
`from_pretrained`. The real weights come from the hub repositories named in `PARTS`; the tiny
folder from `framepack_local.weights.tiny` has the same layout, so tests exercise this exact code.
Nothing here runs at import: torch, transformers and diffusers are imported inside functions.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFolderError

logger = logging.getLogger(__name__)

HUNYUAN_REPO = "hunyuanvideo-community/HunyuanVideo"
REDUX_REPO = "lllyasviel/flux_redux_bfl"
INVERTED_REPO = "lllyasviel/FramePackI2V_HY"
FORWARD_REPO = "lllyasviel/FramePack_F1_I2V_HY_20250503"

DOWNLOAD_COMMAND = "python -m framepack_local download --models {root}"
TINY_COMMAND = "python -m framepack_local make-tiny-model {root}"

# HunyuanVideo's prompt template for its LLaMA text encoder (what the checkpoints were trained with);
# the system preamble is cropped off after encoding so only the user's words (and the closing tag)
# condition the video.
PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)

# The published transformer config of both FramePack checkpoints (diffusers format): 13B parameters,
# 20 dual-stream + 40 single-stream blocks. Lets the memory plan be made before anything is downloaded.
FRAMEPACK_TRANSFORMER_CONFIG = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
    rope_axes_dim=[16, 56, 56], image_condition_type=None, has_image_proj=True, image_proj_dim=1152,
    has_clean_x_embedder=True,
)

# Sampling mode -> the transformer part it needs (DESIGN.md section 3: inverted anti-drift uses
# FramePackI2V_HY, forward uses the F1 checkpoint).
MODE_PARTS: dict[str, str] = {"inverted": "transformer", "forward": "transformer_f1"}


@dataclass(frozen=True)
class PartSpec:
    subfolder: str  # in our model folder
    class_path: str  # "package.Class" whose from_pretrained loads it
    repo_id: str  # hub repository of the real weights
    repo_subfolder: str | None  # folder inside that repository; None = repository root
    approx_bytes: int  # approximate size of the real files, for messages and disk checks
    kind: str  # "model" | "tokenizer" | "processor"


# Approximate real sizes are the bf16/fp16 safetensors as published (DESIGN.md section 4).
PARTS: dict[str, PartSpec] = {
    "text_encoder": PartSpec("text_encoder", "transformers.LlamaModel", HUNYUAN_REPO, "text_encoder", 15_000_000_000, "model"),
    # The real tokenizer is Llama-3 byte-level BPE. transformers 5's `LlamaTokenizer(Fast)` rebuilds
    # any tokenizer.json as SentencePiece-style Metaspace and mangles such vocabularies, while
    # AutoTokenizer detects the byte-level file and keeps its pipeline.
    "tokenizer": PartSpec("tokenizer", "transformers.AutoTokenizer", HUNYUAN_REPO, "tokenizer", 9_100_000, "tokenizer"),
    "text_encoder_2": PartSpec("text_encoder_2", "transformers.CLIPTextModel", HUNYUAN_REPO, "text_encoder_2", 246_000_000, "model"),
    "tokenizer_2": PartSpec("tokenizer_2", "transformers.CLIPTokenizer", HUNYUAN_REPO, "tokenizer_2", 3_600_000, "tokenizer"),
    "vae": PartSpec("vae", "diffusers.AutoencoderKLHunyuanVideo", HUNYUAN_REPO, "vae", 493_000_000, "model"),
    "image_encoder": PartSpec("image_encoder", "transformers.SiglipVisionModel", REDUX_REPO, "image_encoder", 857_000_000, "model"),
    "feature_extractor": PartSpec("feature_extractor", "transformers.SiglipImageProcessor", REDUX_REPO, "feature_extractor", 1_000, "processor"),
    "transformer": PartSpec("transformer", "diffusers.HunyuanVideoFramepackTransformer3DModel", INVERTED_REPO, None, 25_700_000_000, "model"),
    "transformer_f1": PartSpec("transformer_f1", "diffusers.HunyuanVideoFramepackTransformer3DModel", FORWARD_REPO, None, 25_700_000_000, "model"),
}

SHARED_PARTS: tuple[str, ...] = (
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "vae",
    "image_encoder",
    "feature_extractor",
)

# Single-file weight names written by transformers and diffusers respectively.
_WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
_TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))


def parts_for_modes(modes: Iterable[str]) -> list[str]:
    """Part names needed for the given sampling modes, shared parts first, in a stable order."""
    modes = list(modes)
    for mode in modes:
        if mode not in MODE_PARTS:
            raise ValueError(f"Unknown sampling mode {mode!r}; expected one of {sorted(MODE_PARTS)}")
    names = list(SHARED_PARTS)
    for mode in ("inverted", "forward"):
        if mode in modes:
            names.append(MODE_PARTS[mode])
    return names


def _nonempty_file(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _weights_present(folder: Path) -> bool:
    if any(_nonempty_file(folder / name) for name in _WEIGHT_FILES):
        return True
    for index_path in folder.glob("*.safetensors.index.json"):
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            shards = set(weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False  # an unreadable index means the download did not finish
        return bool(shards) and all(_nonempty_file(folder / shard) for shard in shards)
    return False


def part_present(root: Path, name: str) -> bool:
    """True when the part's folder holds its config and all of its weight / tokenizer files."""
    spec = PARTS[name]
    folder = Path(root) / spec.subfolder
    if spec.kind == "model":
        return _nonempty_file(folder / "config.json") and _weights_present(folder)
    if spec.kind == "tokenizer":
        return _nonempty_file(folder / "tokenizer_config.json") and any(
            all(_nonempty_file(folder / f) for f in files) for files in _TOKENIZER_FILE_SETS
        )
    return _nonempty_file(folder / "preprocessor_config.json")


def missing_parts(root: Path, mode: str) -> list[str]:
    """Names of the parts that mode `mode` ("inverted" or "forward") needs and `root` lacks."""
    return [name for name in parts_for_modes([mode]) if not part_present(Path(root), name)]


def download_command(root: Path, names: Iterable[str] = ()) -> str:
    """The command that fetches `names` into `root` (the CLI downloads the inverted variant by default)."""
    command = DOWNLOAD_COMMAND.format(root=root)
    return command + " --variant forward" if "transformer_f1" in set(names) else command


def _format_size(num_bytes: int) -> str:
    if num_bytes >= 100_000_000:
        return f"{num_bytes / 1e9:.1f} GB"
    return f"{max(1, round(num_bytes / 1e6))} MB"


def siglip_image_processor_class():
    """SiglipImageProcessor, or its PIL twin when torchvision is absent (same saved config, no warning)."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import SiglipImageProcessor

        return SiglipImageProcessor
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil


def check_model_folder(root: Path, mode: str) -> None:
    """Raise ModelFolderError (one sentence with the fix) when `root` cannot serve `mode`."""
    root = Path(root)
    missing = missing_parts(root, mode)
    if not missing:
        return
    size = _format_size(sum(PARTS[name].approx_bytes for name in missing))
    fix = (
        f"run `{download_command(root, missing)}` to download {'it' if len(missing) == 1 else 'them'} "
        f"(about {size}), "
        f"or `{TINY_COMMAND.format(root=root)}` to try the app without the real weights."
    )
    if not root.is_dir():
        raise ModelFolderError(f"The model folder {root} does not exist; {fix}")
    raise ModelFolderError(
        f"The model folder {root} is missing {', '.join(missing)} (needed for {mode} sampling); {fix}"
    )


@dataclass
class LoadedModels:
    text_encoder: Any
    tokenizer: Any
    text_encoder_2: Any
    tokenizer_2: Any
    vae: Any
    image_encoder: Any
    feature_extractor: Any
    transformers: dict[str, Any] = field(default_factory=dict)  # "inverted" / "forward" -> model


def default_dtype(device: Any):
    """bfloat16 on CUDA (the checkpoints' own precision), float32 elsewhere (CPU bf16 is slow)."""
    import torch

    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _import_class(class_path: str):
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def _damaged(name: str, root: Path) -> ModelFolderError:
    return ModelFolderError(
        f"The model file {name} in {root} is damaged or incomplete; "
        f"run `{download_command(root, [name])}` again."
    )


def _load_part_unchecked(root: Path, name: str, device: Any, dtype: Any):
    spec = PARTS[name]
    path = root / spec.subfolder
    if spec.kind == "tokenizer":
        tokenizer = _import_class(spec.class_path).from_pretrained(path, local_files_only=True)
        # transformers 5 pads Llama on the left; the packed transformer expects the prompt at the
        # start of the sequence (DESIGN.md section 2), so force right padding for every tokenizer.
        tokenizer.padding_side = "right"
        return tokenizer
    if spec.kind == "processor":
        return siglip_image_processor_class().from_pretrained(path, local_files_only=True)

    model_class = _import_class(spec.class_path)
    # safetensors only: never unpickle weights (DESIGN.md section 5).
    model = model_class.from_pretrained(path, local_files_only=True, use_safetensors=True, dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    return model.to(device)


def load_part(root: Path, name: str, device: Any = "cpu", dtype: Any = None):
    """Load one part (e.g. only the VAE for a decode stage); broken files become ModelFolderError."""
    import torch

    root = Path(root)
    if name not in PARTS:
        raise ValueError(f"Unknown model part {name!r}; expected one of {sorted(PARTS)}")
    if not part_present(root, name):
        size = _format_size(PARTS[name].approx_bytes)
        raise ModelFolderError(
            f"The model folder {root} is missing {name}; run `{download_command(root, [name])}` "
            f"to download it (about {size}), or `{TINY_COMMAND.format(root=root)}` to try the app without the real weights."
        )
    if dtype is None:
        dtype = default_dtype(device)
    try:
        return _load_part_unchecked(root, name, device, dtype)
    except (MemoryError, torch.OutOfMemoryError):
        raise  # running out of memory says nothing about the files
    except Exception as exc:  # any library error here means an unusable file on disk
        logger.warning("Loading %s from %s failed: %s: %s", name, root, type(exc).__name__, exc)
        raise _damaged(name, root) from exc


def load_models(root: Path, modes: Iterable[str], device: Any = "cpu", dtype: Any = None) -> LoadedModels:
    """Load every part needed for `modes` ("inverted" and/or "forward") from `root`."""
    root = Path(root)
    modes = list(dict.fromkeys(modes))
    if not modes:
        raise ValueError("load_models needs at least one sampling mode")
    for mode in modes:
        check_model_folder(root, mode)
    loaded = {name: load_part(root, name, device, dtype) for name in parts_for_modes(modes)}
    return LoadedModels(
        **{name: loaded[name] for name in SHARED_PARTS},
        transformers={mode: loaded[MODE_PARTS[mode]] for mode in modes},
    )


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


_FINGERPRINT_BYTES = 1 << 20


def _weights_fingerprint(folder: Path) -> str | None:
    """Short hash over every weight file's name, size and first MiB.

    A full hash of 26 GB would take minutes; the first MiB past the small safetensors header already
    holds weight values, so it tells checkpoints with identical configs (inverted vs F1) apart.
    """
    digest = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    for path in files:
        digest.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with path.open("rb") as handle:
            digest.update(handle.read(_FINGERPRINT_BYTES))
    return digest.hexdigest()[:12]


def model_identity(root: Path) -> dict:
    """What a job records about its weights: source.json plus each part's config origin and hash."""
    root = Path(root)
    identity: dict[str, Any] = {"root": str(root)}
    source_path = root / "source.json"
    if source_path.is_file():
        try:
            identity["source"] = json.loads(source_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            identity["source"] = None
    parts: dict[str, Any] = {}
    config_names = {"model": "config.json", "tokenizer": "tokenizer_config.json", "processor": "preprocessor_config.json"}
    for name, spec in PARTS.items():
        config_path = root / spec.subfolder / config_names[spec.kind]
        if not config_path.is_file():
            continue
        raw = config_path.read_bytes()
        try:
            config = json.loads(raw)
        except ValueError:
            config = {}
        entry = {
            "name_or_path": config.get("_name_or_path") if isinstance(config, dict) else None,
            "config_sha256": _short_hash(raw),
        }
        if spec.kind == "model":
            try:
                entry["weights_fingerprint"] = _weights_fingerprint(root / spec.subfolder)
            except OSError:
                entry["weights_fingerprint"] = None
        parts[name] = entry
    identity["parts"] = parts
    return identity
