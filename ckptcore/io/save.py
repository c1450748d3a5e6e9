"""Saving a pytree: snapshot it into a plan, then write the plan atomically.

The two halves are separate so that an asynchronous save can snapshot in the caller's
thread (``prepare``) and write in the background (``write``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptcore import storage
from ckptcore.errors import (
    AlreadyExistsError,
    CheckpointError,
    InvalidMetadataError,
    StorageError,
    UnsupportedLeafError,
)
from ckptcore.io import gcpause, index
from ckptcore.io import leaves as arrays
from ckptcore.parallel import jax_coordinator as distributed
from ckptcore.plugins.manager import registry
from ckptcore.plugins.registrations import AtomicCommit, Location, ProgressCallback, SaveContext
from ckptcore.tree.keys import KeyPath, format_key_path
from ckptcore.tree.nodes import Node, encode_scalar, encode_tree


@dataclass
class PreparedSave:
    """A snapshot of a pytree: its stored tree and the array writes it needs."""

    tree: Node
    writes: list[arrays.PlannedWrite] = field(default_factory=list)
    # Set in a multi-process jax.distributed job: the group and the scope of this save,
    # fixed in the caller's thread so that background saves keep the call order.
    collective: Any = None

    @property
    def nbytes(self) -> int:
        return sum(w.record["nbytes"] for w in self.writes)


def prepare(
    state: Any, *, copy: bool = False, copy_array: Callable[[np.ndarray], np.ndarray] | None = None
) -> PreparedSave:
    """Validate ``state`` and snapshot it; raises before anything is written.

    With ``copy=True`` mutable buffers (NumPy arrays) are copied, so the caller may change
    them as soon as this returns. ``copy_array`` (with ``copy=True``) replaces that copy of
    a NumPy leaf: e.g. into reused buffers, or the identity for a caller that hands its
    buffers over and promises not to mutate them until the write ends.
    """
    writes: list[arrays.PlannedWrite] = []

    def encode_leaf(path: KeyPath, value: Any) -> Node:
        own_copy = copy and copy_array is not None and isinstance(value, np.ndarray)
        planned = arrays.plan_write(path, value, copy=copy and not own_copy)
        if own_copy and planned is not None and planned.request.shards[0].data is value:
            shard = dataclasses.replace(planned.request.shards[0], data=copy_array(value))  # type: ignore[misc]
            planned.request = dataclasses.replace(planned.request, shards=(shard,))
        if planned is not None:
            writes.append(planned)
            return planned.record
        record = encode_scalar(path, value)
        if record is None:
            raise UnsupportedLeafError(
                f"leaf {format_key_path(path)} has unsupported type {type(value).__module__}.{type(value).__qualname__}; "
                "supported: NumPy and JAX arrays, NumPy scalars, int, float, bool, complex, str, bytes, None, "
                "and dict/list/tuple/namedtuple containers"
            )
        return record

    if "jax" in sys.modules:  # no jax imported: no jax leaves, and the NumPy path never imports it
        from ckptcore.io import jax_leaves as jax_arrays

        jax_arrays.start_host_copies(state)  # all device-to-host copies in flight before any is awaited
    collective = distributed.plan_collective()  # None unless several jax.distributed processes save
    try:
        with gcpause.paused():  # thousands of leaves: see ckptcore.gcpause
            tree = encode_tree(state, encode_leaf)
    except BaseException as exc:
        if collective is not None:  # the other processes' save fails now instead of timing out
            collective.scope.fail(exc)
        raise
    return PreparedSave(tree, writes, collective=collective)


def check_json(value: Any, what: str) -> Any:
    """``value`` if it is plain JSON data, else a clear error."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidMetadataError(f"{what} must be plain JSON data (dict, list, str, finite numbers): {exc}") from exc
    return value


def check_replaceable(location: Location, strategy: AtomicCommit, force: bool) -> None:
    """Refuse to save over anything but a ckptcore checkpoint (and over one without ``force``).

    ``force`` replaces checkpoints only: a directory of other files, a manager's root or a
    regular file at the path is never deleted, whatever ``force`` says.
    """
    fs, path = location.fs, location.path
    try:
        committed = strategy.is_committed(location)
        exists = committed or fs.exists(path)
        if not exists or (not committed and strategy.is_staging(location)):
            return  # nothing there, or the leftover of an interrupted save (replaced by begin)
        is_checkpoint = committed and fs.exists(f"{path.rstrip('/')}/{index.INDEX_FILE}")
        empty_dir = not is_checkpoint and fs.isdir(path) and not fs.ls(path, detail=False)
    except OSError as exc:
        raise StorageError(f"could not check what is at {location.url}: {exc}") from exc
    if is_checkpoint:
        if not force:
            raise AlreadyExistsError(f"a checkpoint already exists at {location.url}; pass force=True to replace it")
        return
    if empty_dir:
        if not force:
            raise AlreadyExistsError(f"{location.url} is an empty directory; remove it or pass force=True to save there")
        return
    what = "a file" if fs.isfile(path) else "a directory that is not a ckptcore checkpoint (no ckptcore_index.json)"
    raise AlreadyExistsError(
        f"{location.url} is {what}; ckptcore never replaces it, even with force=True. Save to another path, "
        "or remove it yourself first."
    )


@contextlib.contextmanager
def aborted_on_failure(strategy: AtomicCommit, staging: Location, what: str) -> Iterator[None]:
    """Abort ``staging`` if the body fails, and report the failure as a ckptcore error.

    ckptcore errors pass through; any other exception becomes a :class:`StorageError`
    saying that saving ``what`` failed, with the original chained.
    """
    try:
        yield
    except BaseException as exc:
        try:
            strategy.abort(staging)
        except Exception:  # the original failure matters more than the cleanup's
            pass
        if isinstance(exc, CheckpointError) or not isinstance(exc, Exception):
            raise
        raise StorageError(f"saving {what} failed: {type(exc).__name__}: {exc}") from exc


def write(
    prepared: PreparedSave,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    format: str | None = None,
    format_options: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    before_commit: Callable[[], None] | None = None,
) -> Location:
    """Write a prepared save to ``path`` and commit it atomically; return its location.

    ``before_commit`` runs right before the commit; if it raises, the save is aborted
    (a background save past its deadline uses it to never publish late).
    """
    if prepared.collective is not None:  # several jax.distributed processes save together
        return distributed.write(
            prepared, prepared.collective, path, force=force, format=format, format_options=format_options,
            metadata=metadata, storage_options=storage_options, progress=progress, before_commit=before_commit,
        )
    user_metadata = check_json(dict(metadata or {}), "checkpoint metadata")
    location = storage.resolve(path, storage_options)
    strategy = storage.atomicity(location)
    check_replaceable(location, strategy, force)
    staging = strategy.begin(location)
    with aborted_on_failure(strategy, staging, location.url):
        write_contents(
            prepared, staging, url=location.url, format=format, format_options=format_options,
            metadata=user_metadata, progress=progress,
        )
        if before_commit is not None:
            before_commit()
        strategy.commit(staging, location, replace=force)
    return location


def write_contents(
    prepared: PreparedSave,
    staging: Location,
    *,
    url: str,
    format: str | None = None,
    format_options: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Write the arrays and the index of a prepared save into ``staging``; commit nothing.

    For callers that commit several checkpoints as one unit (a manager's step with
    several items); ``url`` is where the data will be visible once committed. Returns
    the index written.
    """
    if prepared.collective is not None:  # several jax.distributed processes write their shards
        return distributed.write_contents(
            prepared, staging, url=url, format=format, format_options=format_options, metadata=metadata,
            progress=progress,
        )
    user_metadata = check_json(dict(metadata or {}), "checkpoint metadata")
    format_name = format or (registry().default_array_format() if prepared.writes else "")
    fmt = registry().array_format(format_name) if prepared.writes else None
    _write_arrays(prepared, staging, format_name, fmt, dict(format_options or {}), progress)
    return write_index(prepared, staging, url=url, format_name=format_name, fmt=fmt, metadata=user_metadata)


def write_index(
    prepared: PreparedSave, staging: Location, *, url: str, format_name: str, fmt: Any, metadata: dict[str, Any]
) -> dict[str, Any]:
    """Write the index of ``prepared`` (whose records are complete) into ``staging``."""
    user_metadata = metadata
    formats = {}
    if fmt is not None:
        formats[format_name] = {"version": fmt.version, "distribution": fmt.distribution, "plugin_version": fmt.plugin_version}
    context = SaveContext(url=url, formats=tuple(formats), user_metadata=user_metadata)
    doc = {
        "format": index.FORMAT,
        "format_version": index.FORMAT_VERSION,
        "ckptcore_version": _version(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
        "array_formats": formats,
        "total_bytes": prepared.nbytes,
        "metadata": user_metadata,
        "plugin_metadata": registry().index_metadata(context),
        "tree": prepared.tree,
    }
    staging.fs.makedirs(staging.path, exist_ok=True)
    staging.fs.pipe_file(f"{staging.path}/{index.INDEX_FILE}", index.encode_index(doc))
    return doc


def _write_arrays(
    prepared: PreparedSave,
    staging: Location,
    format_name: str,
    fmt: Any,
    options: dict[str, Any],
    progress: ProgressCallback | None,
) -> None:
    if not prepared.writes:
        return
    total = prepared.nbytes
    if progress:
        progress(0, total)
    # Checksums run beside the format's writes (zlib releases the GIL), in batches of
    # leaves: one pool job per small leaf would cost more than its checksum.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckptcore-checksum") as pool:
        jobs = [pool.submit(_batch_checksums, batch) for batch in _checksum_batches(prepared.writes)]
        infos = fmt.format.write(staging.child(format_name), [w.request for w in prepared.writes], options)
        sums = [s for job in jobs for s in job.result()]
        for w, info, checksums in zip(prepared.writes, infos, sums, strict=True):
            w.record.update(format=format_name, key=w.request.key, format_info=info, **checksums)
    if progress:
        progress(total, total)


_CHECKSUM_BATCH_BYTES = 8 << 20


def _checksum_batches(writes: list[arrays.PlannedWrite]) -> list[list[arrays.PlannedWrite]]:
    """Consecutive writes grouped into runs of about ``_CHECKSUM_BATCH_BYTES``."""
    batches: list[list[arrays.PlannedWrite]] = []
    size = _CHECKSUM_BATCH_BYTES
    for w in writes:
        if size >= _CHECKSUM_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(w)
        size += w.record["nbytes"]
    return batches


def _batch_checksums(batch: list[arrays.PlannedWrite]) -> list[dict[str, Any]]:
    return [_shard_checksums(w) for w in batch]


def _shard_checksums(write: arrays.PlannedWrite) -> dict[str, Any]:
    shards = write.request.shards
    if len(shards) == 1 and all(
        s.start == 0 and s.stop == n for s, n in zip(shards[0].index, write.request.shape, strict=False)
    ):
        return {"checksum": arrays.checksum(shards[0].data)}
    return {
        "shard_checksums": [
            {"index": [[s.start, s.stop] for s in shard.index], "checksum": arrays.checksum(shard.data)}
            for shard in shards
        ]
    }


def _version() -> str:
    from ckptcore import __version__

    return __version__
