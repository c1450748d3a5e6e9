"""Same options, same saves and metrics: ckptcore's manager keeps the same steps as orbax-checkpoint's.

Two levels: (1) both real managers driven by the same call sequence on local disk, comparing
``save``'s return value, ``all_steps()`` after every call and ``best_step()``; (2) the
retention rule alone against orbax's own preservation policies on many random step
histories (this covers ``keep_time_interval``, whose real-clock behaviour cannot be
replayed deterministically).
"""

from __future__ import annotations

import datetime
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from ckptcore import CheckpointManager, CheckpointManagerOptions
from ckptcore.manager.retention import StepRecord, steps_to_delete

ocp = pytest.importorskip("orbax.checkpoint")  # interoperability test: orbax is a test dependency


def loss(m):
    return m["loss"]


def acc(m):
    return m["acc"]


def run_both(tmp_path, options: dict[str, Any], calls: list[tuple[int, dict | None, bool]], reopen_at: int | None = None):
    """Drive both managers with the same calls; return the per-call observations of each."""
    def make_ours():
        return CheckpointManager(tmp_path / "ours", CheckpointManagerOptions(enable_async_checkpointing=False, **options))

    def make_orbax():
        return ocp.CheckpointManager(
            tmp_path / "orbax", options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, **options)
        )

    ours, theirs = make_ours(), make_orbax()
    seen_ours, seen_theirs = [], []
    try:
        for i, (step, metrics, force) in enumerate(calls):
            if i == reopen_at:  # a restarted run: both managers re-read the directory
                ours.close()
                theirs.close()
                ours, theirs = make_ours(), make_orbax()
            item = {"step": step}
            saved_ours = ours.save(step, {"x": np.array([step])}, metrics=metrics, force=force)
            saved_theirs = theirs.save(step, args=ocp.args.JsonSave(item), metrics=metrics, force=force)
            seen_ours.append((step, saved_ours, ours.all_steps()))
            seen_theirs.append((step, saved_theirs, list(theirs.all_steps())))
        seen_ours.append(("best", ours.best_step()))
        seen_theirs.append(("best", theirs.best_step()))
    finally:
        ours.close()
        theirs.close()
    return seen_ours, seen_theirs


rng = random.Random(1234)
RANDOM_LOSSES = [round(rng.uniform(0, 10), 2) for _ in range(20)]

CASES = {
    "max_to_keep": ({"max_to_keep": 3}, [(s, None, False) for s in range(10)]),
    "max_to_keep_with_metrics_no_best_fn": (
        {"max_to_keep": 2}, [(s, {"loss": RANDOM_LOSSES[s]}, False) for s in range(8)]
    ),
    "best_fn_min": (
        {"max_to_keep": 3, "best_fn": loss, "best_mode": "min"},
        [(s, {"loss": RANDOM_LOSSES[s]}, False) for s in range(15)],
    ),
    "best_fn_max": (
        {"max_to_keep": 2, "best_fn": acc, "best_mode": "max"},
        [(s, {"acc": RANDOM_LOSSES[19 - s]}, False) for s in range(12)],
    ),
    "best_fn_ties": (
        {"max_to_keep": 2, "best_fn": loss, "best_mode": "min"},
        [(s, {"loss": [1.0, 2.0, 1.0, 1.0, 3.0, 1.0][s]}, False) for s in range(6)],
    ),
    "keep_checkpoints_without_metrics": (
        {"max_to_keep": 2, "best_fn": loss, "best_mode": "min", "keep_checkpoints_without_metrics": True},
        [(s, None if s % 3 == 0 else {"loss": RANDOM_LOSSES[s]}, False) for s in range(12)],
    ),
    "drop_checkpoints_without_metrics": (
        {"max_to_keep": 2, "best_fn": loss, "best_mode": "min", "keep_checkpoints_without_metrics": False},
        [(s, None if s % 3 == 0 else {"loss": RANDOM_LOSSES[s]}, False) for s in range(12)],
    ),
    "keep_period": ({"max_to_keep": 2, "keep_period": 4}, [(s, None, False) for s in range(13)]),
    "keep_period_with_best_fn": (
        {"max_to_keep": 1, "keep_period": 5, "best_fn": loss, "best_mode": "min"},
        [(s, {"loss": RANDOM_LOSSES[s]}, False) for s in range(12)],
    ),
    "save_interval_steps": ({"max_to_keep": 2, "save_interval_steps": 3}, [(s, None, False) for s in range(15)]),
    "save_interval_first_step_not_multiple": (
        {"save_interval_steps": 5}, [(s, None, False) for s in range(2, 13)]
    ),
    "save_interval_with_force": (
        {"save_interval_steps": 4, "max_to_keep": 3}, [(s, None, s == 6) for s in range(1, 11)]
    ),
    "save_on_steps": (
        {"save_interval_steps": 4, "save_on_steps": [1, 6, 7, 13], "max_to_keep": 3}, [(s, None, False) for s in range(1, 15)]
    ),
    "save_on_steps_off_interval": ({"save_interval_steps": 100, "save_on_steps": {3, 5}}, [(s, None, False) for s in range(2, 9)]),
    "should_save_fn": (
        {"should_save_fn": lambda step, last: step % 3 == 1, "max_to_keep": 2}, [(s, None, False) for s in range(10)]
    ),
    "max_to_keep_zero": ({"max_to_keep": 0}, [(s, None, False) for s in range(3)]),
    "max_to_keep_one_best_max_missing_metrics": (
        {"max_to_keep": 1, "best_fn": acc},
        [(0, {"acc": 0.5}, False), (1, None, False), (2, {"acc": 0.4}, False), (3, {"acc": 0.9}, False)],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kept_steps_match_orbax(tmp_path, name):
    options, calls = CASES[name]
    ours, theirs = run_both(tmp_path, options, calls)
    assert ours == theirs


@pytest.mark.parametrize("name", ["best_fn_min", "keep_period", "save_interval_steps"])
def test_kept_steps_match_orbax_across_a_restart(tmp_path, name):
    options, calls = CASES[name]
    ours, theirs = run_both(tmp_path, options, calls, reopen_at=len(calls) // 2)
    assert ours == theirs


# -- the retention rule against orbax's preservation policies --------------------------


@dataclass
class _Info:  # orbax's PolicyCheckpointInfo protocol
    step: int
    time: datetime.datetime
    metrics: dict | None


def _orbax_deleted(options: dict[str, Any], infos: list[_Info]) -> list[int]:
    from orbax.checkpoint import checkpoint_manager as cm
    from orbax.checkpoint._src.checkpoint_managers import preservation_policy as pp

    policy = cm._get_default_preservation_policy(ocp.CheckpointManagerOptions(**options))
    keep = policy.should_preserve(infos, context=pp.PreservationContext())
    return [i.step for i, k in zip(infos, keep, strict=True) if not k]


@pytest.mark.parametrize("seed", range(40))
def test_retention_rule_matches_orbax_policies(seed):
    r = random.Random(seed)
    options: dict[str, Any] = {"max_to_keep": r.choice([None, 0, 1, 2, 3, 5])}
    if r.random() < 0.5:
        options["keep_period"] = r.choice([2, 3, 7])
    if r.random() < 0.5:
        options["keep_time_interval"] = datetime.timedelta(seconds=r.choice([5, 30, 100]))
    if r.random() < 0.6:
        options["best_fn"] = loss
        options["best_mode"] = r.choice(["min", "max"])
        options["keep_checkpoints_without_metrics"] = r.random() < 0.5
    base = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    steps = sorted(r.sample(range(200), r.randint(1, 25)))
    infos, records, t = [], [], 0.0
    for s in steps:
        t += r.choice([1, 2, 5, 10, 40])
        metrics = None if r.random() < 0.2 else {"loss": float(r.randint(0, 6))}  # small range: many ties
        infos.append(_Info(s, base + datetime.timedelta(seconds=t), metrics))
        records.append(StepRecord(s, base.timestamp() + t, metrics, None if metrics is None else metrics["loss"]))
    ours = steps_to_delete(records, CheckpointManagerOptions(**options))
    assert ours == _orbax_deleted(options, infos), (options, steps)
