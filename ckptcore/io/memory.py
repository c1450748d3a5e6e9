"""Host memory and glibc's allocator: returning freed memory between restore waves, or keeping it.

Array formats read through native libraries (TensorStore) whose threads allocate in their
own malloc arenas; glibc keeps memory freed there for reuse instead of returning it, so
the read buffers of one wave pile up beside the arrays built from them and a restore's
peak RSS grows well past its result. ``malloc_trim`` hands the free pages back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Any

_GLIBC: Any = None  # glibc, loaded on first use; False where there is none


def _glibc() -> Any:
    """The C library if it is glibc (it has ``malloc_trim`` and ``mallopt``), else None."""
    global _GLIBC
    if _GLIBC is None:
        _GLIBC = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int  # absent from musl
                libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                _GLIBC = libc
            except (OSError, AttributeError):
                pass
    return _GLIBC or None


def release_free_memory() -> None:
    """Give free heap pages back to the OS (glibc only; elsewhere a no-op). Costs about a millisecond."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


KEEP_FREED_MEMORY_ENV = "CKPTCORE_KEEP_FREED_MEMORY"
# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Make glibc keep freed large buffers for reuse, for the rest of this process; whether it took effect.

    By default glibc gives each large buffer a fresh mapping and unmaps it when it is
    freed, and gives each native thread an arena of its own, so a process that streams
    batch after batch through TensorStore touches fresh memory for every batch (0.4-1.4 s
    per GiB on a VM whose host takes freed memory back; ``benchmarks/first_touch.py``).
    This is a setting of the whole process, for the ``ckptcore convert`` command, which
    owns its process and exits when done: a library must not change its host's allocator.
    Call it before any thread allocates (an arena made earlier keeps its own buffers).
    ``CKPTCORE_KEEP_FREED_MEMORY=0`` in the environment leaves glibc's defaults.
    """
    libc = _glibc()
    if libc is None or os.environ.get(KEEP_FREED_MEMORY_ENV, "1").strip() in ("0", "false", "no"):
        return False
    # One arena; no buffer unmapped on free; the heap trimmed only past 2 GiB of free pages (the int maximum).
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, (1 << 31) - 1)))
