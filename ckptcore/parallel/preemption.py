"""Preemption: every process of a job saves the same step before it is stopped.

Backed by JAX's preemption sync manager when ``jax.distributed`` runs with one, and by a
SIGTERM handler otherwise. In a job of several processes without the sync manager, the
JAX coordinator agrees on the step through the key-value store
(:meth:`ckptcore.parallel.jax_coordinator.JaxCoordinator.reached_preemption`).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from ckptcore.parallel.jax_state import distributed_state


class _SigtermFlag:
    """Set by SIGTERM (for jobs without JAX's preemption sync manager)."""

    def __init__(self) -> None:
        self.received = False
        self.installed = False
        self._previous: Any = None

    def install(self) -> None:
        if self.installed or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self.installed = True

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True
        if callable(self._previous) and self._previous not in (signal.SIG_DFL, signal.SIG_IGN):
            self._previous(signum, frame)


_sigterm = _SigtermFlag()


def install_preemption_handler() -> None:
    """Start noticing SIGTERM now (before the first ``reached_preemption`` call)."""
    if sync_manager() is None:
        _sigterm.install()


def sigterm_received() -> bool:
    return _sigterm.received


def sync_manager() -> Any:
    """JAX's preemption sync manager, when a ``jax.distributed`` job runs with one."""
    state = distributed_state()
    return getattr(state, "preemption_sync_manager", None) if state is not None else None


def reached_preemption_alone(step: int) -> bool:
    """Whether this process (alone in its job) must save ``step`` now because it is being preempted."""
    manager = sync_manager()
    if manager is not None:
        return bool(manager.reached_sync_point(int(step)))
    _sigterm.install()
    return _sigterm.received
