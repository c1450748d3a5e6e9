"""The safetensors file header: dtype names, encoding, and validating parsing.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(per tensor: ``dtype``, ``shape``, ``data_offsets`` relative to the end of the header;
optionally ``__metadata__``, a map of strings), then the tensors' raw little-endian bytes.
The reference implementation requires the tensors to cover the data section exactly (no
gaps) and accepts trailing spaces in the JSON, which is how the data section is aligned.

Everything read from a header is parsed with :mod:`json` and checked; nothing is executed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptcore.errors import CorruptCheckpointError

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit
METADATA_KEY = "__metadata__"

# NumPy / ml_dtypes name -> safetensors dtype, for dtypes whose element layout is the same
# (one element per itemsize bytes). Everything else is stored as raw bytes ("U8").
NATIVE = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "complex64": "C64",
    "float64": "F64",
    "int64": "I64",
    "uint64": "U64",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e8m0fnu": "F8_E8M0",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}

# Every dtype the reference implementation knows, with its size in bits (F4 and F6 are
# bit-packed, which ml_dtypes' one-byte-per-element float4/float6 are not).
BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}


_STORED: dict[np.dtype, tuple[str, int]] = {}  # dtype -> (safetensors dtype, trailing byte dim or 0); dtype.name is slow


def stored_as(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...], bool]:
    """The safetensors dtype and shape an array of ``dtype`` and ``shape`` is stored with, and whether as raw bytes."""
    found = _STORED.get(dtype)
    if found is None:
        name = NATIVE.get(dtype.name)
        if name is not None and dtype.byteorder in "=<|":
            found = (name, 0)
        else:
            found = ("U8", dtype.itemsize if dtype.itemsize > 1 else 1)
        _STORED[dtype] = found
    name, extra = found
    if not extra:
        return name, shape, False
    return name, ((*shape, extra) if extra > 1 else shape), True


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offsets
    stop: int


@dataclass(frozen=True)
class Header:
    file: str  # for messages
    data_start: int
    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]

    def tensor(self, name: str, key: str) -> TensorEntry:
        entry = self.tensors.get(name)
        if entry is None:
            raise CorruptCheckpointError(
                f"{self.file}: no tensor {name!r} (array {key!r}) in the safetensors header; "
                "the file does not belong to this checkpoint's index or is corrupt"
            )
        return entry


def encode(tensors: list[tuple[str, str, tuple[int, ...], int]], metadata: Mapping[str, str], align: int) -> tuple[bytes, list[int]]:
    """The header bytes (length prefix included, padded so data starts at a multiple of ``align``) and each tensor's data offset.

    ``tensors`` are (name, safetensors dtype, shape, nbytes) in file order.
    """
    doc: dict[str, Any] = {METADATA_KEY: dict(metadata)}
    offsets = []
    pos = 0
    for name, dtype, shape, nbytes in tensors:
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    total = 8 + len(body)
    total += -total % max(8, align)
    body += b" " * (total - 8 - len(body))
    return len(body).to_bytes(8, "little") + body, offsets


def header_length(file: str, prefix: bytes, file_size: int) -> int:
    """The JSON length announced by the first 8 bytes, checked against the limit and the file's size."""
    if file_size < 8 or len(prefix) < 8:
        raise CorruptCheckpointError(f"{file}: truncated safetensors file ({file_size} bytes, no header)")
    n = int.from_bytes(prefix[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(
            f"{file}: safetensors header length {n} is over the {MAX_HEADER_BYTES}-byte limit; the file is corrupt"
        )
    if 8 + n > file_size:
        raise CorruptCheckpointError(
            f"{file}: the safetensors header claims {n} bytes but the file holds {file_size}; the file is truncated"
        )
    return n


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _int(value: Any) -> bool:
    return type(value) is int and value >= 0


def parse(file: str, raw: bytes, file_size: int) -> Header:
    """Parse and validate the JSON header ``raw`` (the bytes after the length prefix) of a file of ``file_size`` bytes."""
    data_start = 8 + len(raw)
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{file}: the safetensors header is not valid JSON ({exc}); the file is corrupt") from exc
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{file}: the safetensors header is not a JSON object; the file is corrupt")
    metadata = doc.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError(f"{file}: the safetensors __metadata__ is not a map of strings; the file is corrupt")
    tensors: dict[str, TensorEntry] = {}
    data_size = file_size - data_start
    for name, entry in doc.items():
        if type(entry) is not dict or len(entry) != 3:
            raise CorruptCheckpointError(f"{file}: tensor {name!r}: header entry is not {{dtype, shape, data_offsets}}; the file is corrupt")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        bits = BITS.get(dtype) if type(dtype) is str else None
        if bits is None:
            raise CorruptCheckpointError(f"{file}: tensor {name!r}: unknown safetensors dtype {dtype!r}")
        if type(shape) is not list or not all(_int(n) for n in shape):
            raise CorruptCheckpointError(f"{file}: tensor {name!r}: invalid shape {shape!r}; the file is corrupt")
        if type(offsets) is not list or len(offsets) != 2 or not (_int(offsets[0]) and _int(offsets[1])) or offsets[0] > offsets[1]:
            raise CorruptCheckpointError(f"{file}: tensor {name!r}: invalid data_offsets {offsets!r}; the file is corrupt")
        bits *= math.prod(shape)
        if bits % 8 or offsets[1] - offsets[0] != bits // 8:
            where = f"{file}: tensor {name!r}"
            raise CorruptCheckpointError(
                f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, but dtype {dtype} and "
                f"shape {shape} need {bits / 8:g}; the file is corrupt"
            )
        if offsets[1] > data_size:
            where = f"{file}: tensor {name!r}"
            raise CorruptCheckpointError(
                f"{where}: data_offsets {offsets} reach past the end of the file ({data_size} data bytes); "
                "the file is truncated or corrupt"
            )
        tensors[name] = TensorEntry(str(dtype), tuple(shape), data_start + offsets[0], data_start + offsets[1])
    end = data_start
    previous = ""
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].stop)):
        if entry.start == entry.stop:
            continue
        if entry.start < end:
            raise CorruptCheckpointError(
                f"{file}: tensor {name!r} overlaps tensor {previous!r} (data_offsets overlap); the file is corrupt"
            )
        end, previous = entry.stop, name
    return Header(file, data_start, tensors, metadata)
