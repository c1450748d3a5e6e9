"""Reading TensorStore regions into NumPy memory that JAX's CPU devices adopt as it is
(:func:`ckptcore.plugins.buffers.aligned_empty`).

Shared by the formats of this distribution and by ckptcore-orbax, which reads orbax's
arrays through TensorStore the same way.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorstore as ts

from ckptcore.plugins.buffers import aligned_empty


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
