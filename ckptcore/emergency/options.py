"""The options of an emergency checkpoint manager, the report of its restores, and its error."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptcore.errors import CheckpointError, InvalidOptionError


class EmergencyRestoreError(CheckpointError):
    """A step cannot be restored from any tier; the message names the processes and the step."""


@dataclass(frozen=True)
class Options:
    """How often each tier saves, how many steps each keeps, and how many peers keep a copy.

    :param local_every: save the local tier every this many steps.
    :param persistent_every: save the persistent tier every this many steps.
    :param local_max_to_keep: local steps kept per process (keep at least 2, so that a save
        interrupted on one process leaves a step every process still holds).
    :param persistent_max_to_keep: persistent steps kept (``None``: all).
    :param replicas: how many peers keep a copy of each process's local shards (process
        ``p``'s go to ``p + 1``, ..., ``p + replicas``); capped at the job size minus one.
    :param run_id: the run the local directories belong to (default: an id created once in
        the persistent directory); a local step of another run is never used.
    :param save_timeout: seconds a background write of either tier may take.
    :param array_format: the array format of both tiers (default: the registry's default).
    :param persistent_options: extra :class:`ckptcore.CheckpointManagerOptions` fields for
        the persistent tier (e.g. ``{"keep_period": 10000}``).
    :param storage_options: storage options of the persistent tier (``endpoint``, ``retries``...).
    :param replica_timeout: seconds a background write waits for a peer's replica (a local
        step is then saved without it, logged) and a restore waits for a handed-over view.
    :param replica_address: the address this process's replica channel listens on, which its
        peers must reach (default: this host's address on the route to the ``jax.distributed``
        coordinator).
    """

    local_every: int = 10
    persistent_every: int = 100
    local_max_to_keep: int = 2
    persistent_max_to_keep: int | None = 3
    replicas: int = 1
    run_id: str | None = None
    save_timeout: float | None = 3600.0
    array_format: str | None = None
    persistent_options: Mapping[str, Any] = field(default_factory=dict)
    storage_options: Mapping[str, Any] | None = None
    replica_timeout: float = 300.0
    replica_address: str | None = None

    def __post_init__(self) -> None:
        for name in ("local_every", "persistent_every", "local_max_to_keep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidOptionError(f"emergency Options.{name} must be a positive integer, not {value!r}")
        if not isinstance(self.replicas, int) or self.replicas < 0:
            raise InvalidOptionError(f"emergency Options.replicas must be a non-negative integer, not {self.replicas!r}")
        if not isinstance(self.replica_timeout, int | float) or not self.replica_timeout > 0:
            raise InvalidOptionError(
                f"emergency Options.replica_timeout must be a positive number of seconds, not {self.replica_timeout!r}"
            )


@dataclass(frozen=True)
class RestoreInfo:
    """What a restore did: the step, the tier, why, and where each process's data came from.

    ``sources[p]`` is ``"local"`` (process ``p``'s own local tier), ``"replica on process q"``
    (handed over from the peer ``q``) or ``"persistent"``.
    """

    step: int
    tier: str
    reason: str
    sources: Mapping[int, str]
    seconds: float
