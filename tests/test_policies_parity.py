"""ckptcore's policy objects decide as orbax-checkpoint's do: same names, arguments and answers.

Two levels, as in tests/test_orbax_manager_parity.py: (1) both real managers, each given its own
library's policy objects built from the same description, driven by the same calls on a
controlled clock (ckptcore's ``policies.now`` and orbax's ``datetime.datetime.now`` both
patched), preemption signalled at the same steps; after every call we compare
``should_save``, ``save``'s return value and ``all_steps()``. (2) the policies alone, on many
random histories: ``should_preserve`` and ``should_save`` of each pair must agree.
"""

from __future__ import annotations

import datetime
import random
import types
from typing import Any

import numpy as np
import pytest

from ckptcore import CheckpointManager, CheckpointManagerOptions
from ckptcore import policies as ours_policies
from ckptcore.manager import policies as policies_impl

ocp = pytest.importorskip("orbax.checkpoint")  # interoperability test: orbax is a test dependency
from orbax.checkpoint import checkpoint_manager as orbax_cm  # noqa: E402
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as orbax_pp  # noqa: E402

EPOCH = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC).timestamp()


def loss(m):
    return m["loss"]


# -- a policy described once, built from either library -----------------------------------------

Spec = tuple[str, Any]  # (class name, keyword arguments) or ("AnySavePolicy"/"AnyPreservationPolicy", [specs])


def build(namespace: Any, spec: Spec) -> Any:
    name, args = spec
    cls = getattr(namespace, name, None) or getattr(orbax_pp, name)  # orbax exports no PreserveAll
    if name in ("AnySavePolicy", "AnyPreservationPolicy"):
        return cls([build(namespace, child) for child in args])
    return cls(**args)


def ours(spec: Spec) -> Any:
    return build(ours_policies, spec)


def theirs(spec: Spec) -> Any:
    return build(ocp.checkpoint_managers, spec)


# -- a controlled clock for both -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = EPOCH

    def datetime_module(self) -> types.ModuleType:
        clock = self

        class FakeDatetime(datetime.datetime):
            @classmethod
            def now(cls, tz: Any = None) -> datetime.datetime:  # type: ignore[override]
                return datetime.datetime.fromtimestamp(clock.t, tz)

        fake = types.ModuleType("datetime")
        fake.__dict__.update(datetime.__dict__)
        fake.datetime = FakeDatetime  # type: ignore[attr-defined]
        return fake


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(policies_impl, "now", lambda: c.t)
    fake = c.datetime_module()
    monkeypatch.setattr(orbax_cm, "datetime", fake)
    monkeypatch.setattr(orbax_pp, "datetime", fake)
    return c


# -- level 1: both managers ------------------------------------------------------------------------

Call = tuple[int, float, Any, bool]  # step, seconds since the previous call, metrics, preempted


def history(seed: int, n: int = 18, *, metrics: bool = True) -> list[Call]:
    r = random.Random(seed)
    calls, step = [], r.randint(0, 2)
    for _ in range(n):
        m = {"loss": float(r.randint(0, 5))} if metrics and r.random() < 0.8 else None  # few values: many ties
        calls.append((step, float(r.choice([1, 5, 20, 45, 90])), m, r.random() < 0.1))
        step += r.choice([1, 1, 1, 2, 3])
    return calls


def run_both(tmp_path, clock: Clock, monkeypatch, save: Spec | None, keep: Spec | None, calls: list[Call]):
    kw_ours: dict[str, Any] = {"enable_async_checkpointing": False}
    kw_theirs: dict[str, Any] = {"enable_async_checkpointing": False}
    if save is not None:
        kw_ours["save_decision_policy"], kw_theirs["save_decision_policy"] = ours(save), theirs(save)
    if keep is not None:
        kw_ours["preservation_policy"], kw_theirs["preservation_policy"] = ours(keep), theirs(keep)
    mine = CheckpointManager(tmp_path / "ours", CheckpointManagerOptions(**kw_ours))
    other = ocp.CheckpointManager(tmp_path / "orbax", options=ocp.CheckpointManagerOptions(**kw_theirs))
    preempted: set[int] = set()
    monkeypatch.setattr(mine, "reached_preemption", lambda step: step in preempted)
    monkeypatch.setattr(other, "reached_preemption", lambda step: step in preempted)
    seen_ours, seen_theirs = [], []
    try:
        for step, elapsed, metrics, preempt in calls:
            clock.t += elapsed
            if preempt:
                preempted.add(step)
            seen_ours.append((step, mine.should_save(step),
                              mine.save(step, {"x": np.array([step])}, metrics=metrics), mine.all_steps()))
            seen_theirs.append((step, other.should_save(step),
                                other.save(step, args=ocp.args.JsonSave({"step": step}), metrics=metrics),
                                list(other.all_steps())))
    finally:
        mine.close()
        other.close()
    return seen_ours, seen_theirs


BEST_MIN = ("BestN", {"get_metric_fn": loss, "reverse": True, "n": 2})
MANAGER_CASES: dict[str, tuple[Spec | None, Spec | None]] = {
    "fixed_interval+latest_n": (("FixedIntervalPolicy", {"interval": 3}), ("LatestN", {"n": 2})),
    "specific_steps+preserve_all": (("SpecificStepsPolicy", {"steps": [1, 4, 9, 10, 17, 25]}), ("PreserveAll", {})),
    "any_save+every_n_steps": (
        ("AnySavePolicy", [("FixedIntervalPolicy", {"interval": 5}), ("SpecificStepsPolicy", {"steps": [2, 3]}),
                           ("InitialSavePolicy", {})]),
        ("EveryNSteps", {"interval_steps": 4}),
    ),
    "continuous_min_interval+every_n_seconds": (
        ("ContinuousCheckpointingPolicy", {"minimum_interval_secs": 30}), ("EveryNSeconds", {"interval_secs": 60}),
    ),
    "continuous+latest_duration": (("ContinuousCheckpointingPolicy", {}),
                                   ("LatestDuration", {"duration": datetime.timedelta(seconds=150)})),
    "preemption+best_n": (
        ("AnySavePolicy", [("FixedIntervalPolicy", {"interval": 7}), ("PreemptionCheckpointingPolicy", {})]),
        BEST_MIN,
    ),
    "initial_only+custom_steps": (
        ("AnySavePolicy", [("InitialSavePolicy", {}), ("ContinuousCheckpointingPolicy", {"minimum_interval_secs": 100})]),
        ("CustomSteps", {"steps": [2, 5, 7, 11]}),
    ),
    "default_save+every_n_steps_drifting": (
        None, ("EveryNSteps", {"interval_steps": 3, "exact_interval": False, "max_to_keep": 2}),
    ),
    "every_n_steps_closest": (None, ("EveryNStepsClosest", {"interval_steps": 5})),
    "every_n_steps_closest_max": (("FixedIntervalPolicy", {"interval": 2}),
                                  ("EveryNStepsClosest", {"interval_steps": 4, "max_to_keep": 2})),
    "best_n_drop_without_metrics": (
        None, ("BestN", {"get_metric_fn": loss, "n": 3, "keep_checkpoints_without_metrics": False}),
    ),
    "any_preservation": (
        ("ContinuousCheckpointingPolicy", {"minimum_interval_secs": 10}),
        ("AnyPreservationPolicy", [("LatestN", {"n": 1}), ("EveryNSteps", {"interval_steps": 5}), BEST_MIN,
                                   ("EveryNSeconds", {"interval_secs": 120})]),
    ),
}


@pytest.mark.parametrize("name", list(MANAGER_CASES))
def test_managers_with_the_same_policies_save_and_keep_the_same_steps(tmp_path, clock, monkeypatch, name):
    save, keep = MANAGER_CASES[name]
    seed = sorted(MANAGER_CASES).index(name)
    seen_ours, seen_theirs = run_both(tmp_path, clock, monkeypatch, save, keep, history(seed))
    assert seen_ours == seen_theirs
    assert any(saved for _, _, saved, _ in seen_ours), "a case that never saves tests nothing"


# -- level 2: the policies alone, on many histories ------------------------------------------------

PRESERVATION_SPECS: list[Spec] = [
    ("PreserveAll", {}),
    ("LatestN", {"n": None}),
    ("LatestN", {"n": 0}),
    ("LatestN", {"n": 3}),
    ("EveryNSeconds", {"interval_secs": 30}),
    ("EveryNSteps", {"interval_steps": 4}),
    ("EveryNSteps", {"interval_steps": 5, "max_to_keep": 2}),
    ("EveryNSteps", {"interval_steps": 6, "exact_interval": False}),
    ("EveryNSteps", {"interval_steps": 3, "exact_interval": False, "max_to_keep": 3}),
    ("EveryNStepsClosest", {"interval_steps": 7}),
    ("EveryNStepsClosest", {"interval_steps": 4, "max_to_keep": 2}),
    ("CustomSteps", {"steps": [0, 3, 10, 50, 51]}),
    ("BestN", {"get_metric_fn": loss, "n": 3}),
    ("BestN", {"get_metric_fn": loss, "reverse": True, "n": 1}),
    ("BestN", {"get_metric_fn": loss, "reverse": True, "n": 0}),
    ("BestN", {"get_metric_fn": loss, "n": 2, "keep_checkpoints_without_metrics": False}),
    ("LatestDuration", {"duration": datetime.timedelta(seconds=200)}),
    ("AnyPreservationPolicy", [("LatestN", {"n": 2}), ("EveryNSteps", {"interval_steps": 10}),
                               ("BestN", {"get_metric_fn": loss, "reverse": True, "n": 1})]),
]


def random_infos(r: random.Random) -> list[policies_impl.PolicyCheckpointInfo]:
    steps = sorted(r.sample(range(80), r.randint(0, 25)))
    t, infos = EPOCH, []
    for s in steps:
        t += r.choice([1, 2, 5, 10, 40])
        metrics = None if r.random() < 0.2 else {"loss": float(r.randint(0, 6))}
        infos.append(policies_impl.PolicyCheckpointInfo(s, policies_impl.to_datetime(t), metrics))
    return infos


@pytest.mark.parametrize("index", range(len(PRESERVATION_SPECS)))
def test_preservation_policies_keep_what_orbax_keeps(clock, index):
    spec = PRESERVATION_SPECS[index]
    mine, other = ours(spec), theirs(spec)
    for seed in range(40):
        r = random.Random(seed * 1000 + index)
        infos = random_infos(r)
        clock.t = (infos[-1].time.timestamp() if infos else EPOCH) + r.choice([0, 10, 100, 300])
        expected = list(other.should_preserve(infos, context=orbax_pp.PreservationContext()))
        got = list(mine.should_preserve(infos, context=ours_policies.PreservationContext()))
        assert got == expected, (spec, seed, [(i.step, i.metrics) for i in infos])


SAVE_SPECS: list[Spec] = [
    ("FixedIntervalPolicy", {"interval": 1}),
    ("FixedIntervalPolicy", {"interval": 6}),
    ("SpecificStepsPolicy", {"steps": range(0, 100, 7)}),
    ("SpecificStepsPolicy", {"steps": {3, 4, 50}}),
    ("ContinuousCheckpointingPolicy", {}),
    ("ContinuousCheckpointingPolicy", {"minimum_interval_secs": 25}),
    ("PreemptionCheckpointingPolicy", {}),
    ("InitialSavePolicy", {}),
    ("AnySavePolicy", [("FixedIntervalPolicy", {"interval": 10}), ("PreemptionCheckpointingPolicy", {}),
                       ("InitialSavePolicy", {})]),
]


@pytest.mark.parametrize("index", range(len(SAVE_SPECS)))
def test_save_decision_policies_decide_as_orbax(index):
    from orbax.checkpoint import options as orbax_options
    from orbax.checkpoint._src.checkpoint_managers import save_decision_policy as orbax_sd

    spec = SAVE_SPECS[index]
    mine, other = ours(spec), theirs(spec)
    for seed in range(60):
        r = random.Random(seed * 1000 + index)
        previous = random_infos(r)
        step = (previous[-1].step if previous else 0) + r.randint(1, 12)
        when = policies_impl.to_datetime((previous[-1].time.timestamp() if previous else EPOCH) + r.choice([0, 10, 30]))
        saving, preempted = r.random() < 0.3, r.random() < 0.3
        current = policies_impl.PolicyCheckpointInfo(step, when)
        expected = other.should_save(current, previous, context=orbax_sd.DecisionContext(
            is_saving_in_progress=saving, reached_preemption=preempted,
            multiprocessing_options=orbax_options.MultiprocessingOptions(),
        ))
        got = mine.should_save(current, previous, context=ours_policies.DecisionContext(
            is_saving_in_progress=saving, reached_preemption=preempted))
        assert got == expected, (spec, seed, step, [i.step for i in previous], saving, preempted)
