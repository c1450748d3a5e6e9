"""Which steps retention deletes: orbax-checkpoint's rules, as one pure function.

A step is kept when ANY of these keeps it (the others are deleted):

* ``keep_period``: its step number is a multiple of ``keep_period``;
* ``keep_time_interval``: the first step is kept, then each step committed at least the
  interval after the previous step kept this way;
* with ``best_fn``: ``max_to_keep`` best-scored steps (all when fewer steps exist than
  ``max_to_keep``, or when it is ``None``; none when it is 0), plus, when
  ``keep_checkpoints_without_metrics``, every step saved without metrics;
* without ``best_fn``: the ``max_to_keep`` newest steps (all when ``None``).

Ties in score keep the newer step, as orbax's stable sort does. A NaN score ranks worst
(orbax sorts NaN arbitrarily).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ckptcore.manager.options import CheckpointManagerOptions


@dataclass(frozen=True)
class StepRecord:
    """What retention knows about one committed step."""

    step: int
    time: float  # commit time, seconds since the epoch
    metrics: Any = None  # None: saved without metrics
    score: float | None = None  # best_fn(metrics); None without metrics (or when it could not be scored)


def steps_to_delete(records: Sequence[StepRecord], options: CheckpointManagerOptions) -> list[int]:
    """The steps of ``records`` (ascending by step) that retention deletes."""
    if not records:
        return []
    keep = [False] * len(records)
    if options.keep_period is not None:
        keep = [k or r.step % options.keep_period == 0 for k, r in zip(keep, records, strict=True)]
    interval = options.keep_time_interval_secs
    if interval is not None:
        keep = [k or t for k, t in zip(keep, _every_interval(records, interval), strict=True)]
    if options.best_fn is not None:
        keep = [k or b for k, b in zip(keep, _best_n(records, options), strict=True)]
    else:
        keep = [k or b for k, b in zip(keep, _latest_n(records, options.max_to_keep), strict=True)]
    return [r.step for r, k in zip(records, keep, strict=True) if not k]


def _latest_n(records: Sequence[StepRecord], n: int | None) -> list[bool]:
    if n is None or len(records) <= n:
        return [True] * len(records)
    return [False] * (len(records) - n) + [True] * n


def _every_interval(records: Sequence[StepRecord], interval: float) -> list[bool]:
    anchor = records[0].time
    out = [True]
    for r in records[1:]:
        if r.time - anchor >= interval:
            anchor = r.time
            out.append(True)
        else:
            out.append(False)
    return out


def _best_n(records: Sequence[StepRecord], options: CheckpointManagerOptions) -> list[bool]:
    n = options.max_to_keep
    if n is None or len(records) <= n:
        return [True] * len(records)
    if n == 0:
        return [False] * len(records)
    worst = -math.inf if options.best_mode == "max" else math.inf
    scored = [(i, worst if math.isnan(r.score) else r.score) for i, r in enumerate(records) if r.score is not None]
    # Ascending quality: the last n are the best (reverse for "min", as orbax sorts).
    ranked = sorted(scored, key=lambda item: item[1], reverse=options.best_mode == "min")
    kept = {i for i, _ in ranked[-n:]}
    if options.keep_checkpoints_without_metrics:
        kept |= {i for i, r in enumerate(records) if r.score is None}
    return [i in kept for i in range(len(records))]
