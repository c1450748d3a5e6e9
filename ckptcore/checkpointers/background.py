"""Background jobs that run in order and never lose their errors.

A job's exception is kept and raised, with the original chained, at the next ``submit``,
``enqueue``, ``wait`` or ``close``: a background failure cannot go unnoticed.

A job may have a *deadline* (seconds from its start). A job past its deadline is
abandoned: whoever waits gets :class:`CheckpointTimeoutError` instead of hanging, later
jobs stop waiting for it, and :func:`check_deadline`, which a job calls right before it
commits, makes a late job abort instead of publishing a checkpoint nobody waits for.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from ckptcore.errors import BackgroundWriteError, CheckpointTimeoutError

_local = threading.local()


class Job:
    """One background job: its state, visible to the writer and (through :func:`current_job`) to itself."""

    def __init__(self, fn: Callable[[], None], description: str, deadline: float | None) -> None:
        self.fn = fn
        self.description = description
        self.deadline = deadline  # seconds from start; None: no deadline
        self.started: float | None = None  # time.monotonic() when it began running
        self.finished = False
        self.abandoned = False
        self.error: BaseException | None = None
        self.released = threading.Event()  # finished or abandoned: later jobs may start

    def expired(self, now: float | None = None) -> bool:
        if self.deadline is None or self.started is None or self.finished:
            return False
        return (time.monotonic() if now is None else now) - self.started > self.deadline

    def seconds_left(self, now: float) -> float | None:
        if self.deadline is None or self.started is None or self.finished:
            return None
        return self.started + self.deadline - now

    def timeout_error(self) -> CheckpointTimeoutError:
        return CheckpointTimeoutError(
            f"background job {self.description!r} did not finish within its deadline of {self.deadline} s and was "
            "abandoned: it will not be committed. The storage may be hung or too slow; raise the timeout "
            "(AsyncCheckpointer(timeout=...)) if the data is that large, then save again."
        )


def current_job() -> Job | None:
    """The job running in this thread, if this is a background job's thread."""
    return getattr(_local, "job", None)


def check_deadline() -> None:
    """Raise :class:`CheckpointTimeoutError` if the calling job was abandoned or is past its deadline.

    A job calls it right before an irreversible step (a commit); outside a job it does nothing.
    """
    job = current_job()
    if job is not None and (job.abandoned or job.expired()):
        raise job.timeout_error()


class BackgroundWriter:
    """Runs jobs one after the other, each in its own daemon thread, in submission order.

    ``submit`` waits for the previous jobs first (one job at a time); ``enqueue`` queues
    behind them without waiting (the caller bounds how many it queues).

    Each job gets its own thread so that a hung job, once abandoned, holds up nobody. The
    threads are started by one long-lived starter thread, not by the caller:
    ``Thread.start()`` waits until the new thread runs, which under a busy GIL (the previous
    save still writing) costs the caller several switch intervals of blocking time.
    """

    def __init__(self, name: str = "ckptcore-writer") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._jobs: list[Job] = []  # not yet released, or released with an error not yet raised
        self._to_start: queue.SimpleQueue[tuple[Job, Job | None]] = queue.SimpleQueue()
        self._starter: threading.Thread | None = None

    def submit(self, job: Callable[[], None], *, description: str, timeout: float | None = None) -> None:
        """Wait for the previous jobs (raising their errors), then start ``job`` in the background."""
        self.wait(timeout)
        self.enqueue(job, description=description)

    def enqueue(self, fn: Callable[[], None], *, description: str, deadline: float | None = None) -> Job:
        """Queue ``fn`` behind the jobs already queued and return at once (after raising any error already known).

        :param deadline: seconds ``fn`` may run once started before it is abandoned.
        """
        self.raise_errors()
        job = Job(fn, description, deadline)
        with self._cond:
            previous = next((j for j in reversed(self._jobs) if not j.released.is_set()), None)
            self._jobs.append(job)
            self._to_start.put((job, previous))
            if self._starter is None or not self._starter.is_alive():  # the first job (or after a fork)
                self._starter = threading.Thread(target=self._start_jobs, name=f"{self._name}-starter", daemon=True)
                self._starter.start()
        return job

    def _start_jobs(self) -> None:
        while True:
            job, previous = self._to_start.get()
            threading.Thread(target=self._run, args=(job, previous), name=self._name, daemon=True).start()

    def _run(self, job: Job, previous: Job | None) -> None:
        if previous is not None:
            previous.released.wait()
        with self._cond:
            job.started = time.monotonic()
            self._cond.notify_all()  # a waiter's nap now ends at this job's deadline
        _local.job = job
        error: BaseException | None = None
        try:
            job.fn()
        except BaseException as exc:  # kept and re-raised in the caller's thread
            error = exc
        finally:
            _local.job = None
        with self._cond:
            job.finished = True
            if not job.abandoned:  # an abandoned job's fate was already reported as a timeout
                job.error = error
            job.released.set()
            self._cond.notify_all()

    # -- state -------------------------------------------------------------------------

    def in_progress(self) -> bool:
        with self._cond:
            self._abandon_expired()
            return any(not j.released.is_set() for j in self._jobs)

    def pending(self) -> list[Job]:
        """The jobs queued or running (not yet released), oldest first."""
        with self._cond:
            self._abandon_expired()
            return [j for j in self._jobs if not j.released.is_set()]

    def _abandon_expired(self) -> None:
        # Called with the lock held.
        now = time.monotonic()
        for j in self._jobs:
            if not j.released.is_set() and j.expired(now):
                j.abandoned = True
                j.error = j.timeout_error()
                j.released.set()
                self._cond.notify_all()

    def raise_errors(self) -> None:
        """Raise the error of jobs already failed or past their deadline, without waiting for running ones."""
        with self._cond:
            self._abandon_expired()
            self._raise_released_errors()

    def _raise_released_errors(self) -> None:
        # Called with the lock held; forgets released jobs, raising the first error once.
        failed = [j for j in self._jobs if j.released.is_set() and j.error is not None]
        self._jobs = [j for j in self._jobs if not j.released.is_set()]
        if not failed:
            return
        first = failed[0]
        error = first.error
        assert error is not None
        others = "".join(f"; also failed: {j.description!r}: {j.error}" for j in failed[1:])
        if isinstance(error, CheckpointTimeoutError) and first.abandoned:
            raise CheckpointTimeoutError(f"{error}{others}")
        raise BackgroundWriteError(
            f"background job {first.description!r} failed: {type(error).__name__}: {error}{others}"
        ) from error

    # -- waiting -----------------------------------------------------------------------

    def _wait_until(self, done: Callable[[], bool], timeout: float | None, what: str) -> None:
        """Wait (lock held) until ``done()``, abandoning jobs past their deadline meanwhile."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            self._abandon_expired()
            if done():
                return
            now = time.monotonic()
            waits = [j.seconds_left(now) for j in self._jobs if not j.released.is_set()]
            nap = min((w for w in waits if w is not None), default=None)
            if end is not None:
                if now >= end:
                    raise CheckpointTimeoutError(
                        f"{what} did not finish within {timeout} s; it keeps running: call "
                        "wait_until_finished() again, or close()"
                    )
                nap = end - now if nap is None else min(nap, end - now)
            self._cond.wait(None if nap is None else max(nap, 0.0) + 0.001)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every queued job ends; raise the first error, if any, once."""
        with self._cond:
            running = [j for j in self._jobs if not j.released.is_set()]
            what = f"background job {running[-1].description!r}" if running else "background work"
            self._wait_until(lambda: all(j.released.is_set() for j in self._jobs), timeout, what)
            self._raise_released_errors()

    def wait_for(self, job: Job, timeout: float | None = None) -> None:
        """Block until ``job`` is finished or abandoned; its error is left for the next ``wait``."""
        with self._cond:
            self._wait_until(job.released.is_set, timeout, f"background job {job.description!r}")

    def close(self, timeout: float | None = None) -> None:
        self.wait(timeout)
