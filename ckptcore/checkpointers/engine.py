"""The one asynchronous save engine, shared by :class:`~ckptcore.AsyncCheckpointer` and the manager.

A background save has two halves. In the caller's thread, :meth:`AsyncSaveEngine.snapshot`
copies the mutable leaves (NumPy arrays) into pooled buffers, so the caller may change its
state as soon as ``save`` returns. In the background, :meth:`AsyncSaveEngine.submit` runs the
write. Both doors into ckptcore get the same behaviour from here:

* memory: ``max_bytes_in_flight`` bounds the bytes held by snapshots not yet written
  (``None``: one save at a time, the next snapshot waits for the previous write);
* deadline: a write running longer than ``timeout`` seconds is abandoned, never committed,
  and reported as :class:`~ckptcore.errors.CheckpointTimeoutError`;
* errors: a background failure is raised at the next ``save``, ``wait`` or ``close``;
* exit: the interpreter waits for writes in flight before it exits.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from ckptcore.checkpointers import background
from ckptcore.checkpointers.snapshot import BufferPool, Snapshot, copy_executor
from ckptcore.errors import InvalidOptionError

logger = logging.getLogger(__name__)

T = TypeVar("T")
CopyArray = Callable[[np.ndarray], np.ndarray]


class AsyncSaveEngine:
    """Snapshots in the caller's thread, writes in order in the background.

    :param name: the name of the writer thread.
    :param timeout: seconds a write may run before it is abandoned (``None``: no deadline).
    :param max_bytes_in_flight: the most bytes held by snapshots not yet written (``None``:
        one save at a time).
    :param reuse_buffers: copy into the buffers of an earlier, finished snapshot of the same sizes.
    :param copy_threads: threads copying large NumPy arrays (default: up to 2).
    """

    def __init__(
        self,
        name: str,
        *,
        timeout: float | None,
        max_bytes_in_flight: int | None = None,
        reuse_buffers: bool = True,
        copy_threads: int | None = None,
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise InvalidOptionError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
        if max_bytes_in_flight is not None and max_bytes_in_flight <= 0:
            raise InvalidOptionError(
                f"max_bytes_in_flight must be a positive number of bytes or None, not {max_bytes_in_flight!r}"
            )
        self.timeout = timeout
        self._limit = max_bytes_in_flight
        self._pool = BufferPool() if reuse_buffers else None
        self._copy_threads = max(1, copy_threads if copy_threads is not None else min(2, os.cpu_count() or 1))
        self._writer = background.BackgroundWriter(name)
        self._bytes: dict[background.Job, int] = {}  # bytes each queued save holds
        self._keys: dict[background.Job, str] = {}  # what each queued save writes (its URL)
        self._table_lock = threading.Lock()
        _writers.add(self._writer)

    # -- the caller's half -------------------------------------------------------------

    def raise_errors(self) -> None:
        """Raise the failure of an earlier save (without waiting for running ones)."""
        self._writer.raise_errors()

    def make_room(self, nbytes: int) -> None:
        """Wait for earlier saves until a snapshot of ``nbytes`` fits in the byte budget."""
        while True:
            in_flight = self._in_flight(self._bytes)
            if not in_flight:
                return
            if self._limit is not None and sum(n for _, n in in_flight) + nbytes <= self._limit:
                return
            self._writer.wait_for(in_flight[0][0])  # the oldest frees its bytes first

    def snapshot(self, take: Callable[[CopyArray], T], *, donate: bool = False) -> tuple[T, Snapshot]:
        """``take(copy_array)`` with a copier into pooled buffers (the identity with ``donate``)."""
        executor = copy_executor(self._copy_threads) if self._copy_threads > 1 else None
        snap = Snapshot(self._pool, executor)
        try:
            value = take(_keep if donate else snap.copy)
            snap.finish()
        except BaseException:
            snap.abandon()
            raise
        return value, snap

    def submit(self, write: Callable[[], None], snap: Snapshot, *, nbytes: int, key: str, description: str) -> None:
        """Run ``write`` in the background after the saves already queued; its snapshot is freed after."""

        def job() -> None:
            try:
                write()
            finally:
                snap.release()  # the write no longer reads the buffers

        with self._table_lock:
            try:
                queued = self._writer.enqueue(job, description=description, deadline=self.timeout)
            except BaseException:  # an earlier save failed meanwhile: raised now, this one is dropped
                snap.release()
                raise
            self._bytes[queued] = nbytes
            self._keys[queued] = key

    # -- waiting -----------------------------------------------------------------------

    def keys_in_flight(self) -> list[str]:
        return [key for _, key in self._in_flight(self._keys)]

    def wait_for_key(self, key: str) -> None:
        """Wait for the saves in flight that write ``key``; their errors are left for the next wait."""
        for job, saved in self._in_flight(self._keys):
            if saved == key:
                self._writer.wait_for(job)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every save ended; raise the first failure (:class:`CheckpointTimeoutError` on expiry)."""
        self._writer.wait(timeout)

    def in_progress(self) -> bool:
        return self._writer.in_progress()

    def close(self) -> None:
        """Wait for saves in flight, raising their errors; then free the snapshot buffers."""
        try:
            self._writer.close()
        finally:
            if self._pool is not None:
                self._pool.clear()

    def _in_flight(self, table: dict[background.Job, Any]) -> list[tuple[background.Job, Any]]:
        pending = self._writer.pending()
        with self._table_lock:
            for job in [j for j in table if j not in pending]:
                del table[job]
            return [(j, table[j]) for j in pending if j in table]


def _keep(value: np.ndarray) -> np.ndarray:
    return value


# At interpreter exit, background threads (daemons) would die mid-write: wait for them,
# even for a checkpointer already garbage-collected (a running job keeps its writer alive).
_writers: weakref.WeakSet[background.BackgroundWriter] = weakref.WeakSet()


def _wait_at_exit() -> None:
    for writer in list(_writers):
        try:
            writer.wait()
        except Exception as exc:  # nobody is left to raise it to
            logger.error("ckptcore: a background save failed at exit: %s", exc)


# threading's exit hooks run before concurrent.futures refuses new work (the write needs
# thread pools) and in reverse order of registration: registered after its own, ours runs first.
_register_atexit = getattr(threading, "_register_atexit", None)
if _register_atexit is not None:
    _register_atexit(_wait_at_exit)
else:  # pragma: no cover - every CPython >= 3.9 has it
    atexit.register(_wait_at_exit)
