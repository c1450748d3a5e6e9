"""When a manager saves and which steps it keeps: orbax-checkpoint's policy objects.

The names, arguments and meanings are orbax-checkpoint's
(``orbax.checkpoint.checkpoint_managers``), so a policy written for orbax reads the same
here; ``tests/test_policies_parity.py`` runs orbax's manager with orbax's classes next to
ckptcore's with these, on the same histories, and compares saved and kept steps.

* A **save decision policy** answers ``should_save(step, previous_steps, *, context)``:
  ``step`` is the step about to be saved (a :class:`PolicyCheckpointInfo` with the time now
  and no metrics), ``previous_steps`` the manager's steps (ascending, a step still being
  saved included), ``context`` a :class:`DecisionContext`.
* A **preservation policy** answers ``should_preserve(checkpoints, *, context)`` with one
  boolean per step (ascending); the steps it does not preserve are deleted.

Any object with that method is a policy (write your own); ``AnySavePolicy`` and
``AnyPreservationPolicy`` combine them. The options ``save_interval_steps``,
``save_on_steps``, ``should_save_fn``, ``max_to_keep``, ``keep_period``,
``keep_time_interval``, ``best_fn`` and ``should_keep_fn`` of
:class:`ckptcore.CheckpointManagerOptions` are shorthands that build these
(:meth:`~ckptcore.CheckpointManagerOptions.effective_save_decision_policy`).

Arguments are checked when a policy is made: an impossible one (a negative count, an
interval of 0, an empty combination) is an :class:`ckptcore.errors.InvalidOptionError`
naming the policy and the argument.
"""

from __future__ import annotations

import datetime
import logging
import math
import operator
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ckptcore.errors import InvalidOptionError

log = logging.getLogger("ckptcore.manager.policies")

__all__ = [
    "AnyPreservationPolicy",
    "AnySavePolicy",
    "BestN",
    "ContinuousCheckpointingPolicy",
    "CustomSteps",
    "DecisionContext",
    "EveryNSeconds",
    "EveryNSteps",
    "EveryNStepsClosest",
    "FixedIntervalPolicy",
    "InitialSavePolicy",
    "LatestDuration",
    "LatestN",
    "PolicyCheckpointInfo",
    "PreemptionCheckpointingPolicy",
    "PreservationContext",
    "PreservationPolicy",
    "PreserveAll",
    "SaveDecisionPolicy",
    "ShouldKeepFnPolicy",
    "ShouldSaveFnPolicy",
    "SpecificStepsPolicy",
]


def now() -> float:
    """The managers' clock (seconds since the epoch): commit times, ``should_save``'s "now",
    ``LatestDuration``'s "now". One function, so a test can replace it."""
    return time.time()


def to_datetime(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


# -- what a policy is given ----------------------------------------------------------------


@dataclass(frozen=True)
class PolicyCheckpointInfo:
    """One step as a policy sees it (orbax's ``PolicyCheckpointInfo``).

    :param step: the step number.
    :param time: when it was committed (for the step being decided: now), timezone-aware UTC.
    :param metrics: the ``metrics=`` it was saved with, or ``None``.
    """

    step: int
    time: datetime.datetime
    metrics: Any = None


@dataclass(frozen=True, kw_only=True)
class DecisionContext:
    """What a save decision may depend on besides the steps.

    :param is_saving_in_progress: a background save (or delete) of this manager is running.
    :param reached_preemption: the job is being preempted: save this step (asked only when the
        policy holds a :class:`PreemptionCheckpointingPolicy`; else ``False``).
    """

    is_saving_in_progress: bool = False
    reached_preemption: bool = False


@dataclass(frozen=True, kw_only=True)
class PreservationContext:
    """What a preservation decision may depend on besides the steps (nothing yet, as in orbax)."""


@runtime_checkable
class SaveDecisionPolicy(Protocol):
    """Decides whether a step is saved."""

    def should_save(
        self, step: PolicyCheckpointInfo, previous_steps: Sequence[PolicyCheckpointInfo], *, context: DecisionContext
    ) -> bool: ...


@runtime_checkable
class PreservationPolicy(Protocol):
    """Decides which steps are kept."""

    def should_preserve(
        self, checkpoints: Sequence[PolicyCheckpointInfo], *, context: PreservationContext
    ) -> Sequence[bool]: ...


# -- argument checks -------------------------------------------------------------------------


def _count(policy: str, name: str, value: Any, *, minimum: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise InvalidOptionError(
            f"{policy}({name}={value!r}): {name} must be an integer >= {minimum}"
            + (" or None" if optional else "")
        ) from None
    if number < minimum:
        raise InvalidOptionError(
            f"{policy}({name}={value!r}): {name} must be >= {minimum}" + (" (or None)" if optional else "")
        )
    return number


def _seconds(policy: str, name: str, value: Any, *, positive: bool, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise InvalidOptionError(f"{policy}({name}={value!r}): {name} must be a number of seconds or a timedelta")
    if math.isnan(seconds) or seconds < 0 or (positive and seconds == 0):
        raise InvalidOptionError(f"{policy}({name}={value!r}): {name} must be {'> 0' if positive else '>= 0'}")
    return seconds


def _steps(policy: str, name: str, value: Any) -> Collection[int]:
    if isinstance(value, range):
        if len(value) and min(value) < 0:
            raise InvalidOptionError(f"{policy}({name}={value!r}): steps are non-negative integers")
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidOptionError(f"{policy}({name}={value!r}): {name} must be a collection of step numbers")
    steps = set()
    for item in value:
        try:
            number = operator.index(item)
        except TypeError:
            number = -1
        if isinstance(item, bool) or number < 0:
            raise InvalidOptionError(f"{policy}({name}=...): {item!r} is not a step (a non-negative integer)")
        steps.add(number)
    return frozenset(steps)


def _callable(policy: str, name: str, value: Any) -> Callable[..., Any]:
    if not callable(value):
        raise InvalidOptionError(f"{policy}({name}={value!r}): {name} must be callable")
    return value  # type: ignore[no-any-return]


def _children(policy: str, value: Any, method: str) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidOptionError(f"{policy}(policies={value!r}): policies must be a sequence of policies")
    children = tuple(value)
    if not children:
        raise InvalidOptionError(f"{policy}(policies=[]): give at least one policy")
    for child in children:
        if not callable(getattr(child, method, None)):
            raise InvalidOptionError(
                f"{policy}(policies=...): {child!r} is not a policy (it has no {method}() method)"
            )
    return children


# -- save decisions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FixedIntervalPolicy:
    """Save every step that is a multiple of ``interval`` (100: steps 0, 100, 200...)."""

    interval: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "interval", _count("FixedIntervalPolicy", "interval", self.interval, minimum=1))

    def should_save(
        self, step: PolicyCheckpointInfo, previous_steps: Sequence[PolicyCheckpointInfo], *, context: DecisionContext
    ) -> bool:
        return step.step % self.interval == 0


@dataclass(frozen=True)
class SpecificStepsPolicy:
    """Save exactly the steps in ``steps`` (a set, list or range of step numbers)."""

    steps: Collection[int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", _steps("SpecificStepsPolicy", "steps", self.steps))

    def should_save(
        self, step: PolicyCheckpointInfo, previous_steps: Sequence[PolicyCheckpointInfo], *, context: DecisionContext
    ) -> bool:
        return step.step in self.steps


@dataclass(frozen=True)
class ContinuousCheckpointingPolicy:
    """Save whenever no save is in flight, at most once every ``minimum_interval_secs``.

    The interval counts from the time of the newest step (its commit, or now for one still
    being saved). ``None``: save again as soon as the previous save finished. With several
    processes the primary decides for all (the manager agrees on every save decision).
    """

    minimum_interval_secs: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "minimum_interval_secs", _seconds(
            "ContinuousCheckpointingPolicy", "minimum_interval_secs", self.minimum_interval_secs,
            positive=False, optional=True,
        ))

    def should_save(
        self, step: PolicyCheckpointInfo, previous_steps: Sequence[PolicyCheckpointInfo], *, context: DecisionContext
    ) -> bool:
        if context.is_saving_in_progress:
            return False
        if not previous_steps or self.minimum_interval_secs is None:
            return True
        return step.time - previous_steps[-1].time >= datetime.timedelta(seconds=self.minimum_interval_secs)


@dataclass(frozen=True)
class PreemptionCheckpointingPolicy:
    """Save the step at which the job is being preempted (see ``CheckpointManager.reached_preemption``).

    Only a manager whose policy holds this one asks about preemption: JAX's preemption sync
    manager in a ``jax.distributed`` job, else a SIGTERM handler it installs.
    """

    def should_save(
        self, step: PolicyCheckpointInfo, previous_steps: Sequence[PolicyCheckpointInfo], *, context: DecisionContext
    ) -> bool:
        return context.reached_preemption


@dataclass(frozen=True)
class InitialSavePolicy:
    """Save the first step of a run that has no step yet (not the first step after a restart)."""

    def should_save(
        self, step: PolicyCheckpointInfo, previous_steps: Sequence[PolicyCheckpointInfo], *, context: DecisionContext
    ) -> bool:
        return not previous_steps


@dataclass(frozen=True)
class ShouldSaveFnPolicy:
    """Save when ``should_save_fn(step, latest_step)`` is true (``latest_step``: ``None`` before the first).

    What the ``should_save_fn`` option builds (orbax's private ``_ShouldSaveFnPolicy``).
    """

    should_save_fn: Callable[[int, int | None], bool]

    def __post_init__(self) -> None:
        _callable("ShouldSaveFnPolicy", "should_save_fn", self.should_save_fn)

    def should_save(
        self, step: PolicyCheckpointInfo, previous_steps: Sequence[PolicyCheckpointInfo], *, context: DecisionContext
    ) -> bool:
        return bool(self.should_save_fn(step.step, previous_steps[-1].step if previous_steps else None))


@dataclass(frozen=True)
class AnySavePolicy:
    """Save when any of ``policies`` says so (evaluated in order, stopping at the first yes)."""

    policies: Sequence[Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "policies", _children("AnySavePolicy", self.policies, "should_save"))

    def should_save(
        self, step: PolicyCheckpointInfo, previous_steps: Sequence[PolicyCheckpointInfo], *, context: DecisionContext
    ) -> bool:
        return any(bool(p.should_save(step, previous_steps, context=context)) for p in self.policies)


# -- preservation ------------------------------------------------------------------------------


def _latest_of(flags: list[bool], max_to_keep: int | None) -> list[bool]:
    """Of the steps ``flags`` keeps, only the newest ``max_to_keep``."""
    if max_to_keep is None:
        return flags
    kept = [i for i, keep in enumerate(flags) if keep]
    for i in kept[: max(len(kept) - max_to_keep, 0)]:
        flags[i] = False
    return flags


@dataclass(frozen=True)
class PreserveAll:
    """Keep every step."""

    def should_preserve(
        self, checkpoints: Sequence[PolicyCheckpointInfo], *, context: PreservationContext
    ) -> Sequence[bool]:
        return [True] * len(checkpoints)


@dataclass(frozen=True)
class LatestN:
    """Keep the newest ``n`` steps (all with ``None``, none with 0)."""

    n: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", _count("LatestN", "n", self.n, minimum=0, optional=True))

    def should_preserve(
        self, checkpoints: Sequence[PolicyCheckpointInfo], *, context: PreservationContext
    ) -> Sequence[bool]:
        if self.n is None or len(checkpoints) <= self.n:
            return [True] * len(checkpoints)
        return [False] * (len(checkpoints) - self.n) + [True] * self.n


@dataclass(frozen=True)
class EveryNSeconds:
    """Keep the first step, then each step committed at least ``interval_secs`` after the last one kept so."""

    interval_secs: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "interval_secs", _seconds(
            "EveryNSeconds", "interval_secs", self.interval_secs, positive=True))

    def should_preserve(
        self, checkpoints: Sequence[PolicyCheckpointInfo], *, context: PreservationContext
    ) -> Sequence[bool]:
        if not checkpoints:
            return []
        interval = datetime.timedelta(seconds=self.interval_secs)
        anchor, out = checkpoints[0].time, [True]
        for info in checkpoints[1:]:
            keep = info.time - anchor >= interval
            if keep:
                anchor = info.time
            out.append(keep)
        return out


@dataclass(frozen=True)
class EveryNSteps:
    """Keep every step that is a multiple of ``interval_steps``.

    With ``exact_interval=False``: the first step, then each step at least ``interval_steps``
    after the last one kept so. ``max_to_keep``: only the newest that many of those.
    """

    interval_steps: int
    exact_interval: bool = True
    max_to_keep: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "interval_steps", _count("EveryNSteps", "interval_steps", self.interval_steps, minimum=1))
        object.__setattr__(self, "max_to_keep", _count(
            "EveryNSteps", "max_to_keep", self.max_to_keep, minimum=1, optional=True))

    def should_preserve(
        self, checkpoints: Sequence[PolicyCheckpointInfo], *, context: PreservationContext
    ) -> Sequence[bool]:
        if self.exact_interval:
            flags = [c.step % self.interval_steps == 0 for c in checkpoints]
        else:
            flags, previous = [], None
            for c in checkpoints:
                keep = previous is None or c.step - previous >= self.interval_steps
                if keep:
                    previous = c.step
                flags.append(keep)
        return _latest_of(flags, self.max_to_keep)


@dataclass(frozen=True)
class EveryNStepsClosest:
    """For each multiple ``k * interval_steps``, keep the step closest to it (the later on a tie), and the newest step.

    Unlike ``EveryNSteps(exact_interval=False)`` it does not drift when steps are irregular.
    ``max_to_keep``: only the newest that many of those.
    """

    interval_steps: int
    max_to_keep: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "interval_steps", _count(
            "EveryNStepsClosest", "interval_steps", self.interval_steps, minimum=1))
        object.__setattr__(self, "max_to_keep", _count(
            "EveryNStepsClosest", "max_to_keep", self.max_to_keep, minimum=1, optional=True))

    def should_preserve(
        self, checkpoints: Sequence[PolicyCheckpointInfo], *, context: PreservationContext
    ) -> Sequence[bool]:
        if not checkpoints:
            return []
        closest: dict[int, tuple[int, int]] = {}  # multiple -> (distance, index)
        for i, c in enumerate(checkpoints):
            k = round(c.step / self.interval_steps)  # Python rounds half to even, as orbax does
            distance = abs(c.step - k * self.interval_steps)
            if k not in closest or distance <= closest[k][0]:
                closest[k] = (distance, i)
        flags = [False] * len(checkpoints)
        for _, i in closest.values():
            flags[i] = True
        flags[-1] = True
        return _latest_of(flags, self.max_to_keep)


@dataclass(frozen=True)
class CustomSteps:
    """Keep exactly the steps in ``steps``."""

    steps: Collection[int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", _steps("CustomSteps", "steps", self.steps))

    def should_preserve(
        self, checkpoints: Sequence[PolicyCheckpointInfo], *, context: PreservationContext
    ) -> Sequence[bool]:
        return [c.step in self.steps for c in checkpoints]


@dataclass(frozen=True)
class BestN:
    """Keep the ``n`` best steps by ``get_metric_fn(metrics)`` (all with ``None``, none with 0).

    ``BestN(3, lambda m: m["loss"], "min")``, or with orbax's keywords
    ``BestN(get_metric_fn=..., reverse=True, n=3)``: ``mode="min"`` is ``reverse=True`` (a lower
    value is better), ``mode="max"`` (the default) is ``reverse=False``. Steps saved without
    metrics are kept when ``keep_checkpoints_without_metrics`` (else they are never among the
    best). A tie keeps the newer step; a NaN value ranks worst; a step whose metrics
    ``get_metric_fn`` cannot score (it raises, or returns no number) counts as one without
    metrics, with a warning.
    """

    n: int | None = None
    get_metric_fn: Callable[[Any], float] | None = None
    mode: str | None = None
    reverse: bool | None = None
    keep_checkpoints_without_metrics: bool = True
    _warned: set[int] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", _count("BestN", "n", self.n, minimum=0, optional=True))
        if self.get_metric_fn is None:
            raise InvalidOptionError("BestN(get_metric_fn=None): give the function metrics -> number that ranks steps")
        _callable("BestN", "get_metric_fn", self.get_metric_fn)
        if self.mode is not None and self.mode not in ("min", "max"):
            raise InvalidOptionError(f"BestN(mode={self.mode!r}): mode must be 'min' or 'max'")
        if self.reverse is not None and not isinstance(self.reverse, bool):
            raise InvalidOptionError(f"BestN(reverse={self.reverse!r}): reverse must be True or False")
        if self.mode is not None and self.reverse is not None and self.reverse != (self.mode == "min"):
            raise InvalidOptionError(
                f"BestN(mode={self.mode!r}, reverse={self.reverse!r}) contradict each other: "
                "reverse=True means mode='min'; give one of them"
            )
        mode = self.mode or ("min" if self.reverse else "max")
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "reverse", mode == "min")

    def score(self, info: PolicyCheckpointInfo) -> float | None:
        """The step's value by ``get_metric_fn`` (``None``: no metrics, or not scorable)."""
        if info.metrics is None:
            return None
        assert self.get_metric_fn is not None
        try:
            value = self.get_metric_fn(info.metrics)
            if getattr(value, "shape", None) == () and hasattr(value, "item"):
                value = value.item()  # NumPy / JAX scalar
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"it returned {value!r} ({type(value).__name__}), not a number")
            return float(value)
        except Exception as exc:
            if info.step not in self._warned:
                self._warned.add(info.step)
                log.warning("BestN: get_metric_fn failed on the metrics of step %d (%r): %s: %s; the step counts "
                            "as one without metrics", info.step, info.metrics, type(exc).__name__, exc)
            return None

    def should_preserve(
        self, checkpoints: Sequence[PolicyCheckpointInfo], *, context: PreservationContext
    ) -> Sequence[bool]:
        if self.n is None or len(checkpoints) <= self.n:
            return [True] * len(checkpoints)
        if self.n == 0:
            return [False] * len(checkpoints)
        scores = [self.score(c) for c in checkpoints]
        worst = math.inf if self.reverse else -math.inf
        scored = [(i, worst if math.isnan(s) else s) for i, s in enumerate(scores) if s is not None]
        # Ascending quality (descending value for "min"); a stable sort: the last n are the best.
        ranked = sorted(scored, key=lambda item: item[1], reverse=bool(self.reverse))
        kept = {i for i, _ in ranked[-self.n:]}
        if self.keep_checkpoints_without_metrics:
            kept |= {i for i, s in enumerate(scores) if s is None}
        return [i in kept for i in range(len(checkpoints))]


@dataclass(frozen=True)
class LatestDuration:
    """Keep the steps committed within ``duration`` (a timedelta, or seconds) before now."""

    duration: datetime.timedelta

    def __post_init__(self) -> None:
        seconds = _seconds("LatestDuration", "duration", self.duration, positive=False)
        object.__setattr__(self, "duration", datetime.timedelta(seconds=seconds or 0.0))

    def should_preserve(
        self, checkpoints: Sequence[PolicyCheckpointInfo], *, context: PreservationContext
    ) -> Sequence[bool]:
        current = to_datetime(now())
        first = next((i for i, c in enumerate(checkpoints) if current - c.time <= self.duration), len(checkpoints))
        return [False] * first + [True] * (len(checkpoints) - first)


@dataclass(frozen=True)
class ShouldKeepFnPolicy:
    """Keep the steps for which ``should_keep_fn(step)`` is true (what the ``should_keep_fn`` option builds)."""

    should_keep_fn: Callable[[int], bool]

    def __post_init__(self) -> None:
        _callable("ShouldKeepFnPolicy", "should_keep_fn", self.should_keep_fn)

    def should_preserve(
        self, checkpoints: Sequence[PolicyCheckpointInfo], *, context: PreservationContext
    ) -> Sequence[bool]:
        return [bool(self.should_keep_fn(c.step)) for c in checkpoints]


@dataclass(frozen=True)
class AnyPreservationPolicy:
    """Keep a step when any of ``policies`` keeps it."""

    policies: Sequence[Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "policies", _children("AnyPreservationPolicy", self.policies, "should_preserve"))

    def should_preserve(
        self, checkpoints: Sequence[PolicyCheckpointInfo], *, context: PreservationContext
    ) -> Sequence[bool]:
        keep = [False] * len(checkpoints)
        for policy in self.policies:
            flags = checked_flags(policy, policy.should_preserve(checkpoints, context=context), len(checkpoints))
            keep = [k or f for k, f in zip(keep, flags, strict=True)]
        return keep


# -- helpers for the manager --------------------------------------------------------------------


def checked_flags(policy: Any, flags: Any, count: int) -> list[bool]:
    """A preservation policy's answer as ``count`` booleans (a wrong answer is an InvalidOptionError)."""
    try:
        out = [bool(f) for f in flags]
    except TypeError:
        out = None
    if out is None or len(out) != count:
        raise InvalidOptionError(
            f"the preservation policy {policy!r} returned {flags!r}; should_preserve must return one boolean "
            f"per step ({count} steps)"
        )
    return out


def walk(policy: Any) -> Iterator[Any]:
    """The policy and, for the combining ones, every policy inside it."""
    yield policy
    if isinstance(policy, (AnySavePolicy, AnyPreservationPolicy)):
        for child in policy.policies:
            yield from walk(child)


def uses_preemption(policy: Any) -> bool:
    return any(isinstance(p, PreemptionCheckpointingPolicy) for p in walk(policy))


def first_best_n(policy: Any) -> BestN | None:
    """The first :class:`BestN` of a preservation policy (it ranks ``best_step`` without ``best_fn``)."""
    return next((p for p in walk(policy) if isinstance(p, BestN)), None)
