"""ckptcore.policies with the manager: shorthands, composition, custom policies, bad arguments.

That the policies decide as orbax-checkpoint's do is tests/test_policies_parity.py.
"""

from __future__ import annotations

import datetime

import numpy as np
import pytest

import ckptcore
from ckptcore import CheckpointManager, CheckpointManagerOptions, policies
from ckptcore.errors import InvalidMetadataError, InvalidOptionError
from ckptcore.manager import policies as policies_impl


def opts(**kw):
    return CheckpointManagerOptions(enable_async_checkpointing=False, **kw)


def run(mgr, steps, metrics=None):
    return [s for s in steps if mgr.save(s, {"x": np.array([s])}, metrics=None if metrics is None else metrics(s))]


def loss(m):
    return m["loss"]


# -- the shorthands are policies ----------------------------------------------------------------


def test_public_module():
    assert ckptcore.policies is policies
    assert "policies" in ckptcore.__all__
    assert set(policies.__all__) >= {"FixedIntervalPolicy", "SpecificStepsPolicy", "ContinuousCheckpointingPolicy",
                                     "PreemptionCheckpointingPolicy", "InitialSavePolicy", "AnySavePolicy",
                                     "PreserveAll", "LatestN", "EveryNSeconds", "EveryNSteps", "EveryNStepsClosest",
                                     "CustomSteps", "BestN", "LatestDuration", "AnyPreservationPolicy"}


def test_shorthands_build_policies():
    o = CheckpointManagerOptions(save_interval_steps=5, save_on_steps=[2, 3], max_to_keep=3, keep_period=100,
                                 keep_time_interval=datetime.timedelta(hours=1), should_keep_fn=bool)
    assert o.effective_save_decision_policy() == policies.AnySavePolicy(
        [policies.FixedIntervalPolicy(5), policies.SpecificStepsPolicy({2, 3}), policies.InitialSavePolicy()])
    assert o.effective_preservation_policy() == policies.AnyPreservationPolicy(
        [policies.EveryNSteps(100), policies.EveryNSeconds(3600), policies.LatestN(3), policies.ShouldKeepFnPolicy(bool)])
    best = CheckpointManagerOptions(max_to_keep=2, best_fn=loss, best_mode="min", keep_checkpoints_without_metrics=False)
    assert best.effective_preservation_policy() == policies.BestN(
        get_metric_fn=loss, reverse=True, n=2, keep_checkpoints_without_metrics=False)
    fn = CheckpointManagerOptions(should_save_fn=lambda s, last: True)
    assert isinstance(fn.effective_save_decision_policy(), policies.ShouldSaveFnPolicy)
    assert CheckpointManagerOptions().effective_preservation_policy() == policies.LatestN(None)


def test_changing_an_option_after_construction_changes_the_policy():
    o = CheckpointManagerOptions(max_to_keep=3)
    assert o.effective_preservation_policy() == policies.LatestN(3)
    o.max_to_keep = 1
    assert o.effective_preservation_policy() == policies.LatestN(1)


def test_save_on_steps_and_interval(tmp_path):
    with CheckpointManager(tmp_path, opts(save_interval_steps=10, save_on_steps=range(3, 6))) as mgr:
        assert run(mgr, range(1, 25)) == [1, 3, 4, 5, 10, 20]


def test_save_interval_zero_saves_the_first_step_and_the_listed_ones(tmp_path):
    with CheckpointManager(tmp_path, opts(save_interval_steps=0, save_on_steps=[7])) as mgr:
        assert run(mgr, range(2, 12)) == [2, 7]


def test_should_keep_fn_keeps_its_steps(tmp_path):
    with CheckpointManager(tmp_path, opts(max_to_keep=1, should_keep_fn=lambda s: s in (2, 5))) as mgr:
        run(mgr, range(8))
        assert mgr.all_steps() == [2, 5, 7]


# -- policies given directly ---------------------------------------------------------------------


def test_composed_policies(tmp_path):
    o = opts(
        save_decision_policy=policies.AnySavePolicy([policies.FixedIntervalPolicy(4), policies.SpecificStepsPolicy([1, 10]),
                                                     policies.InitialSavePolicy()]),
        preservation_policy=policies.AnyPreservationPolicy([policies.LatestN(2), policies.EveryNSteps(8),
                                                            policies.BestN(1, loss, "min")]),
    )
    with CheckpointManager(tmp_path, o) as mgr:
        saved = run(mgr, range(1, 20), metrics=lambda s: {"loss": 10.0 if s != 10 else 0.5})
        assert saved == [1, 4, 8, 10, 12, 16]
        assert mgr.all_steps() == [8, 10, 12, 16]
        assert mgr.best_step() == 10  # ranked by the BestN, without best_fn (orbax: the latest step)


def test_best_n_metric_fn_failing_at_save_loses_nothing(tmp_path):
    o = opts(preservation_policy=policies.BestN(1, loss, "min"))
    with CheckpointManager(tmp_path, o) as mgr:
        mgr.save(1, {"x": np.ones(1)}, metrics={"loss": 1.0})
        with pytest.raises(InvalidMetadataError, match="step 2"):
            mgr.save(2, {"x": np.ones(1)}, metrics={"acc": 1.0})
        assert mgr.all_steps() == [1]


class EveryOther:
    """A user's own policies: any object with should_save / should_preserve."""

    def should_save(self, step, previous_steps, *, context):
        return step.step % 2 == 1

    def should_preserve(self, checkpoints, *, context):
        return [i % 2 == 0 for i in range(len(checkpoints))]


def test_a_custom_policy(tmp_path):
    o = opts(save_decision_policy=EveryOther(), preservation_policy=EveryOther())
    with CheckpointManager(tmp_path, o) as mgr:
        assert run(mgr, range(6)) == [1, 3, 5]
        assert mgr.all_steps() == [1]  # [1, 3] keeps 1, then [1, 5] keeps 1


class Broken:
    def __init__(self, answer):
        self.answer = answer

    def should_preserve(self, checkpoints, *, context):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize("answer", [[True], None, ValueError("oops")])
def test_a_broken_preservation_policy_deletes_nothing(tmp_path, answer):
    with CheckpointManager(tmp_path, opts(preservation_policy=Broken([True]))) as mgr:
        run(mgr, [1])
        mgr.options.preservation_policy = Broken(answer)
        with pytest.raises(InvalidOptionError, match="preservation policy"):
            mgr.save(2, {"x": np.ones(1)})
        mgr.reload()
        assert mgr.all_steps() == [1, 2]


def test_continuous_policy_waits_for_the_save_in_flight(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(policies_impl, "now", lambda: now[0])
    o = opts(save_decision_policy=policies.ContinuousCheckpointingPolicy(minimum_interval_secs=60))
    with CheckpointManager(tmp_path, o) as mgr:
        assert mgr.save(1, {"x": np.ones(1)})
        now[0] += 30
        assert not mgr.should_save(2)  # too soon
        now[0] += 31
        assert mgr.should_save(2)
        monkeypatch.setattr(mgr, "is_saving_in_progress", lambda: True)
        assert not mgr.should_save(2)  # a save in flight


def test_preemption_is_asked_only_by_a_policy_that_saves_on_it(tmp_path, monkeypatch):
    asked = []
    with CheckpointManager(tmp_path, opts(save_interval_steps=100)) as mgr:
        monkeypatch.setattr(mgr, "reached_preemption", lambda step: asked.append(step) or True)
        assert run(mgr, [0, 1, 2]) == [0]
        assert asked == []  # no SIGTERM handler installed behind the user's back
    o = opts(save_decision_policy=policies.AnySavePolicy([policies.FixedIntervalPolicy(100),
                                                          policies.PreemptionCheckpointingPolicy()]))
    with CheckpointManager(tmp_path / "b", o) as mgr:
        monkeypatch.setattr(mgr, "reached_preemption", lambda step: asked.append(step) or step == 7)
        assert run(mgr, [5, 6, 7, 8]) == [7]
        assert 7 in asked


def test_latest_duration(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(policies_impl, "now", lambda: now[0])
    o = opts(preservation_policy=policies.LatestDuration(datetime.timedelta(seconds=100)))
    with CheckpointManager(tmp_path, o) as mgr:
        for step in range(5):
            now[0] += 40
            mgr.save(step, {"x": np.ones(1)})
        assert mgr.all_steps() == [2, 3, 4]


# -- bad arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: policies.FixedIntervalPolicy(0), r"FixedIntervalPolicy\(interval=0\)"),
        (lambda: policies.FixedIntervalPolicy(-5), "interval must be >= 1"),
        (lambda: policies.FixedIntervalPolicy(2.5), "interval must be an integer"),
        (lambda: policies.SpecificStepsPolicy([1, -2]), "-2 is not a step"),
        (lambda: policies.SpecificStepsPolicy(5), "steps must be a collection"),
        (lambda: policies.ContinuousCheckpointingPolicy(minimum_interval_secs=-1), "minimum_interval_secs must be >= 0"),
        (lambda: policies.AnySavePolicy([]), "at least one policy"),
        (lambda: policies.AnySavePolicy([policies.LatestN(1)]), "has no should_save"),
        (lambda: policies.LatestN(-1), r"LatestN\(n=-1\)"),
        (lambda: policies.EveryNSeconds(0), "interval_secs must be > 0"),
        (lambda: policies.EveryNSteps(0), "interval_steps must be >= 1"),
        (lambda: policies.EveryNSteps(5, max_to_keep=0), "max_to_keep must be >= 1"),
        (lambda: policies.EveryNStepsClosest(-3), "interval_steps"),
        (lambda: policies.CustomSteps(["a"]), "'a' is not a step"),
        (lambda: policies.BestN(2), "get_metric_fn"),
        (lambda: policies.BestN(-1, loss), r"BestN\(n=-1\)"),
        (lambda: policies.BestN(1, loss, "lowest"), "mode must be 'min' or 'max'"),
        (lambda: policies.BestN(1, loss, "max", reverse=True), "contradict"),
        (lambda: policies.BestN(1, "loss"), "get_metric_fn must be callable"),
        (lambda: policies.LatestDuration(datetime.timedelta(seconds=-1)), "duration must be >= 0"),
        (lambda: policies.AnyPreservationPolicy([policies.FixedIntervalPolicy(1)]), "has no should_preserve"),
        (lambda: CheckpointManagerOptions(save_decision_policy=policies.FixedIntervalPolicy(5), save_interval_steps=5),
         "save_decision_policy replaces save_interval_steps"),
        (lambda: CheckpointManagerOptions(save_decision_policy=policies.InitialSavePolicy(), save_on_steps=[1]),
         "replaces save_on_steps"),
        (lambda: CheckpointManagerOptions(preservation_policy=policies.LatestN(2), max_to_keep=2),
         "preservation_policy replaces max_to_keep"),
        (lambda: CheckpointManagerOptions(preservation_policy=policies.LatestN(2), keep_period=5, should_keep_fn=bool),
         "replaces keep_period, should_keep_fn"),
        (lambda: CheckpointManagerOptions(preservation_policy=policies.InitialSavePolicy()), "not a preservation policy"),
        (lambda: CheckpointManagerOptions(save_decision_policy=policies.LatestN(1)), "not a save decision policy"),
        (lambda: CheckpointManagerOptions(save_on_steps=[-1]), "save_on_steps"),
        (lambda: CheckpointManagerOptions(keep_time_interval=0), "keep_time_interval"),
        (lambda: CheckpointManagerOptions(should_save_fn=lambda s, last: True, save_on_steps=[1]), "should_save_fn"),
        (lambda: CheckpointManagerOptions(should_keep_fn=3), "should_keep_fn must be callable"),
    ],
)
def test_impossible_arguments_are_named(make, match):
    with pytest.raises(InvalidOptionError, match=match):
        make()


def test_best_fn_with_a_preservation_policy_only_ranks(tmp_path):
    o = opts(preservation_policy=policies.LatestN(2), best_fn=loss, best_mode="min")
    with CheckpointManager(tmp_path, o) as mgr:
        run(mgr, range(4), metrics=lambda s: {"loss": float(s)})
        assert mgr.all_steps() == [2, 3]
        assert mgr.best_step() == 2
