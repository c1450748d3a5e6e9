"""Evaluators: follow the steps a training run commits, from another process or host.

``checkpoints_iterator`` yields every committed step once, in ascending order, and holds a
reader lease on the step while the caller's loop body runs, so the training run's
retention leaves it alone until the next step is asked for (or the loop ends). A step
retention deleted before the evaluator got to it is skipped; a step is never handed out
that retention then deletes while the loop body runs (the lease and retention's deletion
marks are a handshake: :mod:`ckptcore.storage.locks`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ckptcore import storage
from ckptcore.errors import CheckpointError
from ckptcore.manager.documents import read_root_file
from ckptcore.manager.listing import committed_steps
from ckptcore.plugins.registrations import AtomicCommit, Location
from ckptcore.storage import locks

log = logging.getLogger("ckptcore.manager.evaluation")


def _open(directory: str | os.PathLike[str], storage_options: Mapping[str, Any] | None) -> tuple[Location, AtomicCommit]:
    root = storage.resolve(directory, storage_options)
    return root, storage.atomicity(root)


def _prefixes(root: Location, step_prefix: str | None) -> tuple[str | None, ...]:
    try:
        doc = read_root_file(root)
    except CheckpointError:
        doc = None
    saved = doc.get("step_prefix") if doc else None
    return (step_prefix,) if saved == step_prefix else (step_prefix, saved)


def _wait(
    root: Location, strategy: AtomicCommit, last_step: int | None, timeout: float | None,
    seconds_to_sleep: float, step_prefix: str | None,
) -> int | None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        steps = committed_steps(root, strategy, _prefixes(root, step_prefix))
        newer = [s for s in steps if last_step is None or s > last_step]
        if newer:
            return min(newer)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(seconds_to_sleep, left))
        else:
            time.sleep(seconds_to_sleep)


def wait_for_new_checkpoint(
    directory: str | os.PathLike[str],
    last_step: int | None = None,
    *,
    timeout: float | None = None,
    seconds_to_sleep: float = 1.0,
    step_prefix: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> int | None:
    """The first committed step after ``last_step`` (any step when ``None``), waiting for one.

    Returns ``None`` when ``timeout`` seconds pass without one. Steps are named as the
    manager that wrote ``directory`` recorded (``step_prefix`` is only needed for
    directories without a manager root file).
    """
    root, strategy = _open(directory, storage_options)
    return _wait(root, strategy, last_step, timeout, seconds_to_sleep, step_prefix)


def checkpoints_iterator(
    directory: str | os.PathLike[str],
    *,
    timeout: float | None = None,
    timeout_fn: Callable[[], bool] | None = None,
    min_interval_secs: float = 0.0,
    seconds_to_sleep: float = 1.0,
    start_after: int | None = None,
    step_prefix: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    lease_ttl_secs: float = 30.0,
) -> Iterator[int]:
    """Yield each committed step of ``directory`` once, ascending, as training commits them.

    Like orbax-checkpoint's ``checkpoints_iterator``, except that every step is yielded
    (not only the newest) and the yielded step is protected from deletion while the loop
    body runs.

    :param timeout: seconds to wait for a new step; then, without ``timeout_fn``, stop.
    :param timeout_fn: called after a timeout: True stops, False waits again.
    :param min_interval_secs: at least this long between the starts of two yields.
    :param start_after: yield only steps after this one (resume an evaluator).
    :param lease_ttl_secs: lifetime of the reader lease (refreshed while held; a crashed
        evaluator blocks deletion of its step for at most this long).
    """
    root, strategy = _open(directory, storage_options)
    last = start_after
    while True:
        started = time.monotonic()
        step = _wait(root, strategy, last, timeout, seconds_to_sleep, step_prefix)
        if step is None:
            if timeout_fn is None or timeout_fn():
                return
            continue
        last = step
        try:
            lease: locks.Lease | None = locks.acquire_reader_lease(root, step, lease_ttl_secs, check_deleting=True)
        except locks.StepDeletingError:
            continue  # retention is deleting it: skip it, as a step deleted before the listing
        except Exception as exc:  # e.g. read-only credentials: evaluate unprotected rather than not at all
            log.warning("could not take a reader lease on step %d of %s (%s); retention may delete it while "
                        "it is read", step, root.url, exc)
            lease = None
        try:
            # Deleted between the listing and the lease (the lease waited for retention to
            # decide, see storage.locks)? Then it is gone for good: skip it. Otherwise the
            # lease keeps it until the caller asks for the next step.
            if step in committed_steps(root, strategy, _prefixes(root, step_prefix)):
                yield step
        finally:
            if lease is not None:
                lease.release()
        pause = min_interval_secs - (time.monotonic() - started)
        if pause > 0:
            time.sleep(pause)
