"""ckptcore: save and restore training state atomically and fast, on any storage.

Importing ckptcore is light: NumPy, plugins, TensorStore and JAX are imported only when
first needed. Everything public is listed in ``__all__``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ckptcore import errors
from ckptcore.errors import CheckpointError
from ckptcore.version import __version__

# public name -> module that defines it (imported on first access)
_LAZY = {
    "save": "ckptcore.api",
    "abstract": "ckptcore.api",
    "Transforms": "ckptcore.api",
    "RestoreReport": "ckptcore.api",
    "last_restore_report": "ckptcore.api",
    "verify": "ckptcore.manager.inspection",
    "diff": "ckptcore.manager.inspection",
    "list_run": "ckptcore.manager.inspection",
    "VerifyReport": "ckptcore.manager.inspection",
    "DiffReport": "ckptcore.manager.inspection",
    "RunListing": "ckptcore.manager.inspection",
    "SaveOptions": "ckptcore.api",
    "restore": "ckptcore.api",
    "metadata": "ckptcore.api",
    "info": "ckptcore.api",
    "convert": "ckptcore.io.convert",
    "ConvertReport": "ckptcore.io.convert",
    "ArrayMetadata": "ckptcore.api",
    "CheckpointInfo": "ckptcore.api",
    "hookimpl": "ckptcore.plugins.hookspecs",
    "register_plugin": "ckptcore.plugins.manager",
    "unregister_plugin": "ckptcore.plugins.manager",
    "list_plugins": "ckptcore.plugins.manager",
    "PluginInfo": "ckptcore.plugins.manager",
    "Location": "ckptcore.plugins.registrations",
    "WriteRequest": "ckptcore.plugins.registrations",
    "ReadRequest": "ckptcore.plugins.registrations",
    "Shard": "ckptcore.plugins.registrations",
    "StorageRegistration": "ckptcore.plugins.registrations",
    "AtomicityRegistration": "ckptcore.plugins.registrations",
    "StepLayoutRegistration": "ckptcore.plugins.registrations",
    "CheckpointLayoutRegistration": "ckptcore.plugins.registrations",
    "ForeignCheckpoint": "ckptcore.plugins.registrations",
    "CheckpointExporterRegistration": "ckptcore.plugins.registrations",
    "ExportLeaf": "ckptcore.plugins.registrations",
    "ExportPiece": "ckptcore.plugins.registrations",
    "ArrayFormatRegistration": "ckptcore.plugins.registrations",
    "SaveContext": "ckptcore.plugins.registrations",
    "clean": "ckptcore.storage.cleanup",
    "MultiprocessOptions": "ckptcore.parallel.options",
    "multiprocess_options": "ckptcore.parallel.options",
    "set_multiprocess_options": "ckptcore.parallel.options",
    "CheckpointManager": "ckptcore.manager.manager",
    "CheckpointManagerOptions": "ckptcore.manager.options",
    "Composite": "ckptcore.manager.composite",
    "Json": "ckptcore.manager.composite",
    "Proto": "ckptcore.manager.composite",
    "checkpoints_iterator": "ckptcore.manager.evaluation",
    "wait_for_new_checkpoint": "ckptcore.manager.evaluation",
    "Checkpointer": "ckptcore.checkpointers.checkpointer",
    "AsyncCheckpointer": "ckptcore.checkpointers.checkpointer",
}

# public submodules, also imported on first access (``ckptcore.progress.bar()``)
_SUBMODULES = ("progress", "policies", "emergency")

__all__ = ["CheckpointError", "errors", "__version__", *_LAZY, *_SUBMODULES]

if TYPE_CHECKING:
    from ckptcore.api import (
        ArrayMetadata,
        CheckpointInfo,
        RestoreReport,
        SaveOptions,
        Transforms,
        abstract,
        info,
        last_restore_report,
        metadata,
        restore,
        save,
    )
    from ckptcore.checkpointers.checkpointer import AsyncCheckpointer, Checkpointer
    from ckptcore.io.convert import ConvertReport, convert
    from ckptcore.manager.composite import Composite, Json, Proto
    from ckptcore.manager.evaluation import checkpoints_iterator, wait_for_new_checkpoint
    from ckptcore.manager.inspection import DiffReport, RunListing, VerifyReport, diff, list_run, verify
    from ckptcore.manager.manager import CheckpointManager
    from ckptcore.manager.options import CheckpointManagerOptions
    from ckptcore.parallel.options import MultiprocessOptions, multiprocess_options, set_multiprocess_options
    from ckptcore.plugins.hookspecs import hookimpl
    from ckptcore.plugins.manager import PluginInfo, list_plugins, register_plugin, unregister_plugin
    from ckptcore.plugins.registrations import (
        ArrayFormatRegistration,
        AtomicityRegistration,
        CheckpointExporterRegistration,
        CheckpointLayoutRegistration,
        ExportLeaf,
        ExportPiece,
        ForeignCheckpoint,
        Location,
        ReadRequest,
        SaveContext,
        Shard,
        StepLayoutRegistration,
        StorageRegistration,
        WriteRequest,
    )
    from ckptcore.storage.cleanup import clean


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
