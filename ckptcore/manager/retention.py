"""Which steps retention deletes: the options' preservation policy, evaluated on the steps.

:class:`ckptcore.CheckpointManagerOptions` means one preservation policy
(:meth:`~ckptcore.CheckpointManagerOptions.effective_preservation_policy`): the one given as
``preservation_policy``, or the one its shorthands build. With the shorthands a step is
kept when ANY of these keeps it, as in orbax-checkpoint:

* ``keep_period`` (``EveryNSteps``): its step number is a multiple of ``keep_period``;
* ``keep_time_interval`` (``EveryNSeconds``): the first step is kept, then each step
  committed at least the interval after the previous step kept this way;
* with ``best_fn`` (``BestN``): the ``max_to_keep`` best-scored steps (all when fewer steps
  exist than ``max_to_keep``, or when it is ``None``; none when it is 0), plus, when
  ``keep_checkpoints_without_metrics``, every step saved without metrics;
* without ``best_fn`` (``LatestN``): the ``max_to_keep`` newest steps (all when ``None``);
* ``should_keep_fn`` (``ShouldKeepFnPolicy``): the steps it is true for.

Ties in score keep the newer step, as orbax's stable sort does. A NaN score ranks worst
(orbax sorts NaN arbitrarily).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ckptcore.errors import CheckpointError, InvalidOptionError
from ckptcore.manager import policies
from ckptcore.manager.options import CheckpointManagerOptions


@dataclass(frozen=True)
class StepRecord:
    """What retention knows about one committed step."""

    step: int
    time: float  # commit time, seconds since the epoch
    metrics: Any = None  # None: saved without metrics
    score: float | None = None  # the manager's ranking (best_step); None without metrics (or when it could not be scored)


def policy_info(record: StepRecord) -> policies.PolicyCheckpointInfo:
    """A step as the policies see it."""
    return policies.PolicyCheckpointInfo(record.step, policies.to_datetime(record.time), record.metrics)


def steps_to_delete(records: Sequence[StepRecord], options: CheckpointManagerOptions | Any) -> list[int]:
    """The steps of ``records`` (ascending by step) that retention deletes.

    :param options: the manager's options, or a preservation policy itself.
    :raises CheckpointError: the policy failed or answered wrongly; nothing is deleted then.
    """
    if not records:
        return []
    policy = options.effective_preservation_policy() if isinstance(options, CheckpointManagerOptions) else options
    infos = [policy_info(r) for r in records]
    try:
        answer = policy.should_preserve(infos, context=policies.PreservationContext())
    except CheckpointError:
        raise
    except Exception as exc:
        raise InvalidOptionError(
            f"the preservation policy {policy!r} failed on steps {[r.step for r in records]}: "
            f"{type(exc).__name__}: {exc}. No step was deleted."
        ) from exc
    keep = policies.checked_flags(policy, answer, len(records))
    return [r.step for r, k in zip(records, keep, strict=True) if not k]
