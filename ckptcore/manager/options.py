"""Options of :class:`ckptcore.CheckpointManager`, named and meant as in orbax-checkpoint."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptcore.errors import InvalidOptionError


@dataclass
class CheckpointManagerOptions:
    """How a manager names, saves, keeps and deletes steps.

    The first group has orbax-checkpoint's names and meanings:

    :param save_interval_steps: ``save`` writes only steps that are a multiple of this (and
        the first step of a run with no steps yet). ``force=True`` overrides it.
    :param max_to_keep: keep this many steps (the newest, or the best with ``best_fn``); ``None`` keeps all.
    :param keep_time_interval: also keep a step whenever this much time (``timedelta`` or
        seconds) passed since the last step kept this way.
    :param keep_period: also keep every step that is a multiple of this.
    :param best_fn: metrics -> number; with it, ``max_to_keep`` keeps the best steps.
    :param best_mode: ``"max"`` or ``"min"``: whether a higher or a lower ``best_fn`` is better.
    :param keep_checkpoints_without_metrics: with ``best_fn``, never delete steps saved without metrics.
    :param should_save_fn: ``(step, latest_step) -> bool``; replaces ``save_interval_steps``.
    :param step_prefix: step directories are ``<prefix>_<step>`` (else ``<step>``).
    :param step_format_fixed_length: zero-pad step numbers to this many digits.
    :param create: create the directory when it does not exist.
    :param cleanup_tmp_directories: remove leftovers of interrupted saves when the manager starts.
    :param read_only: refuse every save and delete (restore only); takes no writer lock.
    :param enable_async_checkpointing: ``save`` returns once the state is snapshotted; the write,
        commit and retention run in a background thread.
    :param enable_background_delete: retention deletes run in a background thread after commit.
    :param todelete_subdir: move deleted steps into this subdirectory instead of deleting them.

    ckptcore's own:

    :param array_format: the array format of pytree items (default: the plugins' default, ``ocdbt``).
    :param format_options: options of the array format.
    :param storage_options: options of the storage plugin (endpoint, credentials...).
    :param save_timeout: the write deadline of a background step save, as ``AsyncCheckpointer(timeout=...)``:
        a step still writing after this many seconds is abandoned (never committed) and the next
        ``save``, ``wait_until_finished`` or ``close`` raises ``CheckpointTimeoutError``; so it also
        bounds how long a save waits for the previous one. ``None``: no deadline.
    :param writer_lock: take the directory's writer lock (a lease file) so that a second
        writing manager gets :class:`ckptcore.errors.ConcurrentWriterError`.
    :param lease_ttl_secs: lifetime of writer and reader lease files; they are refreshed
        every third of it, so a crashed process blocks others for at most this long.
    """

    save_interval_steps: int = 1
    max_to_keep: int | None = None
    keep_time_interval: datetime.timedelta | float | None = None
    keep_period: int | None = None
    best_fn: Callable[[Any], float] | None = None
    best_mode: str = "max"
    keep_checkpoints_without_metrics: bool = True
    should_save_fn: Callable[[int, int | None], bool] | None = None
    step_prefix: str | None = None
    step_format_fixed_length: int | None = None
    create: bool = True
    cleanup_tmp_directories: bool = False
    read_only: bool = False
    enable_async_checkpointing: bool = True
    enable_background_delete: bool = False
    todelete_subdir: str | None = None
    array_format: str | None = None
    format_options: Mapping[str, Any] | None = None
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    save_timeout: float | None = None
    writer_lock: bool = True
    lease_ttl_secs: float = 30.0

    def __post_init__(self) -> None:
        if self.best_mode not in ("min", "max"):
            raise InvalidOptionError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.max_to_keep is not None and self.max_to_keep < 0:
            raise InvalidOptionError(f"max_to_keep must be None or >= 0, got {self.max_to_keep}")
        if self.save_interval_steps is not None and self.save_interval_steps < 0:
            raise InvalidOptionError(f"save_interval_steps must be >= 0, got {self.save_interval_steps}")
        if self.keep_period is not None and self.keep_period <= 0:
            raise InvalidOptionError(f"keep_period must be None or > 0, got {self.keep_period}")
        if self.step_format_fixed_length is not None and self.step_format_fixed_length <= 0:
            raise InvalidOptionError(f"step_format_fixed_length must be None or > 0, got {self.step_format_fixed_length}")
        if self.lease_ttl_secs <= 0:
            raise InvalidOptionError(f"lease_ttl_secs must be > 0, got {self.lease_ttl_secs}")
        if self.todelete_subdir is not None and (
            not self.todelete_subdir or "/" in self.todelete_subdir.strip("/") or self.todelete_subdir in (".", "..")
        ):
            raise InvalidOptionError(f"todelete_subdir must be one directory name, got {self.todelete_subdir!r}")

    @property
    def keep_time_interval_secs(self) -> float | None:
        value = self.keep_time_interval
        if value is None:
            return None
        if isinstance(value, datetime.timedelta):
            return value.total_seconds()
        return float(value)
