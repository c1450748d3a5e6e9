"""Preemption: every process of a job saves the same step before it is stopped.

Backed by JAX's preemption sync manager when ``jax.distributed`` runs with one, and by a
SIGTERM handler otherwise (several processes then agree on the step through JAX's
key-value store).
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from typing import Any

from ckptcore.parallel.jax_coordinator import KEY_PREFIX, ProcessGroup, _jax_distributed, current_group


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
    if _sync_manager() is None:
        _sigterm.install()


def _sync_manager() -> Any:
    state = _jax_distributed()
    return getattr(state, "preemption_sync_manager", None) if state is not None else None


def reached_preemption(step: int, group: ProcessGroup | None = None) -> bool:
    """Whether every process should save ``step`` now because the job is being preempted.

    Call it at every step on every process. With ``jax.distributed`` and its preemption
    sync manager (the default), JAX agrees on the step (the first step after every process
    saw the notice). Otherwise a SIGTERM handler notices the signal; with several
    processes they agree through the key-value store on the largest step any of them
    reached when it saw the notice.
    """
    manager = _sync_manager()
    if manager is not None:
        return bool(manager.reached_sync_point(int(step)))
    _sigterm.install()
    group = group if group is not None else current_group()
    if group is None:
        return _sigterm.received
    return _kv_preemption(group, int(step))


@dataclass
class _KvPreemption:
    sync_step: int | None = None
    published: bool = False


_kv_state: dict[str, _KvPreemption] = {}


def _kv_preemption(group: ProcessGroup, step: int) -> bool:
    state = _kv_state.setdefault(group.tag, _KvPreemption())
    if state.sync_step is not None:
        return step == state.sync_step
    notice_key = f"{KEY_PREFIX}/{group.tag}/preemption/notice"
    if _sigterm.received and not state.published:
        try:
            group.client.key_value_set(notice_key, str(group.me))
        except Exception:  # another process published the notice first
            pass
        state.published = True
    try:
        noticed = group.client.key_value_try_get(notice_key)
    except Exception:  # NOT_FOUND: no process was told to stop
        noticed = None
    if noticed is None:
        return False
    # Everyone saw the notice: the sync step is the largest step any process is at now.
    scope = group.scope("preemption-sync", "agreeing on the preemption step")
    steps = scope.gather("step", step)
    state.sync_step = int(scope.broadcast("sync", lambda: max(steps or [step])))
    return step == state.sync_step


