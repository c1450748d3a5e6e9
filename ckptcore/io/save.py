"""Saving a pytree: one walk for one process and for a ``jax.distributed`` job.

    flatten -> plan -> snapshot -> begin -> write own shards -> gather reports -> index -> commit

:func:`prepare` flattens and snapshots the state in the caller's thread (an asynchronous
save then writes in the background); :func:`write` runs the rest. What differs between one
process and many is behind the :class:`~ckptcore.parallel.coordinator.Coordinator`: with
the local one, "broadcast" is a function call and "gather" a one-item list; with JAX's,
the primary begins, writes the index and commits while every process writes its own shards
into its own directory (:mod:`ckptcore.io.multiwriter`).
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
from typing import Any

import numpy as np

from ckptcore import storage
from ckptcore.errors import (
    AlreadyExistsError,
    CheckpointError,
    InvalidMetadataError,
    ProcessFailedError,
    StorageError,
    UnsupportedLeafError,
)
from ckptcore.io import checksums, gcpause, index, multiwriter
from ckptcore.io import leaves as arrays
from ckptcore.io.plans import PreparedSave
from ckptcore.parallel.coordinator import LOCAL, Coordinator, Operation
from ckptcore.plugins.manager import registry
from ckptcore.plugins.registrations import AtomicCommit, Location, ProgressCallback, SaveContext
from ckptcore.tree.keys import KeyPath, format_key_path
from ckptcore.tree.nodes import Node, encode_scalar, encode_tree
from ckptcore.version import __version__


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
        return encode_leaf_into(writes, path, value, copy=copy, copy_array=copy_array)

    if sys.modules.get("jax") is not None:  # no JAX in use: no JAX leaves, and NumPy users never import it
        from ckptcore.io import jax_leaves

        jax_leaves.start_host_copies(state)  # all device-to-host copies in flight before any is awaited
    with gcpause.paused():  # thousands of leaves: see ckptcore.gcpause
        tree = encode_tree(state, encode_leaf)
    return PreparedSave(tree, writes)


def encode_leaf_into(
    writes: list[arrays.PlannedWrite], path: KeyPath, value: Any, *, copy: bool,
    copy_array: Callable[[np.ndarray], np.ndarray] | None,
) -> Node:
    """The index record of one leaf; an array leaf's write is appended to ``writes`` (see :func:`prepare`)."""
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


def estimate_nbytes(state: Any) -> int:
    """Bytes of the array leaves of ``state``, without copying anything (0 if it cannot be walked)."""
    total = 0

    def leaf(path: Any, value: Any) -> dict[str, Any]:
        nonlocal total
        if isinstance(value, np.ndarray) or arrays.is_jax_value(value):
            total += int(getattr(value, "nbytes", 0))
        return {}

    try:
        encode_tree(state, leaf)
    except CheckpointError:
        return 0  # prepare() raises the proper error
    return total


def snapshot(state: Any, operation: Operation, **options: Any) -> PreparedSave:
    """:func:`prepare` for a collective call: a failure also fails ``operation`` on the other processes."""
    try:
        return prepare(state, **options)
    except BaseException as exc:
        operation.fail(exc)  # the others' save fails now instead of timing out
        raise


def resolve(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None, operation: Operation) -> Location:
    """:func:`ckptcore.storage.resolve` for a collective call: a bad path fails every process at once."""
    try:
        return storage.resolve(path, storage_options)
    except BaseException as exc:
        operation.fail(exc)
        raise


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


class Transaction:
    """The atomic commit of one save, shared by the processes of its operation.

    The primary begins (and broadcasts where the data goes) and commits once every process
    said its part is durable; the others follow and return once the commit is visible. An
    abort on any process fails the save on all of them. With the local coordinator this is
    the atomicity plugin's own begin/commit/abort.
    """

    def __init__(
        self,
        strategy: AtomicCommit,
        operation: Operation,
        coordinator: Coordinator,
        *,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        self.strategy = strategy
        self.operation = operation
        self.coordinator = coordinator
        self.before_commit = before_commit

    def begin(self, final: Location, check: Callable[[], None] | None = None) -> Location:
        """Where to write (``check`` runs first, on the primary: e.g. refuse to overwrite)."""
        began: list[Location] = []

        def begin() -> str:
            if check is not None:
                check()
            began.append(self.strategy.begin(final))
            return _relative_name(final, began[0])

        try:
            name = self.operation.broadcast("staging", begin)
        except BaseException as exc:
            self.operation.fail(exc)
            raise
        return began[0] if began else _staging_location(final, name)

    def commit(self, staging: Location, final: Location, *, replace: bool) -> None:
        def commit() -> str:
            if self.before_commit is not None:
                self.before_commit()
            self.strategy.commit(staging, final, replace=replace)
            return "committed"

        try:
            self.operation.gather("ready", True)  # the primary learns that every process's data is durable
            self.operation.broadcast("outcome", commit)
        except BaseException as exc:
            self.operation.fail(exc)
            raise

    def abort(self, staging: Location) -> None:
        self.operation.fail(ProcessFailedError("the save was aborted"), f"ready/{self.coordinator.process}")
        if self.coordinator.is_primary:
            self.strategy.abort(staging)


def _relative_name(final: Location, staging: Location) -> str:
    """How the other processes find ``staging``: "" (in place), a sibling's name, or a full URL."""
    if staging.url == final.url:
        return ""
    if staging.parent().url == final.parent().url:
        return "sibling:" + staging.name
    return "url:" + staging.url


def _staging_location(final: Location, name: str) -> Location:
    if not name:
        return final
    if name.startswith("sibling:"):
        return final.parent().child(name[len("sibling:") :])
    return storage.resolve(name[len("url:") :], final.options)


@contextlib.contextmanager
def aborted_on_failure(transaction: Transaction, staging: Location, what: str) -> Iterator[None]:
    """Abort ``staging`` if the body fails, and report the failure as a ckptcore error.

    ckptcore errors pass through; any other exception becomes a :class:`StorageError`
    saying that saving ``what`` failed, with the original chained.
    """
    try:
        yield
    except BaseException as exc:
        try:
            transaction.abort(staging)
        except Exception:  # the original failure matters more than the cleanup's
            pass
        if isinstance(exc, CheckpointError) or not isinstance(exc, Exception):
            raise
        raise StorageError(f"saving {what} failed: {type(exc).__name__}: {exc}") from exc


def write(
    prepared: PreparedSave,
    location: Location,
    *,
    operation: Operation | None = None,
    coordinator: Coordinator = LOCAL,
    force: bool = False,
    format: str | None = None,
    format_options: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    before_commit: Callable[[], None] | None = None,
) -> None:
    """Write a prepared save to ``location`` and commit it atomically; every process calls it.

    ``coordinator`` and ``operation`` default to one process alone (the operation must be
    created in the caller's thread when the write runs in the background).

    ``before_commit`` runs right before the commit; if it raises, the save is aborted
    (a background save past its deadline uses it to never publish late).
    """
    operation = operation or coordinator.operation("save", "a collective save")
    user_metadata = check_json(dict(metadata or {}), "checkpoint metadata")
    strategy = storage.atomicity(location)
    transaction = Transaction(strategy, operation, coordinator, before_commit=before_commit)
    staging = transaction.begin(location, check=lambda: check_replaceable(location, strategy, force))
    where = location.url if coordinator.size == 1 else f"{location.url} on process {coordinator.process}"
    with aborted_on_failure(transaction, staging, where):
        write_contents(
            prepared, staging, url=location.url, operation=operation, coordinator=coordinator, format=format,
            format_options=format_options, metadata=user_metadata, progress=progress,
        )
        transaction.commit(staging, location, replace=force)


def write_contents(
    prepared: PreparedSave,
    staging: Location,
    *,
    url: str,
    operation: Operation | None = None,
    coordinator: Coordinator = LOCAL,
    format: str | None = None,
    format_options: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    """Write this process's shards into ``staging``; the primary also writes the index. Commit nothing.

    For callers that commit several checkpoints as one unit (a manager's step with several
    items, each with its own ``prefix`` in the operation); ``url`` is where the data will be
    visible once committed. Returns the index on the primary, and on the others an index
    without its tree (its formats and size).
    """
    operation = operation or coordinator.operation("save", "a collective save")
    user_metadata = check_json(dict(metadata or {}), "checkpoint metadata")
    format_name = format or (registry().default_array_format() if prepared.writes else "")
    fmt = registry().array_format(format_name) if prepared.writes else None
    try:
        writers = multiwriter.assign_whole_leaves(prepared, operation, coordinator, url, prefix)
        mine = [
            (i, w) for i, w in enumerate(prepared.writes)
            if w.request.shards and writers.get(i, coordinator.process) == coordinator.process
        ]
        report: list[dict[str, Any]] = []
        if mine and fmt is not None:
            if progress:
                progress(0, prepared.nbytes)
            directory = staging.child(format_name)
            if coordinator.writer_directory:
                directory = directory.child(coordinator.writer_directory)
            report = write_own_shards(mine, fmt, directory, coordinator.process, dict(format_options or {}))
            if progress:
                progress(prepared.nbytes, prepared.nbytes)
        reports = operation.gather(f"{prefix}written", report)
        if reports is None:  # not the primary: the primary writes the index
            formats: dict[str, Any] = {format_name: {}} if fmt is not None else {}
            return {"array_formats": formats, "total_bytes": prepared.nbytes}
        multiwriter.merge_reports(prepared, reports, coordinator, format_name, url)
        return write_index(prepared, staging, url=url, format_name=format_name, fmt=fmt, metadata=user_metadata)
    except BaseException as exc:
        operation.fail(exc)
        raise


def write_own_shards(
    mine: list[tuple[int, arrays.PlannedWrite]], fmt: Any, location: Location, process: int, options: dict[str, Any]
) -> list[dict[str, Any]]:
    """Write this process's shards with the array format; checksum them meanwhile (CRC-32C releases the GIL)."""
    requests = [w.request for _, w in mine]
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckptcore-checksum") as pool:
        jobs = [pool.submit(checksums.of_shards, batch) for batch in checksums.batches(requests)]
        infos = fmt.format.write(location, requests, options)
        sums = [leaf for job in jobs for leaf in job.result()]
    return [
        {
            "w": i,
            "process": process,
            "info": info,
            "shards": [[[s.start, s.stop] for s in shard.index] for shard in request.shards],
            "checksums": leaf_sums,
            # one shard as large as the array: the whole leaf (lets the merge skip the coverage sums)
            "whole": len(request.shards) == 1 and request.shards[0].data.shape == request.shape,
        }
        for (i, _), request, info, leaf_sums in zip(mine, requests, infos, sums, strict=True)
    ]


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
        "ckptcore_version": __version__,
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
