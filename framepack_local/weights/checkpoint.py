"""Reading a transformer checkpoint folder tensor by tensor into a model built on ``meta``.

Each tensor is read from its shard and converted to its storage dtype right away, so RAM never holds
the checkpoint in a dtype it will not keep. Broken or missing files become one ModelFolderError.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFolderError
from .safetensors_io import ALIGN, BadSafetensorsFile, TensorEntry, read_safetensors_header

logger = logging.getLogger(__name__)

SINGLE_FILE = "diffusion_pytorch_model.safetensors"


def owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in its own, freshly allocated (64-byte aligned) anonymous memory.

    safetensors hands out zero-copy views of its file map when no cast is needed; "fp8" promises the
    weights in RAM, independent of the checkpoint files, and aligned like the "disk" copy's (CPU
    kernels pick code paths by alignment, so equal alignment is what makes the two bit-identical).
    """
    if tensor.untyped_storage().resizable() and tensor.data_ptr() % ALIGN == 0:
        return tensor  # already a fresh allocation (the result of a cast)
    return tensor.clone(memory_format=torch.contiguous_format)


def damaged_error(folder: Path, file_name: str) -> ModelFolderError:
    from .model_folder import download_command

    return ModelFolderError(
        f"The model file {file_name} in {folder} is damaged or incomplete; "
        f"run `{download_command(folder.parent, [folder.name])}` again."
    )


def weight_files(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise damaged_error(folder, indexes[0].name) from exc
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        from .model_folder import download_command

        raise ModelFolderError(
            f"The model folder {folder} has no safetensors weights; "
            f"run `{download_command(folder.parent, [folder.name])}` to download them."
        )
    return files


def source_tensors(folder: Path) -> dict[str, tuple[Path, TensorEntry]]:
    """Every tensor of the checkpoint -> (its shard, its entry), with each shard's size checked."""
    sources: dict[str, tuple[Path, TensorEntry]] = {}
    for path in weight_files(folder):
        if not path.is_file():
            raise damaged_error(folder, path.name)
        try:
            entries = read_safetensors_header(path)
        except BadSafetensorsFile as exc:
            logger.warning("Bad weight file: %s", exc)
            raise damaged_error(folder, path.name) from exc
        for name, entry in entries.items():
            sources[name] = (path, entry)
    return sources


def meta_targets(model) -> dict[str, torch.Tensor]:
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    return targets


def assign_tensor(model, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise KeyError(name)


def match_sources(folder: Path, targets: dict[str, torch.Tensor],
                   sources: dict[str, tuple[Path, TensorEntry]]) -> None:
    missing = sorted(set(targets) - set(sources))
    if missing:
        logger.warning("%s lacks %d tensors, e.g. %s", folder, len(missing), missing[:3])
        from .model_folder import download_command

        raise ModelFolderError(
            f"The model folder {folder} lacks {len(missing)} of the transformer's weights "
            f"(e.g. {missing[0]}); run `{download_command(folder.parent, [folder.name])}` again."
        )
    unexpected = sorted(set(sources) - set(targets))
    if unexpected:
        logger.warning("%s has %d tensors the model does not use, e.g. %s", folder, len(unexpected), unexpected[:3])
    for name, target in targets.items():
        path, entry = sources[name]
        if entry.shape != tuple(target.shape):
            raise ModelFolderError(
                f"The weight {name} in {path} has shape {entry.shape} but config.json asks for "
                f"{tuple(target.shape)}; the folder mixes files of different models, download it again."
            )


def names_by_file(names: Iterable[str], sources: dict[str, tuple[Path, TensorEntry]]) -> dict[Path, list[str]]:
    """Names grouped by shard, each in file order (sequential reads)."""
    grouped: dict[Path, list[str]] = {}
    for name in names:
        grouped.setdefault(sources[name][0], []).append(name)
    for path in grouped:
        grouped[path].sort(key=lambda n: sources[n][1].start)
    return dict(sorted(grouped.items()))


def _bad_read(folder: Path, path: Path, exc: Exception) -> ModelFolderError:
    logger.warning("Reading %s failed: %s: %s", path, type(exc).__name__, exc)
    return damaged_error(folder, path.name)


@contextmanager
def open_shard(folder: Path, path: Path):
    """safe_open(path); only errors of opening/reading the shard become ModelFolderError."""
    from safetensors import SafetensorError, safe_open

    try:
        context = safe_open(str(path), framework="pt", device="cpu")
        handle = context.__enter__()
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise _bad_read(folder, path, exc) from exc
    try:
        yield _Shard(folder, path, handle)
    finally:
        context.__exit__(None, None, None)


@dataclass
class _Shard:
    folder: Path
    path: Path
    handle: Any

    def converted(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            tensor = self.handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise _bad_read(self.folder, self.path, exc) from exc
        # safetensors hands out a view of its file map (or, in older versions, a copy of this one
        # tensor); casting right away means RAM only ever holds the converted tensor.
        return tensor if tensor.dtype == dtype else tensor.to(dtype)


def read_converted(folder: Path, sources: dict[str, tuple[Path, TensorEntry]],
                    targets: dict[str, torch.Tensor]) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield (name, tensor in its storage dtype), reading and converting one tensor at a time."""
    for path, names in names_by_file(targets, sources).items():
        with open_shard(folder, path) as shard:
            for name in names:
                yield name, shard.converted(name, targets[name].dtype)


def finish_loading(model):
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not leftovers, f"tensors left on the meta device: {leftovers[:5]}"
    model.requires_grad_(False)
    model.eval()
    return model
