"""Decisions about how an array is laid out: chunk shape, codecs, storage dtype."""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np

DEFAULT_CHUNK_BYTES = 16 << 20
SAMPLE_BYTES = 64 << 10
SAMPLE_PIECES = 4
COMPRESS_IF_RATIO_BELOW = 0.9

# dtypes TensorStore's zarr3 driver cannot store natively are written as raw bytes.
_NATIVE = {
    "bool", "int2", "int4", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", "bfloat16", "float4_e2m1fn",
    "float8_e3m4", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e4m3b11fnuz", "float8_e5m2",
    "float8_e5m2fnuz", "float8_e8m0fnu",
}


def storage_dtype(dtype: np.dtype) -> tuple[np.dtype, bool]:
    """The dtype written to storage, and whether it is a raw-byte view of ``dtype``."""
    if dtype.name in _NATIVE:
        return dtype, False
    return np.dtype(np.uint8), True


def stored_shape(shape: tuple[int, ...], dtype: np.dtype, byte_view: bool) -> tuple[int, ...]:
    return (*shape, dtype.itemsize) if byte_view and dtype.itemsize > 1 else shape


def chunk_shape(shape: tuple[int, ...], itemsize: int, target_bytes: int, hint: tuple[int, ...] | None) -> list[int]:
    """Chunks no larger than ``hint`` (a shard) and about ``target_bytes``: halve the largest dim."""
    chunk = [max(1, n) for n in (hint or shape)]
    while math.prod(chunk) * itemsize > target_bytes and max(chunk) > 1:
        i = chunk.index(max(chunk))
        chunk[i] = (chunk[i] + 1) // 2
    return chunk


def worth_compressing(data: np.ndarray) -> bool:
    """Whether zstd is likely to pay, judged on samples (fast zlib level 1 as a proxy).

    ``SAMPLE_PIECES`` pieces spread over the array, ``SAMPLE_BYTES`` in all: a few
    milliseconds per array, and a zero-padded tail or a constant head cannot fool it alone.
    """
    flat = data.reshape(-1) if data.flags.c_contiguous else data[(0,) * max(0, data.ndim - 1)]
    piece = max(1, SAMPLE_BYTES // SAMPLE_PIECES // max(1, flat.itemsize))
    if flat.size <= piece * SAMPLE_PIECES:
        pieces = [flat]
    else:
        step = (flat.size - piece) // (SAMPLE_PIECES - 1)
        pieces = [flat[k * step : k * step + piece] for k in range(SAMPLE_PIECES)]
    raw = b"".join(np.ascontiguousarray(p).view(np.uint8).tobytes() for p in pieces)
    if len(raw) < 64:
        return False
    return len(zlib.compress(raw, 1)) < COMPRESS_IF_RATIO_BELOW * len(raw)


def codecs(compress: bool, level: int) -> list[dict[str, Any]]:
    chain: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compress:
        chain.append({"name": "zstd", "configuration": {"level": level}})
    chain.append({"name": "crc32c"})
    return chain
