"""Reading TensorStore regions into NumPy memory that JAX's CPU devices adopt as it is.

Shared by the formats of this distribution and by ckptcore-orbax, which reads orbax's
arrays through TensorStore the same way.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorstore as ts


def read_region(source: ts.TensorStore) -> tuple[Any, np.ndarray | None]:
    """Start reading ``source``: (future, output array or None when the future returns it).

    Plain numeric dtypes are read into an array NumPy allocates: NumPy backs large arrays
    with huge pages, while TensorStore's own result arrays fault in 4 KiB pages, which
    costs more system time than the copy itself (a third of a large restore's time).
    """
    dtype = source.dtype.numpy_dtype
    if dtype.kind not in "biufc" or math.prod(source.shape) == 0:
        return source.read(), None
    out = aligned_empty(tuple(source.shape), dtype)
    return ts.array(out).write(source), out


ALIGN = 64


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array starting on a 64-byte boundary.

    JAX's CPU devices adopt such host buffers without copying them, so a restore onto CPU
    devices places what was read as it is instead of copying it once more.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)
