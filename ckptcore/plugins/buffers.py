"""Host buffers that array formats read into: 64-byte aligned, as JAX's CPU devices adopt them.

A format that honours :attr:`ckptcore.plugins.registrations.ReadRequest.aligned` (or always
reads into its own buffers) allocates them here; JAX's CPU devices take such a buffer as it
is and copy any other.
"""

from __future__ import annotations

import math

import numpy as np

ALIGN = 64


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array starting on a :data:`ALIGN`-byte boundary."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)
