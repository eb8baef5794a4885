"""safetensors files without the library's all-at-once API: header parsing with size checks, and a
writer that holds one tensor in RAM at a time (the fp8 disk copy of a 26 GB checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit; a larger length field means a broken file
ALIGN = 64  # torch's CPU allocator alignment; tensors in the files we write start this aligned

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


class BadSafetensorsFile(Exception):
    """A safetensors file that is truncated or does not parse (turned into ModelFolderError)."""


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) and check the file is whole."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            raw_length = handle.read(8)
            if len(raw_length) < 8:
                raise BadSafetensorsFile(f"{path.name}: shorter than a safetensors header")
            (length,) = struct.unpack("<Q", raw_length)
            if length > _MAX_HEADER_BYTES or 8 + length > size:
                raise BadSafetensorsFile(f"{path.name}: header length {length} does not fit the file size {size}")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BadSafetensorsFile(f"{path.name}: {exc}") from exc
    if not isinstance(header, dict):
        raise BadSafetensorsFile(f"{path.name}: the header is not a JSON object")
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
                raise BadSafetensorsFile(f"{path.name}: tensor {name} has offsets {begin}..{end} for {nbytes} bytes")
            if data_start + end > size:
                raise BadSafetensorsFile(f"{path.name}: tensor {name} ends at byte {data_start + end} of {size} (truncated)")
            entries[name] = TensorEntry(name, dtype, shape, data_start + begin, data_start + end)
    except (KeyError, TypeError, ValueError) as exc:
        raise BadSafetensorsFile(f"{path.name}: malformed header entry ({exc})") from exc
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
    align: int = ALIGN,
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
