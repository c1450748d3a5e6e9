"""The coordinator: what one save or restore needs from the other processes, if any.

Saving and restoring are one walk for every case (see :mod:`ckptcore.io.save`). What differs
between one process and a ``jax.distributed`` job sits behind this small interface:

* an :class:`Operation` per collective call (a save, a manager step), created in the
  caller's thread so that background work keeps the order of the calls: ``broadcast``
  (the primary computes, everyone gets the value), ``gather`` (the primary gets every
  process's value) and ``fail`` (the others' waits fail at once instead of timing out);
* ``agree`` (one decision, the primary's, for every process) and ``primary_first`` (the
  primary does something, e.g. sets a directory up, before the others go on);
* ``writer_directory``: where this process's shards go inside an array format's directory;
* ``narrow_targets``: which part of a restore target this process reads itself;
* ``reached_preemption``: whether every process must save this step now.

:class:`LocalCoordinator` is the trivial one and imports nothing; :func:`current` picks the
JAX one (:mod:`ckptcore.parallel.jax_coordinator`) is chosen by
:func:`ckptcore.parallel.current.current_coordinator` only when a ``jax.distributed`` job of
several processes is running. The save and restore walks import this module alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ckptcore.parallel.options import current_options

T = TypeVar("T")
Widen = Callable[[Any], Any]


class Operation(Protocol):
    """One collective call: its messages, in the order every process makes them."""

    def broadcast(self, slot: str, compute: Callable[[], T]) -> T:
        """The primary runs ``compute`` and publishes the result; every process returns it (or its failure)."""
        ...

    def gather(self, slot: str, value: Any) -> list[Any] | None:
        """Every process publishes ``value``; the primary returns them all in process order, others ``None``."""
        ...

    def fail(self, exc: BaseException, *slots: str) -> None:
        """Publish this process's failure so the others stop waiting; never raises."""
        ...


def allgather(operation: Operation, slot: str, value: Any) -> list[Any]:
    """Every process's ``value``, in process order, on every process (a gather, then a broadcast)."""
    gathered = operation.gather(slot, value)
    everyone: list[Any] = operation.broadcast(f"{slot}/all", lambda: list(gathered or []))
    return everyone


class PrimaryFirst(Protocol):
    """Created on every process: the others wait in the constructor until the primary is ``done``."""

    def done(self) -> None: ...

    def failed(self, exc: BaseException) -> None: ...


class Coordinator(Protocol):
    """The processes taking part in checkpoint calls, and how they agree."""

    @property
    def process(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def is_primary(self) -> bool: ...

    @property
    def writer_directory(self) -> str:
        """The directory of this process's shards inside a format's directory ("" for a single writer)."""
        ...

    def operation(self, name: str, what: str = "") -> Operation: ...

    def agree(self, name: str, decide: Callable[[], T]) -> T: ...

    def primary_first(self, name: str) -> PrimaryFirst: ...

    def narrow_targets(self, target: Any) -> tuple[Any, Widen]: ...

    def reached_preemption(self, step: int) -> bool: ...


class _LocalOperation:
    def broadcast(self, slot: str, compute: Callable[[], T]) -> T:
        return compute()

    def gather(self, slot: str, value: Any) -> list[Any] | None:
        return [value]

    def fail(self, exc: BaseException, *slots: str) -> None:
        pass


class _Done:
    def done(self) -> None:
        pass

    def failed(self, exc: BaseException) -> None:
        pass


_LOCAL_OPERATION = _LocalOperation()
_DONE = _Done()


class LocalCoordinator:
    """One process: every decision is its own, every message goes nowhere."""

    process = 0
    size = 1
    is_primary = True
    writer_directory = ""

    def operation(self, name: str, what: str = "") -> Operation:
        return _LOCAL_OPERATION

    def agree(self, name: str, decide: Callable[[], T]) -> T:
        return decide()

    def primary_first(self, name: str) -> PrimaryFirst:
        return _DONE

    def narrow_targets(self, target: Any) -> tuple[Any, Widen]:
        return narrow_to_single_replica(target)

    def reached_preemption(self, step: int) -> bool:
        from ckptcore.parallel import preemption

        return preemption.reached_preemption_alone(step)


LOCAL = LocalCoordinator()


def narrow_to_single_replica(target: Any) -> tuple[Any, Widen]:
    """With ``single_replica_restore`` on and JAX in use: read replicated arrays once (see replicas)."""
    if target is None or not current_options().single_replica_restore or sys.modules.get("jax") is None:
        return target, _identity
    from ckptcore.parallel import replicas

    return replicas.single_replica_targets(target, current_options().replica_axis)


def _identity(value: Any) -> Any:
    return value
