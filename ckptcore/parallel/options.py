"""How the processes of a ``jax.distributed`` job cooperate on checkpoints (user options).

Plain data and context variables: importing this module never imports JAX.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ckptcore.errors import CheckpointError

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class MultiprocessOptions:
    """How the processes of a ``jax.distributed`` job cooperate on checkpoints.

    :param primary: the process that creates the staging location, writes the index,
        commits, decides for a manager and deletes old steps.
    :param processes: the JAX process indices taking part (default: all). Only they may
        call save/restore; arrays must live on their devices.
    :param timeout_s: the longest any process waits for another (covers the slowest
        process's writes); past it the wait fails with an error naming the late process.
    :param single_replica_restore: read each replicated array once (on the replica whose
        devices come first along ``replica_axis``) and broadcast it to the other replicas
        through JAX instead of every replica reading it from storage.
    :param replica_axis: the mesh axis along which arrays are replicated (default: the
        first mesh axis a leaf's partition spec does not use).
    """

    primary: int = 0
    processes: tuple[int, ...] | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    single_replica_restore: bool = False
    replica_axis: str | None = None


_default_options = MultiprocessOptions()
_options_var: contextvars.ContextVar[MultiprocessOptions | None] = contextvars.ContextVar(
    "ckptcore_multiprocess_options", default=None
)


def set_multiprocess_options(options: MultiprocessOptions | None = None, **changes: Any) -> MultiprocessOptions:
    """Set the process-wide multi-process options (``None``: the defaults); return them."""
    global _default_options
    base = options or MultiprocessOptions()
    _default_options = _replace_options(base, changes)
    return _default_options


@contextlib.contextmanager
def multiprocess_options(options: MultiprocessOptions | None = None, **changes: Any) -> Iterator[MultiprocessOptions]:
    """Use other multi-process options for the calls made inside the ``with`` block."""
    chosen = _replace_options(options or current_options(), changes)
    token = _options_var.set(chosen)
    try:
        yield chosen
    finally:
        _options_var.reset(token)


def current_options() -> MultiprocessOptions:
    return _options_var.get() or _default_options


def _replace_options(options: MultiprocessOptions, changes: Mapping[str, Any]) -> MultiprocessOptions:
    if "processes" in changes and changes["processes"] is not None:
        changes = {**changes, "processes": tuple(int(p) for p in changes["processes"])}
    try:
        return dataclasses.replace(options, **changes)
    except TypeError as exc:
        raise CheckpointError(f"unknown multi-process option: {exc}") from exc
