"""The "disk" storage: a converted fp8 copy of the checkpoint in ``models/.cache``, memory-mapped.

Written once, streaming and atomically (temp folder + rename); reused while the source's fingerprint
matches; mapped copy-on-write so the pages stay file-backed and droppable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import time
import uuid
from pathlib import Path

import torch

from ..errors import ModelFolderError
from ..files import pid_alive
from .casting import FP8_DTYPE, build_meta_model, fp8_skip_patterns, prepare_meta
from .checkpoint import (
    assign_tensor, damaged_error, match_sources, meta_targets, names_by_file, open_shard, source_tensors, weight_files,
)
from .safetensors_io import BadSafetensorsFile, TensorEntry, read_safetensors_header, write_safetensors_streaming

logger = logging.getLogger(__name__)

# Bump when the layout of the fp8 disk copy changes, so old copies are not reused.
CACHE_FORMAT = 1
_CACHE_INFO = "framepack-fp8-cache.json"
_FINGERPRINT_BYTES = 1 << 20


def _fingerprint(folder: Path, compute_dtype: torch.dtype, files: list[Path]) -> str:
    """Short hash of what the fp8 copy depends on: config, weight files (name, size, first MiB), rule.

    A full hash of 26 GB would take minutes; size plus the first MiB (header + first weights) tells
    re-downloads and different checkpoints apart, like model_folder.model_identity does.
    """
    digest = hashlib.sha256()
    digest.update(f"format={CACHE_FORMAT};compute={compute_dtype};fp8={FP8_DTYPE};".encode())
    digest.update(repr(fp8_skip_patterns()).encode())
    try:
        digest.update((folder / "config.json").read_bytes())
        for path in files:
            digest.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
            with path.open("rb") as handle:
                digest.update(handle.read(_FINGERPRINT_BYTES))
    except OSError as exc:
        raise damaged_error(folder, "config.json") from exc
    return digest.hexdigest()[:12]


def fp8_cache_dir(folder: Path, compute_dtype: torch.dtype, cache_dir: Path | None = None) -> Path:
    """Where the "disk" storage keeps (or will keep) the fp8 copy of ``folder``."""
    folder = Path(folder)
    root = Path(cache_dir) if cache_dir is not None else folder.parent / ".cache"
    return root / f"{folder.name}-{_fingerprint(folder, compute_dtype, weight_files(folder))}-fp8"


class _StaleCache(Exception):
    pass


def _check_cache(cache: Path, targets: dict[str, torch.Tensor]) -> dict[Path, dict[str, TensorEntry]]:
    try:
        info = json.loads((cache / _CACHE_INFO).read_text(encoding="utf-8"))
        if info.get("format") != CACHE_FORMAT:
            raise _StaleCache(f"format {info.get('format')}")
        files = {cache / name: read_safetensors_header(cache / name) for name in info["files"]}
    except (OSError, ValueError, KeyError, TypeError, BadSafetensorsFile) as exc:
        raise _StaleCache(str(exc)) from exc
    seen: set[str] = set()
    for entries in files.values():
        for name, entry in entries.items():
            target = targets.get(name)
            if target is not None and (entry.dtype != target.dtype or entry.shape != tuple(target.shape)):
                raise _StaleCache(f"{name} is {entry.dtype} {entry.shape}, expected {target.dtype} {tuple(target.shape)}")
            seen.add(name)
    if set(targets) - seen:
        raise _StaleCache(f"{len(set(targets) - seen)} tensors missing")
    return files


def _remove_dead_temps(cache: Path) -> None:
    """Delete temp folders of conversions whose process died (a crash must not leak 17 GB)."""
    for tmp in cache.parent.glob(f".tmp-{cache.name}-*"):
        try:
            pid = int(tmp.name[len(f".tmp-{cache.name}-"):].split("-")[0])
        except ValueError:
            continue
        if not pid_alive(pid):
            logger.info("Removing the unfinished fp8 copy %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_fp8_cache(folder: Path, compute_dtype: torch.dtype, cache_dir: Path | None = None, *,
                     _sources: dict | None = None, _targets: dict | None = None) -> Path:
    """Return the fp8 copy's folder, writing it first if needed (streaming, atomic: temp dir + rename).

    fp8 for the layers layerwise casting casts, the compute dtype for everything else, one file per
    source shard with the same name; tensors are converted one at a time, never the whole model in RAM.
    """
    folder = Path(folder)
    sources = _sources if _sources is not None else source_tensors(folder)
    if _targets is None:
        meta = build_meta_model(folder)
        prepare_meta(meta, "disk", compute_dtype)
        _targets = meta_targets(meta)
        match_sources(folder, _targets, sources)
    targets = _targets
    cache = fp8_cache_dir(folder, compute_dtype, cache_dir)
    if cache.is_dir():
        try:
            _check_cache(cache, targets)
            logger.info("Reusing the fp8 copy %s", cache)
            return cache
        except _StaleCache as exc:
            logger.warning("The fp8 copy %s is unusable (%s); writing it again", cache, exc)
            shutil.rmtree(cache, ignore_errors=True)

    cache.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(cache)
    needed = sum(t.numel() * t.dtype.itemsize for t in targets.values())
    free = shutil.disk_usage(cache.parent).free
    if free < needed + (512 << 20):
        raise ModelFolderError(
            f"The fp8 copy of {folder.name} needs about {needed / 1e9:.1f} GB on disk but {cache.parent} "
            f"has {free / 1e9:.1f} GB free; free some space or choose the fp8 storage."
        )
    started = time.perf_counter()
    tmp = cache.parent / f".tmp-{cache.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    logger.info("Writing the fp8 copy of %s to %s (about %.1f GB)", folder, cache, needed / 1e9)
    try:
        grouped = names_by_file(targets, sources)
        for path, names in grouped.items():
            specs = [(n, targets[n].dtype, tuple(targets[n].shape)) for n in names]
            with open_shard(folder, path) as shard:
                write_safetensors_streaming(
                    tmp / path.name, specs, lambda n, sh=shard: sh.converted(n, targets[n].dtype),
                    metadata={"format": "pt", "framepack_fp8_from": path.name},
                )
        info = {"format": CACHE_FORMAT, "source": str(folder), "compute_dtype": str(compute_dtype),
                "files": [p.name for p in grouped], "created": time.time()}
        (tmp / _CACHE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, cache)
        except OSError:
            if not cache.is_dir():
                raise
            logger.info("Another process wrote %s first; using it", cache)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Wrote the fp8 copy %s in %.1f s", cache, time.perf_counter() - started)
    _check_cache(cache, targets)
    return cache


def map_fp8_cache(model, cache: Path, targets: dict[str, torch.Tensor]) -> None:
    """Point every parameter at its bytes in the fp8 copy through a memory map.

    ACCESS_COPY (MAP_PRIVATE) pages stay file-backed and droppable as long as nobody writes them (the
    casting hooks never do; they upcast into fresh tensors), and the map is writable, so
    torch.frombuffer needs no read-only workaround. A stray in-place write would copy just that page
    privately and never reach the file.
    """
    try:
        files = _check_cache(cache, targets)
    except _StaleCache as exc:  # changed since ensure_fp8_cache checked it (another process?)
        raise ModelFolderError(
            f"The fp8 copy {cache} changed while loading ({exc}); delete that folder and load again."
        ) from exc
    for path, entries in files.items():
        with path.open("rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        for name, entry in entries.items():
            if name not in targets:
                continue  # padding
            if entry.numel == 0:
                tensor = torch.empty(entry.shape, dtype=entry.dtype)
            else:  # torch.frombuffer keeps `mapped` alive for as long as the tensor lives
                tensor = torch.frombuffer(mapped, dtype=entry.dtype, count=entry.numel, offset=entry.start)
                tensor = tensor.view(entry.shape)
            assign_tensor(model, name, tensor)
        del mapped
