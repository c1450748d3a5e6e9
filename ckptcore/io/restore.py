"""Restoring a pytree, reading its metadata, and describing a checkpoint."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptcore.io import leaves as arrays

from ckptcore.parallel import jax_coordinator as distributed

from ckptcore.io import gcpause

from ckptcore.io import index

from ckptcore.io import memory

from ckptcore.parallel import replicas

from ckptcore import storage
from ckptcore.tree.dtypes import dtype_from_name
from ckptcore.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleVersionError,
    MissingPluginError,
    NotCommittedError,
    PluginError,
    StorageError,
    TargetMismatchError,
)
from ckptcore.tree.keys import KeyPath, format_key_path, is_safe_storage_key
from ckptcore.plugins.manager import registry
from ckptcore.plugins.registrations import Location, ProgressCallback, ReadRequest
from ckptcore.tree.nodes import ARRAY_KINDS, Node, build_container, children, decode_scalar, is_namedtuple, iter_leaves

# Small enough that a restore onto devices (whose host copies are transient) peaks near its
# result's size, large enough to keep the format's reads parallel.
DEFAULT_MAX_BYTES_IN_FLIGHT = 256 << 20


@dataclass(frozen=True)
class ArrayMetadata:
    """What the index says about an array leaf (no array data is read)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int
    format: str
    kind: str = "ndarray"
    sharding: Mapping[str, Any] | None = None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint as a whole: its tree of metadata plus what the index says about it."""

    url: str
    tree: Any
    created: str
    total_bytes: int
    format_version: int
    ckptcore_version: str
    array_formats: Mapping[str, Any]
    metadata: Mapping[str, Any]
    plugin_metadata: Mapping[str, Any]
    leaves: list[tuple[str, Node]]
    stored_tree: Node  # the tree exactly as the index stores it (plain JSON)


def open_committed(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> tuple[Location, dict[str, Any]]:
    """The location and index of the committed checkpoint at ``path``."""
    location = storage.resolve(path, storage_options)
    strategy = storage.atomicity(location)
    if not strategy.is_committed(location):
        try:
            exists = location.fs.exists(location.path)
        except OSError as exc:
            raise StorageError(f"could not check {location.url}: {exc}") from exc
        if exists and location.fs.isfile(location.path):
            raise CheckpointNotFoundError(f"{location.url} is a file, not a checkpoint directory; check the path")
        if exists:
            raise NotCommittedError(
                f"{location.url} exists but holds no committed checkpoint: a save there was interrupted or is "
                "still running. Wait for it, or remove the directory if no save is running."
            )
        raise CheckpointNotFoundError(
            f"no checkpoint at {location.url}; check the path (and, for object stores, the bucket and "
            "storage_options). A manager's steps are restored with CheckpointManager(root).restore(step)."
        )
    return location, index.read_index(location)


def metadata(path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> Any:
    """The saved tree with array leaves replaced by :class:`ArrayMetadata`; no array data is read.

    Scalars and strings, which are stored in the index itself, are returned as values.
    """
    _, doc = open_committed(path, storage_options)
    return metadata_tree(doc)


def metadata_tree(doc: dict[str, Any]) -> Any:
    """The metadata tree of an index already read."""
    return _metadata_tree(doc["tree"], ())


def _metadata_tree(node: Node, path: KeyPath) -> Any:
    if node["type"] == "none":
        return None
    if node["type"] == "leaf":
        if node.get("kind") in ARRAY_KINDS:
            return _array_metadata(node)
        return decode_scalar(path, node)
    return build_container(node, [(k, _metadata_tree(c, (*path, k))) for k, c in children(node)], path)


def _array_metadata(record: Node) -> ArrayMetadata:
    return ArrayMetadata(
        shape=tuple(record["shape"]), dtype=dtype_from_name(record["dtype"]), nbytes=int(record["nbytes"]),
        format=record.get("format", ""), kind=record["kind"], sharding=record.get("sharding"),
    )


def info(path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> CheckpointInfo:
    """Everything the index of the checkpoint at ``path`` says; no array data is read."""
    location, doc = open_committed(path, storage_options)
    return CheckpointInfo(
        url=location.url, tree=_metadata_tree(doc["tree"], ()), created=doc.get("created", ""),
        total_bytes=int(doc.get("total_bytes", 0)), format_version=doc["format_version"],
        ckptcore_version=doc.get("ckptcore_version", ""), array_formats=doc.get("array_formats", {}),
        metadata=doc.get("metadata", {}), plugin_metadata=doc.get("plugin_metadata", {}),
        leaves=[(format_key_path(p), r) for p, r in iter_leaves(doc["tree"])],
        stored_tree=doc["tree"],
    )


# -- restore ---------------------------------------------------------------------------


@dataclass
class _PendingRead:
    path: KeyPath
    record: Node
    request: ReadRequest
    finish: Callable[[list[np.ndarray]], Any]
    slot: list[Any]


class _Planner:
    """Walks the stored tree beside the target, collecting reads and every mismatch."""

    def __init__(self, partial: bool) -> None:
        self.partial = partial
        self.reads: list[_PendingRead] = []
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.mismatched: list[str] = []
        self.saved_paths: list[str] = []

    def plan(self, node: Node, target: Any, path: KeyPath, has_target: bool) -> Any:
        """A result skeleton: containers with placeholders (one-item lists) for array reads."""
        kind = node["type"]
        if has_target and target is None and kind != "none":
            return None  # a None in the target skips this subtree
        if kind == "none":
            return None
        if kind == "leaf":
            return self._leaf(node, target if has_target else None, path)
        if not has_target:
            return build_container(node, [(k, self.plan(c, None, (*path, k), False)) for k, c in children(node)], path)
        return self._container(node, target, path)

    def _leaf(self, record: Node, target: Any, path: KeyPath) -> Any:
        if record.get("kind") not in ARRAY_KINDS:
            return decode_scalar(path, record)
        if not is_safe_storage_key(record.get("key")):
            raise CorruptCheckpointError(
                f"the storage key {record.get('key')!r} of {format_key_path(path)} is invalid; the index is corrupt"
            )
        try:
            request, finish = arrays.plan_read(path, record, target)
        except TargetMismatchError as exc:
            self.mismatched.append(str(exc))
            return None
        slot: list[Any] = [None]
        self.reads.append(_PendingRead(path, record, request, finish, slot))
        return slot

    def _container(self, node: Node, target: Any, path: KeyPath) -> Any:
        saved = dict(children(node))
        kind = node["type"]
        if isinstance(target, Mapping):
            if kind != "dict":
                self.mismatched.append(f"{format_key_path(path)}: the target has a dict, the checkpoint a {kind}")
                return None
            out = {}
            for key, sub in target.items():
                if key not in saved:
                    self.missing.append(format_key_path((*path, key)))
                    continue
                out[key] = self.plan(saved[key], sub, (*path, key), True)
            if not self.partial:
                self.unexpected += [format_key_path((*path, k)) for k in saved if k not in target]
            return out if type(target) is dict else type(target)(out)  # type: ignore[call-arg]
        if isinstance(target, (list, tuple)):
            if kind not in ("list", "tuple", "namedtuple") or len(target) != len(saved):
                self.mismatched.append(
                    f"{format_key_path(path)}: the target has a {type(target).__name__} of {len(target)}, "
                    f"the checkpoint a {kind} of {len(saved)}"
                )
                return None
            values = [self.plan(c, t, (*path, k), True) for (k, c), t in zip(children(node), target, strict=True)]
            if is_namedtuple(target):
                return type(target)(*values)
            return type(target)(values)
        if kind != "leaf":
            # A leaf-like target (e.g. an array) where the checkpoint holds a container.
            self.mismatched.append(
                f"{format_key_path(path)}: the target has a {type(target).__name__}, the checkpoint a {kind}"
            )
        return None

    def raise_if_mismatched(self, url: str) -> None:
        problems = []
        if self.missing:
            lines = []
            for p in self.missing:
                near = difflib.get_close_matches(p, self.saved_paths, n=3)
                lines.append(f"  {p}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
            problems.append("keys in the target but not in the checkpoint:\n" + "\n".join(lines))
        if self.unexpected:
            problems.append(
                "keys in the checkpoint but not in the target (pass partial=True to skip them):\n"
                + "\n".join(f"  {p}" for p in self.unexpected)
            )
        if self.mismatched:
            problems.append("structure or shape mismatches:\n" + "\n".join(f"  {p}" for p in self.mismatched))
        if problems:
            raise TargetMismatchError(f"the target does not fit the checkpoint at {url}:\n" + "\n".join(problems))


def restore(
    path: str | os.PathLike[str],
    target: Any = None,
    *,
    partial: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    max_bytes_in_flight: int | None = None,
    progress: ProgressCallback | bool | None = None,
) -> Any:
    """Restore the checkpoint at ``path``.

    :param target: ``None`` for the saved tree as saved; otherwise a tree whose leaves
        say what to restore: NumPy arrays or objects with ``.shape``/``.dtype`` (shape is
        checked, dtype is cast to), ``jax.ShapeDtypeStruct`` or ``jax.Array`` (restored
        onto their sharding), or ``None`` to skip a leaf or subtree. Containers are
        rebuilt with the target's types.
    :param partial: the target may name a subset of the checkpoint; only those leaves are read.
    :param max_bytes_in_flight: the most array bytes read at once (bounds memory beyond the result).
    :param progress: ``True`` for a progress bar, or a callable(bytes read, bytes total).
    :raises TargetMismatchError: listing every missing key, extra key and shape mismatch.
    """
    from ckptcore import progress as progress_lib

    with gcpause.paused(), progress_lib.resolve(progress, f"restoring {path}") as callback:
        # gcpause: a blocking call whose many short-lived objects need no collection
        location, doc = open_committed(path, storage_options)
        return restore_location(
            location, doc, target, partial=partial, max_bytes_in_flight=max_bytes_in_flight, progress=callback
        )


def restore_location(
    location: Location,
    doc: dict[str, Any],
    target: Any = None,
    *,
    partial: bool = False,
    max_bytes_in_flight: int | None = None,
    progress: ProgressCallback | None = None,
) -> Any:
    """Restore from a location whose index ``doc`` is already read (commit checked by the caller).

    For callers that commit several checkpoints as one unit, such as a manager's items.
    """
    with gcpause.paused():  # thousands of leaves: see ckptcore.gcpause
        return _restore_location(location, doc, target, partial, max_bytes_in_flight, progress)


def _restore_location(
    location: Location,
    doc: dict[str, Any],
    target: Any,
    partial: bool,
    max_bytes_in_flight: int | None,
    progress: ProgressCallback | None,
) -> Any:
    target, widen = replicas.single_replica_targets(target)  # identity unless that option is on
    planner = _Planner(partial)
    skeleton = planner.plan(doc["tree"], target, (), target is not None)
    if planner.missing:  # only for "did you mean" hints: thousands of paths are costly to format
        planner.saved_paths = [format_key_path(p) for p, _ in iter_leaves(doc["tree"])]
    planner.raise_if_mismatched(location.url)
    _execute_reads(location, doc, planner.reads, max_bytes_in_flight or DEFAULT_MAX_BYTES_IN_FLIGHT, progress)
    return widen(_fill(skeleton, {id(r.slot) for r in planner.reads}))


def _execute_reads(
    location: Location, doc: dict[str, Any], reads: list[_PendingRead], limit: int, progress: ProgressCallback | None
) -> None:
    by_format: dict[str, list[_PendingRead]] = {}
    for r in reads:
        by_format.setdefault(r.record.get("format", ""), []).append(r)
    nbytes = {id(r): r.request.dtype.itemsize * _region_elements(r.request) for r in reads}
    total = sum(nbytes.values())
    done = 0
    for name, group in by_format.items():
        fmt = _format_for(name, doc, location.url)
        waves = _waves(group, limit)
        # The next wave is read while this one is verified and finished: disk and CPU overlap.
        # The read buffers in flight stay one wave's (finishing allocates nothing for NumPy).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptcore-read") as reader:
            pending = reader.submit(_read_wave, fmt, location, name, waves[0]) if waves else None
            for k, wave in enumerate(waves):
                assert pending is not None
                results = pending.result()
                pending = reader.submit(_read_wave, fmt, location, name, waves[k + 1]) if k + 1 < len(waves) else None
                _finish_wave(wave, results, nbytes)
                del results
                wave_bytes = sum(nbytes[id(r)] for r in wave)
                if wave_bytes >= _TRIM_AFTER_BYTES:  # trimming costs ~10 ms: not worth it for small waves
                    memory.release_free_memory()  # the wave's read buffers, before more are allocated
                done += wave_bytes
                if progress:
                    progress(done, total)


def _read_wave(fmt: Any, location: Location, name: str, wave: list[_PendingRead]) -> list[list[np.ndarray]]:
    try:
        # distributed.read_arrays: fmt.format.read, also for leaves written by several processes
        results = distributed.read_arrays(fmt.format, location.child(name), [r.request for r in wave], {})
    except CheckpointError:
        raise
    except Exception as exc:
        raise CorruptCheckpointError(
            f"reading arrays of {location.url} (format {name!r}) failed: {exc}; "
            "the data is missing or corrupt, or the storage failed"
        ) from exc
    if len(results) != len(wave):
        raise PluginError(
            f"array format {name!r} ({fmt.distribution}) returned {len(results)} results for "
            f"{len(wave)} read requests; report this to the plugin's authors"
        )
    return results


_PARALLEL_FINISH_BYTES = 1 << 20
_TRIM_AFTER_BYTES = 64 << 20


def _finish_wave(wave: list[_PendingRead], results: list[list[np.ndarray]], nbytes: dict[int, int]) -> None:
    """Run the finishers (checksum checks) of a wave; large leaves' in threads, as zlib releases the GIL."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckptcore-verify") as pool:
        jobs = {
            id(r): pool.submit(r.finish, arrays_read)
            for r, arrays_read in zip(wave, results, strict=True)
            if nbytes[id(r)] >= _PARALLEL_FINISH_BYTES
        }
        for r, arrays_read in zip(wave, results, strict=True):
            job = jobs.get(id(r))
            r.slot[0] = job.result() if job is not None else r.finish(arrays_read)


def _region_elements(request: ReadRequest) -> int:
    # math.prod: np.prod costs microseconds per call, which adds up over thousands of leaves.
    return sum(math.prod(s.stop - s.start for s in region) for region in request.regions)


def _waves(group: list[_PendingRead], limit: int) -> list[list[_PendingRead]]:
    waves: list[list[_PendingRead]] = [[]]
    size = 0
    for r in group:
        n = r.request.dtype.itemsize * _region_elements(r.request)
        if waves[-1] and size + n > limit:
            waves.append([])
            size = 0
        waves[-1].append(r)
        size += n
    return [w for w in waves if w]


def _format_for(name: str, doc: dict[str, Any], url: str) -> Any:
    saved = doc.get("array_formats", {}).get(name, {})
    try:
        reg = registry().array_format(name)
    except MissingPluginError as exc:
        dist = saved.get("distribution") if isinstance(saved, dict) else None
        if not dist or not isinstance(dist, str) or not dist.replace("-", "").replace("_", "").isalnum():
            raise
        raise MissingPluginError(
            f"{url} holds arrays in format {name!r}, written by the plugin distribution {dist} "
            f"{saved.get('plugin_version', '')}, which is not installed here: {exc}"
        ) from exc
    if int(saved.get("version", 1)) > reg.version:
        raise IncompatibleVersionError(
            f"{url} was written with array format {name!r} version {saved.get('version')} by "
            f"{saved.get('distribution')} {saved.get('plugin_version')}; the installed {reg.distribution} "
            f"{reg.plugin_version} reads up to version {reg.version}: pip install -U {reg.distribution or 'ckptcore'}"
        )
    return reg


def _fill(skeleton: Any, slots: set[int]) -> Any:
    if isinstance(skeleton, list) and id(skeleton) in slots:
        return skeleton[0]
    if isinstance(skeleton, dict):
        filled = {k: _fill(v, slots) for k, v in skeleton.items()}
        return filled if type(skeleton) is dict else type(skeleton)(filled)
    if is_namedtuple(skeleton):
        return type(skeleton)(*(_fill(v, slots) for v in skeleton))
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_fill(v, slots) for v in skeleton)
    return skeleton
