"""ckptcore: save and restore training state atomically and fast, on any storage.

Importing ckptcore is light: NumPy, plugins, TensorStore and JAX are imported only when
first needed. Everything public is listed in ``__all__``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ckptcore import errors
from ckptcore.errors import CheckpointError

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "save": "ckptcore.saving",
    "restore": "ckptcore.restoring",
    "metadata": "ckptcore.restoring",
    "info": "ckptcore.restoring",
    "ArrayMetadata": "ckptcore.restoring",
    "CheckpointInfo": "ckptcore.restoring",
    "hookimpl": "ckptcore.hookspecs",
    "register_plugin": "ckptcore.plugins",
    "unregister_plugin": "ckptcore.plugins",
    "list_plugins": "ckptcore.plugins",
    "PluginInfo": "ckptcore.plugins",
    "Location": "ckptcore.registrations",
    "WriteRequest": "ckptcore.registrations",
    "ReadRequest": "ckptcore.registrations",
    "Shard": "ckptcore.registrations",
    "StorageRegistration": "ckptcore.registrations",
    "AtomicityRegistration": "ckptcore.registrations",
    "StepLayoutRegistration": "ckptcore.registrations",
    "ArrayFormatRegistration": "ckptcore.registrations",
    "SaveContext": "ckptcore.registrations",
    "clean": "ckptcore.cleanup",
    "MultiprocessOptions": "ckptcore.distributed",
    "multiprocess_options": "ckptcore.distributed",
    "set_multiprocess_options": "ckptcore.distributed",
    "CheckpointManager": "ckptcore.manager",
    "CheckpointManagerOptions": "ckptcore.manager_options",
    "Composite": "ckptcore.composite",
    "Json": "ckptcore.composite",
    "checkpoints_iterator": "ckptcore.evaluation",
    "wait_for_new_checkpoint": "ckptcore.evaluation",
    "Checkpointer": "ckptcore.checkpointer",
    "AsyncCheckpointer": "ckptcore.checkpointer",
}

# public submodules, also imported on first access (``ckptcore.progress.bar()``)
_SUBMODULES = ("progress", "testing")

__all__ = ["CheckpointError", "errors", "__version__", *_LAZY, *_SUBMODULES]

if TYPE_CHECKING:
    from ckptcore.checkpointer import AsyncCheckpointer, Checkpointer
    from ckptcore.cleanup import clean
    from ckptcore.composite import Composite, Json
    from ckptcore.distributed import MultiprocessOptions, multiprocess_options, set_multiprocess_options
    from ckptcore.evaluation import checkpoints_iterator, wait_for_new_checkpoint
    from ckptcore.hookspecs import hookimpl
    from ckptcore.manager import CheckpointManager
    from ckptcore.manager_options import CheckpointManagerOptions
    from ckptcore.plugins import PluginInfo, list_plugins, register_plugin, unregister_plugin
    from ckptcore.registrations import (
        ArrayFormatRegistration,
        AtomicityRegistration,
        Location,
        ReadRequest,
        SaveContext,
        Shard,
        StepLayoutRegistration,
        StorageRegistration,
        WriteRequest,
    )
    from ckptcore.restoring import ArrayMetadata, CheckpointInfo, info, metadata, restore
    from ckptcore.saving import save


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"ckptcore.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
