"""Progress reporting for long saves and restores.

A progress callback is any ``callable(bytes_done, bytes_total)``. :func:`bar` gives one
that drives a rich progress bar; :func:`resolve` turns the ``progress=`` argument of the
checkpointers (``None``, ``True`` or a callback) into a context manager around one operation.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

from ckptcore.errors import InvalidOptionError

ProgressCallback = Callable[[int, int], None]
ProgressArg: TypeAlias = "ProgressCallback | bool | None"

# rich allows one live display per console at a time; a second bar (another checkpointer
# saving in the background) falls back to silence instead of failing the save.
_live_lock = threading.Lock()


@contextlib.contextmanager
def bar(description: str = "ckptcore", *, console: Any = None, transient: bool = False) -> Iterator[ProgressCallback]:
    """A rich progress bar (bytes, speed, elapsed time) for one operation; yields its callback.

    >>> with ckptcore.progress.bar("saving") as progress:   # doctest: +SKIP
    ...     ckptcore.save(path, state, progress=progress)
    """
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    if not _live_lock.acquire(blocking=False):
        yield _ignore
        return
    try:
        display = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeElapsedColumn(), console=console, transient=transient,
        )
        with display:
            task = display.add_task(description, total=None)

            def update(done: int, total: int) -> None:
                display.update(task, completed=done, total=total or None)

            yield update
    finally:
        _live_lock.release()


def _ignore(done: int, total: int) -> None:
    pass


class Recorder:
    """A callback that keeps every (done, total) it is called with (thread-safe); for tests and logs."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def __call__(self, done: int, total: int) -> None:
        with self._lock:
            self.calls.append((done, total))

    @property
    def last(self) -> tuple[int, int] | None:
        with self._lock:
            return self.calls[-1] if self.calls else None


def resolve(progress: ProgressArg, description: str) -> contextlib.AbstractContextManager[ProgressCallback | None]:
    """A context manager giving the callback for one operation: ``True`` shows a bar, a callable is used as is."""
    if progress is True:
        return bar(description)
    if progress is None or progress is False:
        return contextlib.nullcontext(None)
    if not callable(progress):
        raise InvalidOptionError(f"progress must be None, True or a callable(bytes_done, bytes_total), not {progress!r}")
    return contextlib.nullcontext(progress)
