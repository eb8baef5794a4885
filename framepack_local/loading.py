"""Load the FramePack transformer in a chosen weight storage, and stream it block by block.

The memory plan (DESIGN.md section 4) picks one storage by name:

- ``"bf16"``: every weight in the compute dtype (bf16 on a GPU; the CPU tests use float32), lossless,
  and exactly the tensors diffusers' ``from_pretrained`` gives: where no cast is needed safetensors
  hands out zero-copy views of its memory map of the shard (file pages), otherwise RAM copies.
- ``"fp8"``: the layers diffusers' layerwise casting casts are stored as float8_e4m3fn and upcast one
  layer at a time at compute time (diffusers' casting hook, minus its re-cast after each layer);
  norms, embedders and AdaLN modulation stay in the compute dtype.
  All of it in anonymous RAM: about 16.6 GB instead of 25.7 GB for the 13B checkpoint.
- ``"disk"``: the same fp8 numbers, but memory-mapped from a converted copy on disk instead of held in
  anonymous RAM, so the OS can drop and re-read the pages under memory pressure (16 GB laptops).

All three build the model on the ``meta`` device and fill it tensor by tensor straight from the
safetensors shards, converting each tensor while reading: RAM never holds the bf16 checkpoint when
the storage is fp8. ``apply_streaming`` then moves blocks to the GPU one at a time with diffusers'
group offloading. Nothing here runs at import; diffusers is imported inside functions.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelFolderError

logger = logging.getLogger(__name__)

STORAGES = ("bf16", "fp8", "disk")
FP8_DTYPE = torch.float8_e4m3fn
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # execution order in forward()

# Bump when the layout of the fp8 disk copy changes, so old copies are not reused.
CACHE_FORMAT = 1
_CACHE_INFO = "framepack-fp8-cache.json"
_SINGLE_FILE = "diffusion_pytorch_model.safetensors"
_FINGERPRINT_BYTES = 1 << 20
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit; a larger length field means a broken file
_ALIGN = 64  # torch's CPU allocator alignment; tensors in the files we write start this aligned

_ST_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# Memory measurement (tests and benchmarks)
# ---------------------------------------------------------------------------------------------


def anon_rss_bytes() -> int:
    """Anonymous resident memory of this process (RssAnon): heap and tensors, not mapped files.

    File-backed pages (a memory-mapped checkpoint, the page cache) are not counted: the OS can drop
    them, which is exactly the difference between the "fp8" and "disk" storages.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # not Linux: total RSS is the closest portable number

    return psutil.Process().memory_info().rss


def rss_bytes() -> int:
    """Total resident memory of this process (anonymous + file-backed pages)."""
    import psutil

    return psutil.Process().memory_info().rss


class PeakSampler:
    """Context manager sampling ``anon_rss_bytes`` in a thread every ``interval`` seconds.

    ``baseline`` is the value on entry, ``peak`` the largest sample (entry and exit included),
    ``growth`` their difference; ``peak_rss`` is the largest total RSS (mapped files included),
    sampled alongside when ``total`` is true.
    """

    def __init__(self, interval: float = 0.05, reader: Callable[[], int] = anon_rss_bytes, total: bool = False) -> None:
        self.interval = interval
        self.reader = reader
        self.total = total
        self.baseline = 0
        self.peak = 0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def _sample(self) -> None:
        self.peak = max(self.peak, self.reader())
        if self.total:
            self.peak_rss = max(self.peak_rss, rss_bytes())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakSampler:
        self.baseline = self.peak = self.reader()
        self.peak_rss = rss_bytes() if self.total else 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="PeakSampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


# ---------------------------------------------------------------------------------------------
# safetensors files: header parsing and a streaming writer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; ``start``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _BadFile(Exception):
    """A safetensors file that is truncated or does not parse (turned into ModelFolderError)."""


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) and check the file is whole."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            raw_length = handle.read(8)
            if len(raw_length) < 8:
                raise _BadFile(f"{path.name}: shorter than a safetensors header")
            (length,) = struct.unpack("<Q", raw_length)
            if length > _MAX_HEADER_BYTES or 8 + length > size:
                raise _BadFile(f"{path.name}: header length {length} does not fit the file size {size}")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise _BadFile(f"{path.name}: {exc}") from exc
    if not isinstance(header, dict):
        raise _BadFile(f"{path.name}: the header is not a JSON object")
    data_start = 8 + length
    entries: dict[str, TensorEntry] = {}
    try:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            nbytes = math.prod(shape) * dtype.itemsize
            if begin < 0 or end - begin != nbytes:
                raise _BadFile(f"{path.name}: tensor {name} has offsets {begin}..{end} for {nbytes} bytes")
            if data_start + end > size:
                raise _BadFile(f"{path.name}: tensor {name} ends at byte {data_start + end} of {size} (truncated)")
            entries[name] = TensorEntry(name, dtype, shape, data_start + begin, data_start + end)
    except (KeyError, TypeError, ValueError) as exc:
        raise _BadFile(f"{path.name}: malformed header entry ({exc})") from exc
    return entries


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    # numpy has no bf16/fp8, but every tensor can be viewed as raw bytes first.
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def write_safetensors_streaming(
    path: Path,
    specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
    align: int = _ALIGN,
) -> int:
    """Write a valid safetensors file holding one tensor in RAM at a time; returns the file size.

    ``specs`` lists (name, dtype, shape) up front because the header comes first; ``produce(name)``
    is then called once per tensor in file order. Every tensor starts ``align``-byte aligned in the
    file (safetensors allows no holes, so the gaps are named zero-filled ``__pad__*`` U8 tensors):
    memory-mapped weights then sit exactly as aligned as freshly allocated ones (64 bytes), and
    CPU kernels take the same code path, i.e. give bit-identical results.
    """
    order = sorted(specs, key=lambda spec: (-spec[1].itemsize, spec[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    layout: list[tuple[str, int]] = []  # (tensor name or "", pad bytes) in file order
    offset = 0
    for name, dtype, shape in order:
        nbytes = math.prod(shape) * dtype.itemsize
        pad = (-offset) % align
        if pad:
            pad_name = f"__pad__{len(layout)}"
            header[pad_name] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            layout.append(("", pad))
            offset += pad
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        layout.append((name, nbytes))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-(8 + len(raw))) % align)  # spaces are valid JSON padding; data starts aligned
    specs_by_name = {name: (dtype, tuple(shape)) for name, dtype, shape in order}
    with Path(path).open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for name, nbytes in layout:
            if not name:
                handle.write(bytes(nbytes))
                continue
            tensor = produce(name)
            dtype, shape = specs_by_name[name]
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise ValueError(f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}")
            handle.write(_tensor_bytes(tensor))
            del tensor
        handle.flush()
        os.fsync(handle.fileno())
    return 8 + len(raw) + offset


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in its own, freshly allocated (64-byte aligned) anonymous memory.

    safetensors hands out zero-copy views of its file map when no cast is needed; "fp8" promises the
    weights in RAM, independent of the checkpoint files, and aligned like the "disk" copy's (CPU
    kernels pick code paths by alignment, so equal alignment is what makes the two bit-identical).
    """
    if tensor.untyped_storage().resizable() and tensor.data_ptr() % _ALIGN == 0:
        return tensor  # already a fresh allocation (the result of a cast)
    return tensor.clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# The model folder
# ---------------------------------------------------------------------------------------------


def _damaged(folder: Path, file_name: str) -> ModelFolderError:
    from .models import download_command

    return ModelFolderError(
        f"The model file {file_name} in {folder} is damaged or incomplete; "
        f"run `{download_command(folder.parent, [folder.name])}` again."
    )


def _weight_files(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _damaged(folder, indexes[0].name) from exc
    if (folder / _SINGLE_FILE).is_file():
        return [folder / _SINGLE_FILE]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        from .models import download_command

        raise ModelFolderError(
            f"The model folder {folder} has no safetensors weights; "
            f"run `{download_command(folder.parent, [folder.name])}` to download them."
        )
    return files


def _source_tensors(folder: Path) -> dict[str, tuple[Path, TensorEntry]]:
    """Every tensor of the checkpoint -> (its shard, its entry), with each shard's size checked."""
    sources: dict[str, tuple[Path, TensorEntry]] = {}
    for path in _weight_files(folder):
        if not path.is_file():
            raise _damaged(folder, path.name)
        try:
            entries = read_safetensors_header(path)
        except _BadFile as exc:
            logger.warning("Bad weight file: %s", exc)
            raise _damaged(folder, path.name) from exc
        for name, entry in entries.items():
            sources[name] = (path, entry)
    return sources


def _model_class():
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    return HunyuanVideoFramepackTransformer3DModel


def _config_of(model_or_config: Any) -> dict:
    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(config, (str, Path)):
        folder = Path(config)
        try:
            return json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise _damaged(folder, "config.json") from exc
    return dict(config)


def build_meta_model(model_or_config: Any):
    """The transformer with every tensor on the ``meta`` device (no memory) from a config/folder/model."""
    cls = _model_class()
    config = _config_of(model_or_config)
    with torch.device("meta"):
        model = cls.from_config(config)
    return model


def fp8_skip_patterns(model_cls: Any = None) -> tuple[str, ...]:
    """Module-name patterns kept in the compute dtype under fp8 storage.

    The same rule as diffusers' ``ModelMixin.enable_layerwise_casting``: its default patterns (norms,
    patch embedders, the final ``proj_out``), plus the class's ``_keep_in_fp32_modules`` and
    ``_skip_layerwise_casting_patterns`` (x/context embedders, every ``norm`` incl. AdaLN modulation).
    """
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    model_cls = model_cls or _model_class()
    patterns = set(DEFAULT_SKIP_MODULES_PATTERN)
    patterns |= set(getattr(model_cls, "_keep_in_fp32_modules", None) or ())
    patterns |= set(getattr(model_cls, "_skip_layerwise_casting_patterns", None) or ())
    return tuple(sorted(patterns))


def _check_args(storage: str, compute_dtype: torch.dtype) -> None:
    if storage not in STORAGES:
        raise ValueError(f"Unknown transformer storage {storage!r}; expected one of {STORAGES}")
    if not compute_dtype.is_floating_point or compute_dtype.itemsize < 2:
        raise ValueError(f"compute_dtype must be float16, bfloat16 or float32, got {compute_dtype}")


def _cast_module_names(model_cls: Any, config: dict, compute_dtype: torch.dtype) -> list[str]:
    """Names of the leaf modules diffusers' layerwise casting hooks (decided on a throwaway meta model)."""
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK

    probe = build_meta_model(config)
    apply_layerwise_casting(probe, storage_dtype=FP8_DTYPE, compute_dtype=compute_dtype,
                            skip_modules_pattern=fp8_skip_patterns(model_cls))
    return [name for name, module in probe.named_modules()
            if getattr(module, "_diffusers_hook", None) is not None
            and module._diffusers_hook.get_hook(_LAYERWISE_CASTING_HOOK) is not None]


def _prepare_meta(model, storage: str, compute_dtype: torch.dtype) -> None:
    """Give every meta tensor its storage dtype and attach the compute-time casting hooks.

    Casting hooks are attached to the META model: their initialisation casts the hooked layers to
    fp8, so afterwards each meta tensor's dtype says exactly how that tensor is stored. Which layers
    get a hook is decided by diffusers' own ``apply_layerwise_casting`` (see _cast_module_names); the
    hook is diffusers' LayerwiseCastingHook with one change, see _keep_storage_hook_class.
    """
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK

    # nn.Module.to, not ModelMixin.to: the latter only adds a warning about fp32 modules (there are none).
    torch.nn.Module.to(model, dtype=compute_dtype)
    if storage in ("fp8", "disk"):
        for name in _cast_module_names(type(model), dict(model.config), compute_dtype):
            hook = _keep_storage_hook_class()(FP8_DTYPE, compute_dtype, non_blocking=False)
            HookRegistry.check_if_exists_or_initialize(model.get_submodule(name)).register_hook(
                hook, _LAYERWISE_CASTING_HOOK)


@functools.cache
def _keep_storage_hook_class():
    """The hook class, built on first use so that importing this module does not import diffusers."""
    from diffusers.hooks.layerwise_casting import LayerwiseCastingHook

    class KeepStorageCastingHook(LayerwiseCastingHook):
        """diffusers' layerwise casting, except that the stored tensors are put back after forward.

        diffusers' hook re-casts the computed layer back to fp8 (``module.to(dtype=fp8)``), which
        allocates a fresh copy of every weight on every forward. For "disk" that silently moves the
        whole memory-mapped model into RAM after one forward; for "fp8" on the CPU the churn of
        long-lived allocations fragments the heap (measured on the 13B model: +1.8 GB RssAnon after
        one forward, vs +0.25 GB with this hook; benchmarks/RESULTS-fullsize.md). Keeping the
        original storage tensor gives the same numbers (the fp8 -> compute dtype upcast is exact).
        """

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.stored: dict[str, torch.Tensor] = {}

        def _restore(self, module) -> None:
            for name, data in self.stored.items():
                module._parameters[name].data = data
            self.stored = {}

        def pre_forward(self, module, *args, **kwargs):
            self._restore(module)  # a forward that raised never reached post_forward
            for name, param in module._parameters.items():
                if param is not None and param.dtype == self.storage_dtype:
                    self.stored[name] = param.data
                    param.data = param.data.to(self.compute_dtype, non_blocking=self.non_blocking)
            return args, kwargs

        def post_forward(self, module, output):
            self._restore(module)
            return output

    return KeepStorageCastingHook


def _meta_targets(model) -> dict[str, torch.Tensor]:
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    return targets


def _assign(model, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise KeyError(name)


def _match_sources(folder: Path, targets: dict[str, torch.Tensor],
                   sources: dict[str, tuple[Path, TensorEntry]]) -> None:
    missing = sorted(set(targets) - set(sources))
    if missing:
        logger.warning("%s lacks %d tensors, e.g. %s", folder, len(missing), missing[:3])
        from .models import download_command

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


def _by_file(names: Iterable[str], sources: dict[str, tuple[Path, TensorEntry]]) -> dict[Path, list[str]]:
    """Names grouped by shard, each in file order (sequential reads)."""
    grouped: dict[Path, list[str]] = {}
    for name in names:
        grouped.setdefault(sources[name][0], []).append(name)
    for path in grouped:
        grouped[path].sort(key=lambda n: sources[n][1].start)
    return dict(sorted(grouped.items()))


def _bad_read(folder: Path, path: Path, exc: Exception) -> ModelFolderError:
    logger.warning("Reading %s failed: %s: %s", path, type(exc).__name__, exc)
    return _damaged(folder, path.name)


@contextmanager
def _open_shard(folder: Path, path: Path):
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


def _read_converted(folder: Path, sources: dict[str, tuple[Path, TensorEntry]],
                    targets: dict[str, torch.Tensor]) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield (name, tensor in its storage dtype), reading and converting one tensor at a time."""
    for path, names in _by_file(targets, sources).items():
        with _open_shard(folder, path) as shard:
            for name in names:
                yield name, shard.converted(name, targets[name].dtype)


def _finish(model):
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not leftovers, f"tensors left on the meta device: {leftovers[:5]}"
    model.requires_grad_(False)
    model.eval()
    return model


def load_transformer(folder: Path, storage: str, compute_dtype: torch.dtype, cache_dir: Path | None = None,
                     *, keep_mapped: bool = False):
    """Load a HunyuanVideoFramepackTransformer3DModel from ``folder`` in ``storage`` (see STORAGES).

    Weights end up on the CPU (streaming to a GPU is ``apply_streaming``'s job). ``cache_dir`` is
    where "disk" keeps its fp8 copy; by default ``<models>/.cache`` next to the transformer folder.
    ``keep_mapped`` (for "fp8" when computing on a GPU): tensors that need no cast (the modulation
    linears, norms and embedders kept in bf16, about 7 GB) stay zero-copy views of the checkpoint's
    file map: page cache the kernel can drop and re-read, not anonymous RAM. Only the fp8 weights are
    owned. CPU compute keeps them owned and aligned, which bit-equality with "disk" relies on.
    Broken or missing files raise ModelFolderError.
    """
    folder = Path(folder)
    _check_args(storage, compute_dtype)
    started = time.perf_counter()
    sources = _source_tensors(folder)
    model = build_meta_model(folder)
    _prepare_meta(model, storage, compute_dtype)
    targets = _meta_targets(model)
    _match_sources(folder, targets, sources)

    if storage == "disk":
        cache = ensure_fp8_cache(folder, compute_dtype, cache_dir, _sources=sources, _targets=targets)
        _map_cache(model, cache, targets)
    else:
        for name, tensor in _read_converted(folder, sources, targets):
            # "bf16" keeps safetensors' tensors exactly as diffusers' from_pretrained does (zero-copy views
            # of the shard's map where no cast is needed); "fp8" owns every byte (see _owned) unless
            # keep_mapped lets the uncast ones stay views.
            uncast = tensor.dtype == sources[name][1].dtype
            _assign(model, name, tensor if storage == "bf16" or (keep_mapped and uncast) else _owned(tensor))
    _finish(model)
    logger.info("Loaded %s as %s (compute %s) in %.1f s", folder, storage, compute_dtype, time.perf_counter() - started)
    return model


# ---------------------------------------------------------------------------------------------
# "disk": a converted fp8 copy, memory-mapped
# ---------------------------------------------------------------------------------------------


def _fingerprint(folder: Path, compute_dtype: torch.dtype, weight_files: list[Path]) -> str:
    """Short hash of what the fp8 copy depends on: config, weight files (name, size, first MiB), rule.

    A full hash of 26 GB would take minutes; size plus the first MiB (header + first weights) tells
    re-downloads and different checkpoints apart, like models.model_identity does.
    """
    digest = hashlib.sha256()
    digest.update(f"format={CACHE_FORMAT};compute={compute_dtype};fp8={FP8_DTYPE};".encode())
    digest.update(repr(fp8_skip_patterns()).encode())
    try:
        digest.update((folder / "config.json").read_bytes())
        for path in weight_files:
            digest.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
            with path.open("rb") as handle:
                digest.update(handle.read(_FINGERPRINT_BYTES))
    except OSError as exc:
        raise _damaged(folder, "config.json") from exc
    return digest.hexdigest()[:12]


def fp8_cache_dir(folder: Path, compute_dtype: torch.dtype, cache_dir: Path | None = None) -> Path:
    """Where the "disk" storage keeps (or will keep) the fp8 copy of ``folder``."""
    folder = Path(folder)
    root = Path(cache_dir) if cache_dir is not None else folder.parent / ".cache"
    return root / f"{folder.name}-{_fingerprint(folder, compute_dtype, _weight_files(folder))}-fp8"


class _StaleCache(Exception):
    pass


def _check_cache(cache: Path, targets: dict[str, torch.Tensor]) -> dict[Path, dict[str, TensorEntry]]:
    try:
        info = json.loads((cache / _CACHE_INFO).read_text(encoding="utf-8"))
        if info.get("format") != CACHE_FORMAT:
            raise _StaleCache(f"format {info.get('format')}")
        files = {cache / name: read_safetensors_header(cache / name) for name in info["files"]}
    except (OSError, ValueError, KeyError, TypeError, _BadFile) as exc:
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
    from .jobs import pid_alive

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
    sources = _sources if _sources is not None else _source_tensors(folder)
    if _targets is None:
        meta = build_meta_model(folder)
        _prepare_meta(meta, "disk", compute_dtype)
        _targets = _meta_targets(meta)
        _match_sources(folder, _targets, sources)
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
        grouped = _by_file(targets, sources)
        for path, names in grouped.items():
            specs = [(n, targets[n].dtype, tuple(targets[n].shape)) for n in names]
            with _open_shard(folder, path) as shard:
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


def _map_cache(model, cache: Path, targets: dict[str, torch.Tensor]) -> None:
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
            _assign(model, name, tensor)
        del mapped


# ---------------------------------------------------------------------------------------------
# Sizes for the memory planner
# ---------------------------------------------------------------------------------------------


def _storage_meta_model(model_or_config: Any, storage: str, compute_dtype: torch.dtype):
    _check_args(storage, compute_dtype)
    model = build_meta_model(model_or_config)
    if storage == "bf16":
        torch.nn.Module.to(model, dtype=compute_dtype)
    else:  # "disk" stores (and streams) exactly the fp8 layout
        _prepare_meta(model, "fp8", compute_dtype)
    return model


def _module_bytes(module) -> int:
    return sum(t.numel() * t.dtype.itemsize for t in list(module.parameters()) + list(module.buffers()))


def transformer_block_bytes(model_or_config: Any, storage: str, compute_dtype: torch.dtype = torch.bfloat16) -> list[int]:
    """Bytes of each block (dual-stream blocks, then single-stream blocks: execution order) in ``storage``.

    Works from a config dict, a model folder or a model (its config; no weights are touched).
    """
    model = _storage_meta_model(model_or_config, storage, compute_dtype)
    return [_module_bytes(block) for list_name in BLOCK_LISTS for block in getattr(model, list_name)]


def transformer_nonblock_bytes(model_or_config: Any, storage: str, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of everything outside the blocks (embedders, token refiner, output head) in ``storage``."""
    model = _storage_meta_model(model_or_config, storage, compute_dtype)
    blocks = sum(_module_bytes(getattr(model, list_name)) for list_name in BLOCK_LISTS)
    return _module_bytes(model) - blocks


# ---------------------------------------------------------------------------------------------
# Streaming blocks to the GPU
# ---------------------------------------------------------------------------------------------

_GROUP_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")


def apply_streaming(model, onload_device: Any, *, resident_blocks: int = 0, use_stream: bool | None = None,
                    offload_to_disk_path: str | None = None) -> dict:
    """Stream the transformer block by block to ``onload_device`` with diffusers' group offloading.

    The first ``resident_blocks`` blocks in execution order (dual-stream, then single-stream) move to
    the device for good ("blocks that fit stay resident"); the others are onloaded one block per group.
    On CUDA (``use_stream`` None -> True) the next block's copy runs on a side stream while the current
    block computes (record_stream; low_cpu_mem_usage pins one block at a time instead of the whole
    model). Returns a summary dict.
    """
    from diffusers.hooks import apply_group_offloading

    onload = torch.device(onload_device)
    if use_stream is None:
        use_stream = onload.type == "cuda"
    blocks = [(list_name, i, block) for list_name in BLOCK_LISTS for i, block in enumerate(getattr(model, list_name))]
    resident_blocks = max(0, min(int(resident_blocks), len(blocks)))
    resident = blocks[:resident_blocks]
    streamed = blocks[resident_blocks:]
    if _is_streaming(model):
        raise RuntimeError("apply_streaming was already applied to this model; call remove_streaming first")
    if onload.type == "cuda" and not use_stream and any(_is_mapped(p) for p in model.parameters()):
        logger.warning("Streaming memory-mapped weights without a CUDA stream copies them into RAM on offload")

    if offload_to_disk_path is not None:
        # diffusers names group files by their index in the list it sees; keep one folder per split
        # so files written for one resident count are never read back for another.
        offload_to_disk_path = str(Path(offload_to_disk_path) / f"resident-{resident_blocks}")

    # diffusers groups every child ModuleList; hide the resident head while it builds the groups, so
    # only the tail is grouped (the hooks stay on the block modules when the full lists come back).
    full_lists = {list_name: getattr(model, list_name) for list_name in BLOCK_LISTS}
    try:
        for list_name, full in full_lists.items():
            skip = sum(1 for name, _, _ in resident if name == list_name)
            setattr(model, list_name, torch.nn.ModuleList(list(full)[skip:]))
        apply_group_offloading(
            model,
            onload_device=onload,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            non_blocking=use_stream,
            use_stream=use_stream,
            record_stream=use_stream,
            low_cpu_mem_usage=use_stream,
            offload_to_disk_path=offload_to_disk_path,
        )
    finally:
        for list_name, full in full_lists.items():
            setattr(model, list_name, full)
    for _, _, block in resident:
        block.to(onload)

    summary = {
        "onload_device": str(onload),
        "use_stream": use_stream,
        "resident_blocks": len(resident),
        "streamed_blocks": len(streamed),
        "bytes_per_block": [_module_bytes(block) for _, _, block in blocks],
        "resident_bytes": sum(_module_bytes(block) for _, _, block in resident),
        "streamed_bytes": sum(_module_bytes(block) for _, _, block in streamed),
        "nonblock_bytes": _module_bytes(model) - sum(_module_bytes(block) for _, _, block in blocks),
    }
    logger.info("Streaming %d blocks (%.2f GB) to %s, %d resident (%.2f GB), stream=%s",
                len(streamed), summary["streamed_bytes"] / 1e9, onload, len(resident),
                summary["resident_bytes"] / 1e9, use_stream)
    return summary


def _is_mapped(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and not tensor.untyped_storage().resizable()


def _is_streaming(model) -> bool:
    return any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook("group_offloading")
               for m in model.modules())


def _free_device_caches() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:
            host_empty()  # pinned staging buffers of the streamed blocks


def remove_streaming(model) -> None:
    """Undo ``apply_streaming``: remove the group offloading hooks and bring every tensor back to the CPU.

    Streamed blocks are already on the CPU between forwards (their original, possibly memory-mapped,
    tensors); resident blocks and anything onloaded are copied back (into RAM, even for "disk").
    """
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(model)
    for name in _GROUP_HOOKS:
        registry.remove_hook(name, recurse=True)
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None and param.device.type != "cpu":
                param.data = param.data.to("cpu")
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "cpu":
                module._buffers[key] = buffer.to("cpu")
    _free_device_caches()


def unload(model) -> None:
    """Free the model's memory (RAM, GPU, memory maps): hooks off, every tensor back to ``meta``.

    The object stays a valid (empty) module so stale references cannot hold gigabytes; load again
    with ``load_transformer``.
    """
    from diffusers.hooks import HookRegistry

    if getattr(model, "_diffusers_hook", None) is not None:
        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in _GROUP_HOOKS:  # these hold the CPU copies of every streamed block
            registry.remove_hook(name, recurse=True)
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None:
                module._parameters[key] = torch.nn.Parameter(torch.empty_like(param, device="meta"),
                                                             requires_grad=False)
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = torch.empty_like(buffer, device="meta")
    _free_device_caches()
