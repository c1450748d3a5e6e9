"""One background thread that runs write jobs in order and never loses their errors.

The job's exception is kept and raised, with the original chained, at the next
``submit``, ``wait`` or ``close``: a background failure cannot go unnoticed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ckptcore.errors import CheckpointError, CheckpointTimeoutError


class BackgroundWriteError(CheckpointError):
    """A background save failed; the original exception is chained as ``__cause__``."""


class BackgroundWriter:
    """Runs one job at a time in a daemon thread; a new job waits for the previous one."""

    def __init__(self, name: str = "ckptcore-writer") -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._description = ""
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None], *, description: str, timeout: float | None = None) -> None:
        """Wait for the previous job (raising its error), then start ``job`` in the background."""
        self.wait(timeout)
        with self._lock:
            self._description = description
            self._thread = threading.Thread(target=self._run, args=(job,), name=self._name, daemon=True)
            self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # kept and re-raised in the caller's thread
            self._error = exc

    def in_progress(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current job ends; raise its error, if any, once."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise CheckpointTimeoutError(
                    f"background job {self._description!r} did not finish within {timeout} s; "
                    "storage may be hung. It keeps running; call wait_until_finished() again or close()."
                )
        error, self._error = self._error, None
        if error is not None:
            raise BackgroundWriteError(f"background job {self._description!r} failed: {error}") from error

    def close(self, timeout: float | None = None) -> None:
        self.wait(timeout)
