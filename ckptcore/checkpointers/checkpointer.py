"""Checkpointers: one object that saves, restores and reads metadata, synchronously or not.

:class:`AsyncCheckpointer` snapshots the state in the caller's thread and writes it in
the background through the same atomic commit as a synchronous save:

* NumPy arrays (mutable) are copied once, into buffers reused from one save to the next
  (memory touched for the first time is slow) and, when large, by several threads;
  ``donate=True`` skips the copy for callers that hand their buffers over.
* ``jax.Array`` values are immutable: the snapshot only keeps them alive (the JAX support
  starts their device-to-host copies inside :func:`ckptcore.saving.prepare`).
* A background failure is raised at the next ``save``, ``wait_until_finished`` or
  ``close``; a write past its deadline ends with :class:`CheckpointTimeoutError` and is
  never committed.
* ``max_bytes_in_flight`` bounds the bytes held by snapshots not yet written.

:class:`Checkpointer` has the same interface and saves in the caller's thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

import numpy as np

from ckptcore import api, storage
from ckptcore import progress as progress_lib
from ckptcore.checkpointers import background
from ckptcore.errors import AlreadyExistsError, CheckpointerClosedError, CheckpointError, InvalidOptionError
from ckptcore.io import save as saving
from ckptcore.progress import ProgressArg

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 3600.0
"""How long a background write may run before it is abandoned (never committed)."""

_PARALLEL_COPY_MIN_BYTES = 8 << 20  # smaller arrays are copied inline: threads would not pay
_COPY_CHUNK_BYTES = 8 << 20


class _CheckpointerBase:
    """What both checkpointers share: restore, metadata, closing, the context manager."""

    def __init__(self, *, progress: ProgressArg = None) -> None:
        self._progress = progress
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointerClosedError(f"this {type(self).__name__} was closed; create a new one")

    def _wait_for_saves_to(self, url: str) -> None:
        """Synchronous checkpointers have no saves in flight."""

    def restore(
        self,
        path: str | os.PathLike[str],
        target: Any = None,
        *,
        partial: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        max_bytes_in_flight: int | None = None,
        progress: ProgressArg = None,
    ) -> Any:
        """Restore the checkpoint at ``path`` (see :func:`ckptcore.restore`).

        A save to the same path still in flight in this checkpointer is waited for first.
        """
        self._check_open()
        self._wait_for_saves_to(storage.resolve(path, storage_options).url)
        with progress_lib.resolve(self._progress if progress is None else progress, f"restoring {path}") as callback:
            return api.restore(
                path, target, partial=partial, storage_options=storage_options,
                max_bytes_in_flight=max_bytes_in_flight, progress=callback,
            )

    def metadata(self, path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> Any:
        """The saved tree with :class:`ckptcore.ArrayMetadata` for arrays; no array data is read."""
        self._check_open()
        self._wait_for_saves_to(storage.resolve(path, storage_options).url)
        return api.metadata(path, storage_options=storage_options)

    def wait_until_finished(self, timeout: float | None = None) -> None:
        """Block until every save has committed; raise the error of one that failed."""

    def is_saving_in_progress(self) -> bool:
        return False

    def close(self) -> None:
        """Wait for saves in flight (raising their errors); the checkpointer cannot be used afterwards."""
        self._closed = True

    def __enter__(self) -> _CheckpointerBase:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Checkpointer(_CheckpointerBase):
    """Saves in the caller's thread; the same interface as :class:`AsyncCheckpointer`.

    :param progress: default for every operation: ``True`` shows a progress bar, a
        ``callable(bytes_done, bytes_total)`` is called as bytes are written or read.
    """

    def save(
        self,
        path: str | os.PathLike[str],
        state: Any,
        *,
        force: bool = False,
        format: str | None = None,
        format_options: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        donate: bool = False,
        progress: ProgressArg = None,
    ) -> None:
        """Save ``state`` to ``path`` atomically and return once it is committed (see :func:`ckptcore.save`).

        ``donate`` is accepted for interface compatibility: a synchronous save never copies.
        """
        self._check_open()
        with progress_lib.resolve(self._progress if progress is None else progress, f"saving {path}") as callback:
            saving.write(
                saving.prepare(state, copy=False), path, force=force, format=format, format_options=format_options,
                metadata=metadata, storage_options=storage_options, progress=callback,
            )


class AsyncCheckpointer(_CheckpointerBase):
    """Snapshots in ``save`` and writes in the background; errors surface at the next call.

    :param timeout: seconds a background write may run before it is abandoned: waiting
        raises :class:`~ckptcore.errors.CheckpointTimeoutError` and the checkpoint is never
        committed. ``None``: no deadline.
    :param max_bytes_in_flight: the most bytes held by snapshots not yet written. A save
        whose snapshot would exceed it waits for earlier saves to finish first (a single
        snapshot larger than it still proceeds, alone). ``None`` (default): one save at a
        time, a ``save`` waits for the previous write before it snapshots.
    :param reuse_buffers: copy NumPy leaves into the buffers of an earlier, finished
        snapshot when the sizes match (faster: no fresh memory to fault in). The
        checkpointer then keeps up to one snapshot's worth of host memory (or
        ``max_bytes_in_flight``) between saves; ``close()`` frees it.
    :param copy_threads: threads copying large NumPy arrays (default: up to 2).
    :param progress: default for every operation (see :class:`Checkpointer`).
    """

    def __init__(
        self,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        max_bytes_in_flight: int | None = None,
        reuse_buffers: bool = True,
        copy_threads: int | None = None,
        progress: ProgressArg = None,
    ) -> None:
        super().__init__(progress=progress)
        if timeout is not None and not timeout > 0:
            raise InvalidOptionError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
        if max_bytes_in_flight is not None and max_bytes_in_flight <= 0:
            raise InvalidOptionError(
                f"max_bytes_in_flight must be a positive number of bytes or None, not {max_bytes_in_flight!r}"
            )
        self._timeout = timeout
        self._limit = max_bytes_in_flight
        self._pool = _BufferPool() if reuse_buffers else None
        self._copy_threads = max(1, copy_threads if copy_threads is not None else min(2, os.cpu_count() or 1))
        self._writer = background.BackgroundWriter("ckptcore-async-save")
        self._bytes: dict[background.Job, int] = {}  # bytes each queued save holds
        self._urls: dict[background.Job, str] = {}
        self._save_lock = threading.Lock()  # one snapshot at a time per checkpointer
        self._table_lock = threading.Lock()
        _writers.add(self._writer)

    # -- saving ------------------------------------------------------------------------

    def save(
        self,
        path: str | os.PathLike[str],
        state: Any,
        *,
        force: bool = False,
        format: str | None = None,
        format_options: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        donate: bool = False,
        progress: ProgressArg = None,
    ) -> None:
        """Snapshot ``state`` and write it to ``path`` in the background; return once snapshotted.

        After it returns the caller may mutate or delete its NumPy arrays. With
        ``donate=True`` NumPy arrays are not copied: the caller hands them over and must
        not mutate them until :meth:`wait_until_finished` returns (blocking time is then
        only validation).

        Raises here (nothing written): an earlier background save's failure
        (:class:`~ckptcore.background.BackgroundWriteError`, original chained) or timeout,
        :class:`~ckptcore.errors.AlreadyExistsError`, an unsupported leaf, bad metadata.
        """
        self._check_open()
        with self._save_lock:
            self._writer.raise_errors()
            user_metadata = saving.check_json(dict(metadata or {}), "checkpoint metadata")
            location = storage.resolve(path, storage_options)
            self._check_target(location, force)
            self._make_room(_estimate_nbytes(state))
            self._writer.raise_errors()  # a save we just waited for may have failed

            snapshot = _Snapshot(self._pool, _copy_executor(self._copy_threads) if self._copy_threads > 1 else None)
            try:
                prepared = saving.prepare(state, copy=True, copy_array=_keep if donate else snapshot.copy)
                snapshot.finish()
            except BaseException:
                snapshot.abandon()
                raise
            chosen_progress = self._progress if progress is None else progress
            url = location.url

            def write() -> None:
                try:
                    with progress_lib.resolve(chosen_progress, f"saving {url}") as callback:
                        saving.write(
                            prepared, path, force=force, format=format, format_options=format_options,
                            metadata=user_metadata, storage_options=storage_options, progress=callback,
                            before_commit=background.check_deadline,
                        )
                finally:
                    snapshot.release()  # the write no longer reads the buffers

            with self._table_lock:
                try:
                    job = self._writer.enqueue(write, description=f"save to {url}", deadline=self._timeout)
                except BaseException:  # an earlier save failed meanwhile: raised now, this one is dropped
                    snapshot.release()
                    raise
                self._bytes[job] = prepared.nbytes
                self._urls[job] = url

    def _check_target(self, location: Any, force: bool) -> None:
        """Raise in the caller, not in the background, when the save cannot succeed anyway."""
        if force:
            return
        if any(u == location.url for _, u in self._in_flight(self._urls)):
            raise AlreadyExistsError(
                f"a save to {location.url} is already in progress in this checkpointer; pass force=True to "
                "replace it once written, or save elsewhere"
            )
        if storage.atomicity(location).is_committed(location):
            raise AlreadyExistsError(f"a checkpoint already exists at {location.url}; pass force=True to replace it")

    def _in_flight(self, table: dict[background.Job, Any]) -> list[tuple[background.Job, Any]]:
        pending = self._writer.pending()
        with self._table_lock:
            for job in [j for j in table if j not in pending]:
                del table[job]
            return [(j, table[j]) for j in pending if j in table]

    def _make_room(self, nbytes: int) -> None:
        """Wait for earlier saves until this one's snapshot fits in the byte budget."""
        while True:
            in_flight = self._in_flight(self._bytes)
            if not in_flight:
                return
            if self._limit is not None and sum(n for _, n in in_flight) + nbytes <= self._limit:
                return
            self._writer.wait_for(in_flight[0][0])  # the oldest frees its bytes first

    def _wait_for_saves_to(self, url: str) -> None:
        for job, saved_url in self._in_flight(self._urls):
            if saved_url == url:
                self._writer.wait_for(job)

    # -- waiting -----------------------------------------------------------------------

    def wait_until_finished(self, timeout: float | None = None) -> None:
        """Block until every save has committed; raise the first background failure.

        :param timeout: how long this call waits; on expiry it raises
            :class:`~ckptcore.errors.CheckpointTimeoutError` and the write keeps going (unlike
            the checkpointer's ``timeout``, after which a write is abandoned).
        """
        self._writer.wait(timeout)

    def is_saving_in_progress(self) -> bool:
        return self._writer.in_progress()

    def close(self) -> None:
        """Wait for saves in flight, raising their errors; then free the snapshot buffers."""
        if self._closed:
            return
        try:
            self._writer.close()
        finally:
            self._closed = True
            if self._pool is not None:
                self._pool.clear()


def _keep(value: np.ndarray) -> np.ndarray:
    return value


def _estimate_nbytes(state: Any) -> int:
    """Bytes of the array leaves of ``state``, without copying anything (0 if it cannot be walked)."""
    from ckptcore.io import leaves as arrays
    from ckptcore.tree.nodes import encode_tree

    total = 0

    def leaf(path: Any, value: Any) -> dict[str, Any]:
        nonlocal total
        if isinstance(value, np.ndarray) or arrays.is_jax_value(value):
            total += int(getattr(value, "nbytes", 0))
        return {}

    try:
        encode_tree(state, leaf)
    except CheckpointError:
        return 0  # prepare() raises the proper error
    return total


class _BufferPool:
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


class _Snapshot:
    """The copies of one save's NumPy leaves: into pooled buffers, large ones split across threads."""

    def __init__(self, pool: _BufferPool | None, executor: ThreadPoolExecutor | None) -> None:
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
        if self._executor is None or nbytes < _PARALLEL_COPY_MIN_BYTES or not value.flags.c_contiguous:
            np.copyto(out, value, casting="no")
            return out
        # Split the flat bytes: each piece is a plain memcpy with the GIL released.
        src, dst = value.reshape(-1).view(np.uint8), raw
        for start in range(0, nbytes, _COPY_CHUNK_BYTES):
            stop = min(start + _COPY_CHUNK_BYTES, nbytes)
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


def _copy_executor(threads: int) -> ThreadPoolExecutor:
    """Threads shared by every checkpointer for snapshot copies (a copy never waits on anything)."""
    global _executor
    with _executor_lock:
        if _executor is None or _executor._max_workers < threads:
            _executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckptcore-copy")
        return _executor


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
