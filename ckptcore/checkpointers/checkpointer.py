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

import os
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Unpack

from ckptcore import api, storage
from ckptcore import progress as progress_lib
from ckptcore.api import SaveOptions
from ckptcore.checkpointers import background
from ckptcore.checkpointers.engine import AsyncSaveEngine
from ckptcore.errors import AlreadyExistsError, CheckpointerClosedError
from ckptcore.io import save as saving
from ckptcore.parallel.current import current_coordinator
from ckptcore.progress import ProgressArg

DEFAULT_TIMEOUT_S = 3600.0
"""How long a background write may run before it is abandoned (never committed)."""


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
        self, path: str | os.PathLike[str], state: Any, *, donate: bool = False, progress: ProgressArg = None,
        **options: Unpack[SaveOptions],
    ) -> None:
        """Save ``state`` to ``path`` atomically and return once it is committed (see :func:`ckptcore.save`).

        ``donate`` is accepted for interface compatibility: a synchronous save never copies.
        """
        self._check_open()
        api.save(path, state, progress=self._progress if progress is None else progress, **options)


class AsyncCheckpointer(_CheckpointerBase):
    """Snapshots in ``save`` and writes in the background; errors surface at the next call.

    The background half is :class:`~ckptcore.checkpointers.engine.AsyncSaveEngine`, the same
    engine a :class:`~ckptcore.CheckpointManager` with async checkpointing uses.

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
        self._engine = AsyncSaveEngine(
            "ckptcore-async-save", timeout=timeout, max_bytes_in_flight=max_bytes_in_flight,
            reuse_buffers=reuse_buffers, copy_threads=copy_threads,
        )
        self._save_lock = threading.Lock()  # one snapshot at a time per checkpointer

    def save(
        self, path: str | os.PathLike[str], state: Any, *, donate: bool = False, progress: ProgressArg = None,
        **options: Unpack[SaveOptions],
    ) -> None:
        """Snapshot ``state`` and write it to ``path`` in the background; return once snapshotted.

        After it returns the caller may mutate or delete its NumPy arrays. With
        ``donate=True`` NumPy arrays are not copied: the caller hands them over and must
        not mutate them until :meth:`wait_until_finished` returns (blocking time is then
        only validation).

        Raises here (nothing written): an earlier background save's failure
        (:class:`~ckptcore.errors.BackgroundWriteError`, original chained) or timeout,
        :class:`~ckptcore.errors.AlreadyExistsError`, an unsupported leaf, bad metadata.
        """
        self._check_open()
        engine = self._engine
        with self._save_lock:
            engine.raise_errors()
            write_options = api.write_options(options)
            force = bool(options.get("force", False))
            saving.check_json(dict(options.get("metadata") or {}), "checkpoint metadata")
            location = storage.resolve(path, options.get("storage_options"))
            self._check_target(location, force)
            engine.make_room(saving.estimate_nbytes(state))
            engine.raise_errors()  # a save we just waited for may have failed
            coordinator = current_coordinator()
            operation = coordinator.operation("save", "a collective save")  # every process in the same order
            prepared, snap = engine.snapshot(
                lambda copy_array: saving.snapshot(state, operation, copy=True, copy_array=copy_array), donate=donate
            )
            chosen_progress = self._progress if progress is None else progress

            def write() -> None:
                with progress_lib.resolve(chosen_progress, f"saving {location.url}") as callback:
                    saving.write(
                        prepared, location, operation=operation, coordinator=coordinator, progress=callback,
                        before_commit=background.check_deadline, **write_options,
                    )

            engine.submit(write, snap, nbytes=prepared.nbytes, key=location.url, description=f"save to {location.url}")

    def _check_target(self, location: Any, force: bool) -> None:
        """Raise in the caller, not in the background, when the save cannot succeed anyway."""
        if force:
            return
        if location.url in self._engine.keys_in_flight():
            raise AlreadyExistsError(
                f"a save to {location.url} is already in progress in this checkpointer; pass force=True to "
                "replace it once written, or save elsewhere"
            )
        if storage.atomicity(location).is_committed(location):
            raise AlreadyExistsError(f"a checkpoint already exists at {location.url}; pass force=True to replace it")

    def _wait_for_saves_to(self, url: str) -> None:
        self._engine.wait_for_key(url)

    # -- waiting -----------------------------------------------------------------------

    def wait_until_finished(self, timeout: float | None = None) -> None:
        """Block until every save has committed; raise the first background failure.

        :param timeout: how long this call waits; on expiry it raises
            :class:`~ckptcore.errors.CheckpointTimeoutError` and the write keeps going (unlike
            the checkpointer's ``timeout``, after which a write is abandoned).
        """
        self._engine.wait(timeout)

    def is_saving_in_progress(self) -> bool:
        return self._engine.in_progress()

    def close(self) -> None:
        """Wait for saves in flight, raising their errors; then free the snapshot buffers."""
        if self._closed:
            return
        try:
            self._engine.close()
        finally:
            self._closed = True
