"""Emergency checkpointing: a fast local tier per process, a persistent tier, and peer replicas.

``ckptcore.emergency.CheckpointManager(local_directory, persistent_directory, Options(...))``;
see :mod:`ckptcore.emergency.manager` for how the tiers, the replicas and the resume work.
Importing this package imports neither JAX nor any plugin.
"""

from __future__ import annotations

from ckptcore.emergency.manager import CheckpointManager
from ckptcore.emergency.options import EmergencyRestoreError, Options, RestoreInfo

__all__ = ["CheckpointManager", "EmergencyRestoreError", "Options", "RestoreInfo"]
