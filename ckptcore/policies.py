"""``ckptcore.policies``: when a :class:`ckptcore.CheckpointManager` saves and which steps it keeps.

orbax-checkpoint's policy objects, with its names and meanings (see
:mod:`ckptcore.manager.policies`)::

    opts = ckptcore.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([policies.FixedIntervalPolicy(1000), policies.InitialSavePolicy()]),
        preservation_policy=policies.AnyPreservationPolicy([policies.LatestN(3), policies.EveryNSteps(10_000)]),
    )
"""

from __future__ import annotations

from ckptcore.manager.policies import (
    AnyPreservationPolicy,
    AnySavePolicy,
    BestN,
    ContinuousCheckpointingPolicy,
    CustomSteps,
    DecisionContext,
    EveryNSeconds,
    EveryNSteps,
    EveryNStepsClosest,
    FixedIntervalPolicy,
    InitialSavePolicy,
    LatestDuration,
    LatestN,
    PolicyCheckpointInfo,
    PreemptionCheckpointingPolicy,
    PreservationContext,
    PreservationPolicy,
    PreserveAll,
    SaveDecisionPolicy,
    ShouldKeepFnPolicy,
    ShouldSaveFnPolicy,
    SpecificStepsPolicy,
)

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
