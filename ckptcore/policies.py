"""``ckptcore.policies``: when a :class:`ckptcore.CheckpointManager` saves and which steps it keeps.

orbax-checkpoint's policy objects, with its names and meanings (see
:mod:`ckptcore.manager.policies`)::

    opts = ckptcore.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([policies.FixedIntervalPolicy(1000), policies.InitialSavePolicy()]),
        preservation_policy=policies.AnyPreservationPolicy([policies.LatestN(3), policies.EveryNSteps(10_000)]),
    )
"""

from __future__ import annotations

# The names are declared once, in ckptcore.manager.policies; this module is their public door.
from ckptcore.manager.policies import *  # noqa: F403
from ckptcore.manager.policies import __all__ as __all__
