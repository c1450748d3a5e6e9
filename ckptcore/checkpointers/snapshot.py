"""Snapshots of NumPy leaves for background saves: copies into buffers reused from save to save.

Memory touched for the first time is slow in these VMs (and costly everywhere): a save of
the same sizes as the previous one copies into the previous snapshot's buffers. Large
arrays are copied by several threads (each piece a plain memcpy with the GIL released).
``jax.Array`` values are immutable and never copied here.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ckptcore.checkpointers import background

PARALLEL_COPY_MIN_BYTES = 8 << 20  # smaller arrays are copied inline: threads would not pay
COPY_CHUNK_BYTES = 8 << 20


class BufferPool:
    """Snapshot buffers of finished saves, kept for the next save of the same sizes.

    Holds at most ``cap`` bytes counting the buffers lent out, so the memory it keeps is
    the largest snapshot (or byte budget) seen, never more.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, list[np.ndarray]] = {}
        self._free_bytes = 0
        self._lent_bytes = 0
        self.cap = 0

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            self._lent_bytes += nbytes
            self.cap = max(self.cap, self._lent_bytes)
            free = self._free.get(nbytes)
            if free:
                self._free_bytes -= nbytes
                return free.pop()
            self._evict(self.cap - self._lent_bytes)
        return np.empty(nbytes, dtype=np.uint8)

    def give(self, buffers: list[np.ndarray]) -> None:
        with self._lock:
            for raw in buffers:
                self._lent_bytes -= raw.nbytes
                if self._free_bytes + raw.nbytes + self._lent_bytes <= self.cap:
                    self._free.setdefault(raw.nbytes, []).append(raw)
                    self._free_bytes += raw.nbytes

    def forget(self, buffers: list[np.ndarray]) -> None:
        """Buffers that will not come back (an abandoned save may still hold them)."""
        with self._lock:
            self._lent_bytes -= sum(raw.nbytes for raw in buffers)

    def _evict(self, keep_bytes: int) -> None:
        for size in sorted(self._free, reverse=True):
            while self._free[size] and self._free_bytes > max(keep_bytes, 0):
                self._free[size].pop()
                self._free_bytes -= size

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._free_bytes = 0


class Snapshot:
    """The copies of one save's NumPy leaves: into pooled buffers, large ones split across threads."""

    def __init__(self, pool: BufferPool | None, executor: ThreadPoolExecutor | None) -> None:
        self._pool = pool
        self._executor = executor
        self._buffers: list[np.ndarray] = []
        self._futures: list[Future[None]] = []
        self._released = False

    def copy(self, value: np.ndarray) -> np.ndarray:
        nbytes = value.nbytes
        raw = self._pool.take(nbytes) if self._pool is not None else np.empty(nbytes, dtype=np.uint8)
        self._buffers.append(raw)
        out = raw.view(value.dtype).reshape(value.shape) if nbytes else np.empty(value.shape, value.dtype)
        if self._executor is None or nbytes < PARALLEL_COPY_MIN_BYTES or not value.flags.c_contiguous:
            np.copyto(out, value, casting="no")
            return out
        # Split the flat bytes: each piece is a plain memcpy with the GIL released.
        src, dst = value.reshape(-1).view(np.uint8), raw
        for start in range(0, nbytes, COPY_CHUNK_BYTES):
            stop = min(start + COPY_CHUNK_BYTES, nbytes)
            self._futures.append(self._executor.submit(np.copyto, dst[start:stop], src[start:stop]))
        return out

    def finish(self) -> None:
        """Wait for every copy; the caller's arrays are no longer read after this."""
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()

    def abandon(self) -> None:
        """The save failed before its write was queued: wait for the copies, then recycle."""
        for future in self._futures:
            future.exception()
        self._futures = []
        self.release()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._pool is not None:
            job = background.current_job()
            if job is not None and job.abandoned:
                self._pool.forget(self._buffers)
            else:
                self._pool.give(self._buffers)
        self._buffers = []


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def copy_executor(threads: int) -> ThreadPoolExecutor:
    """Threads shared by every checkpointer for snapshot copies (a copy never waits on anything)."""
    global _executor
    with _executor_lock:
        if _executor is None or _executor._max_workers < threads:
            _executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckptcore-copy")
        return _executor
