"""Returning freed host memory to the operating system between restore waves.

Array formats read through native libraries (TensorStore) whose threads allocate in their
own malloc arenas; glibc keeps memory freed there for reuse instead of returning it, so
the read buffers of one wave pile up beside the arrays built from them and a restore's
peak RSS grows well past its result. ``malloc_trim`` hands the free pages back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

_trim: Any = None


def release_free_memory() -> None:
    """Give free heap pages back to the OS (glibc only; elsewhere a no-op). Costs about a millisecond."""
    global _trim
    if _trim is None:
        _trim = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _trim = libc.malloc_trim  # absent from musl: AttributeError
                _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):
                _trim = False
    if _trim:
        _trim(0)
