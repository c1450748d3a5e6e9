"""Options of :class:`ckptcore.CheckpointManager`, named and meant as in orbax-checkpoint."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptcore.errors import InvalidOptionError
from ckptcore.manager import policies


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
    :param should_save_fn: ``(step, latest_step) -> bool``; replaces ``save_interval_steps`` and ``save_on_steps``.
    :param save_on_steps: also save these steps (a set, list or range), multiples of
        ``save_interval_steps`` or not.
    :param should_keep_fn: ``step -> bool``: also keep the steps it is true for.
    :param save_decision_policy: a :mod:`ckptcore.policies` save decision policy (or any object
        with ``should_save``); it replaces ``save_interval_steps``, ``save_on_steps`` and
        ``should_save_fn`` (giving one of those too is an error).
    :param preservation_policy: a :mod:`ckptcore.policies` preservation policy (or any object with
        ``should_preserve``); it replaces ``max_to_keep``, ``keep_period``, ``keep_time_interval``
        and ``should_keep_fn`` (giving one of those too is an error). ``best_fn`` may still be
        given: it then only ranks :meth:`~ckptcore.CheckpointManager.best_step`.

    The shorthands build policies (:meth:`effective_save_decision_policy`,
    :meth:`effective_preservation_policy`): ``save_interval_steps=k`` is
    ``FixedIntervalPolicy(k)``, ``save_on_steps`` is ``SpecificStepsPolicy``, and both come with
    ``InitialSavePolicy()`` in an ``AnySavePolicy`` (``should_save_fn`` alone is
    ``ShouldSaveFnPolicy``); ``keep_period`` is ``EveryNSteps``, ``keep_time_interval``
    ``EveryNSeconds``, ``max_to_keep`` ``LatestN`` (``BestN`` with ``best_fn``), ``should_keep_fn``
    ``ShouldKeepFnPolicy``, combined in an ``AnyPreservationPolicy``.
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
    save_on_steps: Collection[int] | None = None
    should_keep_fn: Callable[[int], bool] | None = None
    save_decision_policy: Any = None
    preservation_policy: Any = None

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
        seconds = self.keep_time_interval_secs
        if seconds is not None and not seconds > 0:
            raise InvalidOptionError(f"keep_time_interval must be None or > 0, got {self.keep_time_interval!r}")
        self._check_policies()
        if self.lease_ttl_secs <= 0:
            raise InvalidOptionError(f"lease_ttl_secs must be > 0, got {self.lease_ttl_secs}")
        if self.todelete_subdir is not None and (
            not self.todelete_subdir or "/" in self.todelete_subdir.strip("/") or self.todelete_subdir in (".", "..")
        ):
            raise InvalidOptionError(f"todelete_subdir must be one directory name, got {self.todelete_subdir!r}")

    def _check_policies(self) -> None:
        if self.save_decision_policy is not None:
            if not callable(getattr(self.save_decision_policy, "should_save", None)):
                raise InvalidOptionError(
                    f"save_decision_policy={self.save_decision_policy!r} is not a save decision policy (it has no "
                    "should_save() method); use one of ckptcore.policies, e.g. FixedIntervalPolicy(1000)"
                )
            given = [name for name, value in (("save_interval_steps", self.save_interval_steps != 1),
                                              ("save_on_steps", self.save_on_steps is not None),
                                              ("should_save_fn", self.should_save_fn is not None)) if value]
            if given:
                raise InvalidOptionError(
                    f"save_decision_policy replaces {', '.join(given)}: give one or the other (put them in the "
                    "policy, e.g. AnySavePolicy([FixedIntervalPolicy(k), SpecificStepsPolicy(steps), ...]))"
                )
        if self.preservation_policy is not None:
            if not callable(getattr(self.preservation_policy, "should_preserve", None)):
                raise InvalidOptionError(
                    f"preservation_policy={self.preservation_policy!r} is not a preservation policy (it has no "
                    "should_preserve() method); use one of ckptcore.policies, e.g. LatestN(3)"
                )
            given = [name for name in ("max_to_keep", "keep_period", "keep_time_interval", "should_keep_fn")
                     if getattr(self, name) is not None]
            if given:
                raise InvalidOptionError(
                    f"preservation_policy replaces {', '.join(given)}: give one or the other (put them in the "
                    "policy, e.g. AnyPreservationPolicy([LatestN(3), EveryNSteps(1000)]))"
                )
        if self.should_save_fn is not None and self.save_on_steps is not None:
            raise InvalidOptionError("should_save_fn replaces save_on_steps: give one or the other")
        for name in ("should_save_fn", "should_keep_fn", "best_fn"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise InvalidOptionError(f"{name} must be callable, got {value!r}")
        if self.save_on_steps is not None:
            try:
                policies.SpecificStepsPolicy(self.save_on_steps)
            except InvalidOptionError as exc:
                raise InvalidOptionError(f"save_on_steps={self.save_on_steps!r}: {exc}") from None
        try:  # the shorthands' values are checked by the policies they build
            self.effective_save_decision_policy()
            self.effective_preservation_policy()
        except InvalidOptionError as exc:
            raise InvalidOptionError(f"CheckpointManagerOptions: {exc}") from None

    def _cached(self, name: str, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        # Built once per value of the options it depends on (they may be changed after construction).
        cached = self.__dict__.get(name)
        if cached is not None and len(cached[0]) == len(key) and all(
            a is b or (type(a) is type(b) and not callable(a) and a == b) for a, b in zip(cached[0], key, strict=True)
        ):
            return cached[1]
        policy = build()
        self.__dict__[name] = (key, policy)
        return policy

    def effective_save_decision_policy(self) -> Any:
        """The save decision policy these options mean (``save_decision_policy``, or the one the shorthands build)."""
        key = (self.save_decision_policy, self.should_save_fn, self.save_interval_steps, self.save_on_steps)
        return self._cached("_save_decision_cache", key, self._build_save_decision_policy)

    def effective_preservation_policy(self) -> Any:
        """The preservation policy these options mean (``preservation_policy``, or the one the shorthands build)."""
        key = (self.preservation_policy, self.keep_period, self.keep_time_interval, self.best_fn, self.best_mode,
               self.max_to_keep, self.keep_checkpoints_without_metrics, self.should_keep_fn)
        return self._cached("_preservation_cache", key, self._build_preservation_policy)

    def _build_save_decision_policy(self) -> Any:
        if self.save_decision_policy is not None:
            return self.save_decision_policy
        if self.should_save_fn is not None:
            return policies.ShouldSaveFnPolicy(self.should_save_fn)
        built: list[Any] = []
        if self.save_interval_steps:
            built.append(policies.FixedIntervalPolicy(self.save_interval_steps))
        if self.save_on_steps is not None:
            built.append(policies.SpecificStepsPolicy(self.save_on_steps))
        built.append(policies.InitialSavePolicy())
        return built[0] if len(built) == 1 else policies.AnySavePolicy(built)

    def _build_preservation_policy(self) -> Any:
        if self.preservation_policy is not None:
            return self.preservation_policy
        built: list[Any] = []
        if self.keep_period is not None:
            built.append(policies.EveryNSteps(self.keep_period))
        if self.keep_time_interval_secs is not None:
            built.append(policies.EveryNSeconds(self.keep_time_interval_secs))
        if self.best_fn is not None:
            built.append(policies.BestN(
                self.max_to_keep, self.best_fn, self.best_mode,
                keep_checkpoints_without_metrics=self.keep_checkpoints_without_metrics,
            ))
        else:
            built.append(policies.LatestN(self.max_to_keep))
        if self.should_keep_fn is not None:
            built.append(policies.ShouldKeepFnPolicy(self.should_keep_fn))
        return built[0] if len(built) == 1 else policies.AnyPreservationPolicy(built)

    @property
    def keep_time_interval_secs(self) -> float | None:
        value = self.keep_time_interval
        if value is None:
            return None
        if isinstance(value, datetime.timedelta):
            return value.total_seconds()
        return float(value)
