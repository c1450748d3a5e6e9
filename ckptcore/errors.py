"""The exceptions ckptcore raises.

Every error is a :class:`CheckpointError`; its message says what failed, where (path,
key, plugin) and what to do about it. Catch the subclasses to react to one failure kind.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error raised by ckptcore."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint (committed or not) exists at the path."""


class NotCommittedError(CheckpointError):
    """A directory exists but was never committed (a save was interrupted or is running)."""


class AlreadyExistsError(CheckpointError, FileExistsError):
    """A checkpoint already exists where a save was asked to write; pass ``force=True``."""


class StepAlreadyExistsError(AlreadyExistsError):
    """The manager already holds this step; pass ``force=True`` to replace it."""


class CorruptCheckpointError(CheckpointError):
    """Stored data is unreadable, truncated or inconsistent with the checkpoint index."""


class ChecksumMismatchError(CorruptCheckpointError):
    """Array bytes read back do not match the checksum recorded when they were saved."""


class MissingPluginError(CheckpointError):
    """A plugin needed for a URL scheme, an array format or a layout is not installed."""


class PluginConflictError(CheckpointError):
    """Two plugins claim the same scheme, format or layout name."""


class PluginError(CheckpointError):
    """A plugin misbehaved: it returned something invalid or raised unexpectedly."""


class TargetMismatchError(CheckpointError, ValueError):
    """The restore target does not fit the checkpoint (missing keys, shapes, structure)."""


class UnsupportedLeafError(CheckpointError, TypeError):
    """A leaf of the tree has a type ckptcore cannot save."""


class IncompatibleVersionError(CheckpointError):
    """The checkpoint was written by a newer ckptcore or plugin than the one installed."""


class ReadOnlyError(CheckpointError, PermissionError):
    """A write was attempted through a read-only manager."""


class StorageError(CheckpointError, OSError):
    """The storage backend failed (permission denied, bucket missing, network, timeout)."""


class CheckpointTimeoutError(CheckpointError, TimeoutError):
    """An operation did not finish within its deadline."""


__all__ = [
    "AlreadyExistsError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointTimeoutError",
    "ChecksumMismatchError",
    "CorruptCheckpointError",
    "IncompatibleVersionError",
    "MissingPluginError",
    "NotCommittedError",
    "PluginConflictError",
    "PluginError",
    "ReadOnlyError",
    "StepAlreadyExistsError",
    "StorageError",
    "TargetMismatchError",
    "UnsupportedLeafError",
]


class InvalidMetadataError(CheckpointError, ValueError):
    """User metadata or metrics are not JSON-serialisable plain data."""


__all__.append("InvalidMetadataError")


class NotACheckpointRootError(CheckpointError, ValueError):
    """A manager was pointed at something that is not a directory of checkpoint steps."""


class ConcurrentWriterError(CheckpointError):
    """Another live manager holds the writer lock of this checkpoint directory."""


class StepInUseError(CheckpointError):
    """A step cannot be deleted now: a reader holds a live lease on it."""


__all__ += ["ConcurrentWriterError", "NotACheckpointRootError", "StepInUseError"]


class InvalidOptionError(CheckpointError, ValueError):
    """An option passed to ckptcore has an invalid value (the message names it and what is accepted)."""


class CheckpointerClosedError(CheckpointError, RuntimeError):
    """A checkpointer was used after ``close()``; create a new one."""


__all__ += ["CheckpointerClosedError", "InvalidOptionError"]


class BackgroundWriteError(CheckpointError):
    """A background save failed; the original exception is chained as ``__cause__``."""


class ProcessFailedError(CheckpointError):
    """Another process of a collective (multi-process) checkpoint operation failed or stopped answering."""


__all__ += ["BackgroundWriteError", "ProcessFailedError"]


class TransformError(CheckpointError, ValueError):
    """A restore transformation is invalid or failed: a bad pattern, two saved keys renamed onto one,
    or a ``value_fn`` that raised (the message names the key path; nothing on storage is changed)."""


__all__ += ["TransformError"]
