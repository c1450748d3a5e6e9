"""Many JAX processes saving and restoring one checkpoint together.

Coordination goes through JAX's own distributed runtime (``jax.distributed``): its
key-value store and nothing else. No device collective is used to coordinate, so a save
works on CPU and while accelerators are busy.

The protocol of one collective save (every active process calls ``save`` with the same
arguments, in the same order, like any JAX collective):

1. The primary process checks the target, begins the atomic commit and publishes where
   the data goes (the staging location); the others wait for it.
2. Every process writes the shards it owns (replica 0 of each of its addressable shards;
   NumPy leaves only on the primary) with the array format into its own directory
   ``<format>/process_<i>/`` (an OCDBT database needs a single writer, and per-process
   directories make any third-party format safe too), then publishes what it wrote
   (format info, shard indices, checksums) as JSON. Publishing comes after the format's
   write returned, i.e. after the data is durable.
3. The primary gathers every process's report (proof that every shard is durable), checks
   that each array is covered exactly once, writes the index and commits, then publishes
   the outcome. Nobody returns before the outcome: the checkpoint is visible on return.

Any process that fails publishes its error in the slot the others wait on, so a failure on
one process becomes a :class:`CheckpointError` naming it on all; a process that dies is
noticed by the timeout of every wait.

Reading needs no coordination: each index record of a multi-process save lists, per
writer, the shard regions it holds (``format_info["writers"]``), and
:func:`read_arrays` reads every requested region from the writers that hold it.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptcore.errors import (
    AlreadyExistsError,
    CheckpointError,
    CheckpointTimeoutError,
    CorruptCheckpointError,
    ProcessFailedError,  # re-exported: defined with the other errors
)

if TYPE_CHECKING:
    import numpy as np

    from ckptcore.io.save import PreparedSave
    from ckptcore.plugins.registrations import ArrayFormat, Location, ProgressCallback, ReadRequest

KEY_PREFIX = "ckptcore"
DEFAULT_TIMEOUT_S = 300.0
VALUE_PART_BYTES = 1 << 20  # larger KV values are split into parts (the runtime's messages are bounded)


# -- options and groups ----------------------------------------------------------------


@dataclass(frozen=True)
class MultiprocessOptions:
    """How the processes of a ``jax.distributed`` job cooperate on checkpoints.

    :param primary: the process that creates the staging location, writes the index,
        commits, decides for a manager and deletes old steps.
    :param processes: the JAX process indices taking part (default: all). Only they may
        call save/restore; arrays must live on their devices.
    :param timeout_s: the longest any process waits for another (covers the slowest
        process's writes); past it the wait fails with an error naming the late process.
    :param single_replica_restore: read each replicated array once (on the replica whose
        devices come first along ``replica_axis``) and broadcast it to the other replicas
        through JAX instead of every replica reading it from storage.
    :param replica_axis: the mesh axis along which arrays are replicated (default: the
        first mesh axis a leaf's partition spec does not use).
    """

    primary: int = 0
    processes: tuple[int, ...] | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    single_replica_restore: bool = False
    replica_axis: str | None = None


_default_options = MultiprocessOptions()
_options_var: contextvars.ContextVar[MultiprocessOptions | None] = contextvars.ContextVar(
    "ckptcore_multiprocess_options", default=None
)


def set_multiprocess_options(options: MultiprocessOptions | None = None, **changes: Any) -> MultiprocessOptions:
    """Set the process-wide multi-process options (``None``: the defaults); return them."""
    global _default_options
    base = options or MultiprocessOptions()
    _default_options = _replace_options(base, changes)
    return _default_options


@contextlib.contextmanager
def multiprocess_options(options: MultiprocessOptions | None = None, **changes: Any) -> Iterator[MultiprocessOptions]:
    """Use other multi-process options for the calls made inside the ``with`` block."""
    chosen = _replace_options(options or current_options(), changes)
    token = _options_var.set(chosen)
    try:
        yield chosen
    finally:
        _options_var.reset(token)


def current_options() -> MultiprocessOptions:
    return _options_var.get() or _default_options


def _replace_options(options: MultiprocessOptions, changes: Mapping[str, Any]) -> MultiprocessOptions:
    import dataclasses

    if "processes" in changes and changes["processes"] is not None:
        changes = {**changes, "processes": tuple(int(p) for p in changes["processes"])}
    try:
        return dataclasses.replace(options, **changes)
    except TypeError as exc:
        raise CheckpointError(f"unknown multi-process option: {exc}") from exc


def _jax_distributed() -> Any:
    """JAX's distributed state, or ``None`` when JAX is not imported or not initialised."""
    if "jax" not in sys.modules:  # never import JAX for a NumPy-only user
        return None
    from jax._src import distributed as jd

    state = jd.global_state
    return state if state.client is not None else None


def process_index() -> int:
    """This process's index in the ``jax.distributed`` job (0 without one)."""
    state = _jax_distributed()
    return int(state.process_id) if state is not None else 0


def process_count() -> int:
    """The number of processes in the ``jax.distributed`` job (1 without one)."""
    state = _jax_distributed()
    return int(state.num_processes) if state is not None else 1


@dataclass
class ProcessGroup:
    """The processes that take part in collective checkpoint operations, and their KV scopes."""

    processes: tuple[int, ...]
    primary: int
    me: int
    timeout_s: float
    client: Any = field(repr=False)
    tag: str = ""
    _counts: dict[str, int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def is_primary(self) -> bool:
        return self.me == self.primary

    @property
    def size(self) -> int:
        return len(self.processes)

    def scope(self, name: str, what: str = "") -> Scope:
        """The next operation called ``name`` (every process runs those in the same order)."""
        safe = hashlib.sha1(name.encode()).hexdigest()[:12]
        with self._lock:
            self._counts[safe] = seq = self._counts.get(safe, 0) + 1
        return Scope(self, safe, seq, what or name)


_groups: dict[tuple[Any, ...], ProcessGroup] = {}
_groups_lock = threading.Lock()


def current_group(options: MultiprocessOptions | None = None) -> ProcessGroup | None:
    """The group of the current options, or ``None`` when this is a single-process job.

    A group of one process (a one-process subset) is also ``None``: nothing to coordinate.
    """
    state = _jax_distributed()
    if state is None or int(state.num_processes) <= 1:
        return None
    opts = options or current_options()
    count, me = int(state.num_processes), int(state.process_id)
    processes = tuple(sorted(set(opts.processes))) if opts.processes is not None else tuple(range(count))
    bad = [p for p in processes if not 0 <= p < count]
    if bad or not processes:
        raise CheckpointError(f"multi-process option processes={list(processes)} names processes outside 0..{count - 1}")
    if opts.primary not in processes:
        raise CheckpointError(
            f"the primary process {opts.primary} is not among the active processes {list(processes)}; "
            "pick a primary from that list"
        )
    if me not in processes:
        raise CheckpointError(
            f"process {me} called a collective checkpoint operation but is not among the active processes "
            f"{list(processes)}; call it only on those processes, or add {me} to MultiprocessOptions.processes"
        )
    if len(processes) == 1:
        return None
    key = (id(state.client), processes, opts.primary, opts.timeout_s)
    with _groups_lock:
        group = _groups.get(key)
        if group is None:
            tag = hashlib.sha1(f"{processes}|{opts.primary}".encode()).hexdigest()[:10]
            group = ProcessGroup(processes, opts.primary, me, float(opts.timeout_s), state.client, tag=tag)
            _groups[key] = group
        return group


# -- key-value protocol ----------------------------------------------------------------

POLL_S = 0.2  # how often a wait also looks at the operation's abort key


@dataclass
class Scope:
    """The keys of one collective operation: ``ckptcore/<group>/<name>/<n>/...``.

    Scopes are counted per name, so operations of different names may interleave (a
    manager's background retention and the training loop's ``should_save``) as long as each
    process runs the operations of one name in the same order. Any process that fails sets
    the operation's ``abort`` key: every wait of the operation then fails within ``POLL_S``.
    """

    group: ProcessGroup
    name: str
    seq: int
    what: str

    def key(self, slot: str) -> str:
        return f"{KEY_PREFIX}/{self.group.tag}/{self.name}/{self.seq}/{slot}"

    def deadline(self, factor: float = 1.0) -> float:
        return time.monotonic() + factor * self.group.timeout_s

    # The value of every slot is {"ok": value} or {"error": message, "process": index}.

    def put(self, slot: str, value: Any) -> None:
        _put(self.group.client, self.key(slot), {"ok": value})

    def fail(self, exc: BaseException, *slots: str) -> None:
        """Publish this process's failure (in the abort key and ``slots``); never raises."""
        doc = {"error": f"{type(exc).__name__}: {exc}"[:4000], "process": self.group.me}
        for slot in (*slots, "abort"):
            try:
                _put(self.group.client, self.key(slot), doc)
            except Exception:  # already set (another failure first), or the service is gone
                pass

    def get(self, slot: str, from_process: int, deadline: float) -> Any:
        """The value process ``from_process`` published in ``slot``; raises any process's failure."""
        doc = self._wait(slot, from_process, deadline)
        if "error" in doc:
            raise ProcessFailedError(f"process {doc.get('process', from_process)} failed during {self.what}: {doc['error']}")
        return doc["ok"]

    def _wait(self, slot: str, process: int, deadline: float) -> Any:
        client, key = self.group.client, self.key(slot)
        while True:
            step = min(POLL_S, deadline - time.monotonic())
            try:
                text = str(client.blocking_key_value_get(key, max(1, int(step * 1000))))
                break
            except Exception as exc:
                if not _is_timeout(exc):
                    raise ProcessFailedError(
                        f"the JAX distributed runtime failed while {self.what} waited for process {process} "
                        f"({slot!r}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                    ) from exc
            aborted = _try_get(client, self.key("abort"))
            if aborted is not None:
                return json.loads(aborted)
            if time.monotonic() >= deadline:
                raise CheckpointTimeoutError(
                    f"{self.what}: timed out waiting for process {process} "
                    f"({slot!r}); it died, hangs, or did not make the same checkpoint call (every process "
                    "must make the same calls in the same order)"
                )
        doc = json.loads(text)
        if isinstance(doc, dict) and set(doc) == {"parts"}:
            doc = json.loads("".join(
                str(client.blocking_key_value_get(f"{key}.part/{i}", 10_000)) for i in range(doc["parts"])
            ))
        return doc

    def broadcast(self, slot: str, compute: Callable[[], Any]) -> Any:
        """The primary computes a value and publishes it; every process returns it (or the failure)."""
        if self.group.is_primary:
            try:
                value = compute()
            except BaseException as exc:
                self.fail(exc, slot)
                raise
            self.put(slot, value)
            return value
        # Twice as long as the primary waits for anyone: when a process dies, the primary's
        # error (naming it) reaches everyone before their own timeouts.
        value = self.get(slot, self.group.primary, self.deadline(2.0))
        self._ack(slot)
        return value

    def gather(self, slot: str, value: Any) -> list[Any] | None:
        """Every process publishes ``value``; the primary returns them all (in process order)."""
        self.put(f"{slot}/{self.group.me}", value)
        if not self.group.is_primary:
            return None
        deadline = self.deadline()
        values = [self.get(f"{slot}/{p}", p, deadline) for p in self.group.processes]
        _delete_later(self.group.client, [self.key(f"{slot}/{p}") for p in self.group.processes])
        return values

    def _ack(self, slot: str) -> None:
        """The last reader of a broadcast deletes it (the coordinator's memory stays bounded)."""
        client = self.group.client
        try:
            if int(client.key_value_increment(self.key(f"{slot}.acks"), 1)) == self.group.size - 1:
                _delete_later(client, [self.key(slot), self.key(f"{slot}.acks")])
        except Exception:  # only memory is at stake
            pass


def _is_timeout(exc: Exception) -> bool:
    text = str(exc)
    return "DEADLINE_EXCEEDED" in text or "timed out" in text.lower()


def _try_get(client: Any, key: str) -> str | None:
    try:
        return str(client.key_value_try_get(key))
    except Exception:  # NOT_FOUND
        return None


def _delete_later(client: Any, keys: list[str]) -> None:
    for key in keys:
        try:
            client.key_value_delete(key)
        except Exception:  # only memory is at stake
            return


def _put(client: Any, key: str, doc: Any) -> None:
    text = json.dumps(doc, separators=(",", ":"))
    if len(text) <= VALUE_PART_BYTES:
        client.key_value_set(key, text)
        return
    parts = [text[i : i + VALUE_PART_BYTES] for i in range(0, len(text), VALUE_PART_BYTES)]
    for i, part in enumerate(parts):
        client.key_value_set(f"{key}.part/{i}", part)
    client.key_value_set(key, json.dumps({"parts": len(parts)}))  # last: readers see every part


def agree(group: ProcessGroup | None, name: str, decide: Callable[[], Any]) -> Any:
    """``decide()`` on the primary, its value on every process (``decide()`` alone without a group)."""
    if group is None:
        return decide()
    return group.scope(name, f"agreeing on {name}").broadcast("value", decide)


class PrimaryFirst:
    """Let the primary do something first: others block in ``__init__`` until it called ``done``.

    The primary calls ``done()`` or ``failed(exc)``; the others then go on (or raise its error).
    """

    def __init__(self, group: ProcessGroup | None, name: str) -> None:
        self.scope = group.scope(name, name) if group is not None else None
        if self.scope is not None and not self.scope.group.is_primary:
            self.scope.get("done", self.scope.group.primary, self.scope.deadline())
            self.scope._ack("done")

    def done(self) -> None:
        if self.scope is not None and self.scope.group.is_primary:
            self.scope.put("done", True)

    def failed(self, exc: BaseException) -> None:
        if self.scope is not None and self.scope.group.is_primary:
            self.scope.fail(exc, "done")


# -- collective save -------------------------------------------------------------------


@dataclass
class CollectiveSave:
    """A save's group and scope, fixed when the save is prepared (in the caller's thread)."""

    group: ProcessGroup
    scope: Scope


def plan_collective(group: ProcessGroup | None = None, name: str = "save") -> CollectiveSave | None:
    """The collective context of a save about to be prepared, or ``None`` for one process."""
    group = group or current_group()
    return CollectiveSave(group, group.scope(name, "a collective save")) if group is not None else None


_active: dict[str, CollectiveSave] = {}  # staging URL -> the collective save writing there
_active_lock = threading.Lock()


class CollectiveCommit:
    """An :class:`~ckptcore.registrations.AtomicCommit` shared by the processes of one save.

    The primary begins (and publishes the staging location) and commits once every process
    said its part is written; the others follow and return once the commit is visible. An
    ``abort`` on any process fails the save on all of them.
    """

    def __init__(self, strategy: Any, collective: CollectiveSave, *, check_exists: bool = False) -> None:
        self.strategy = strategy
        self.collective = collective
        self.check_exists = check_exists
        self.before_commit: Callable[[], None] | None = None

    def begin(self, final: Location) -> Location:
        scope = self.collective.scope

        def begin() -> str:
            if self.check_exists and self.strategy.is_committed(final):
                raise AlreadyExistsError(f"a checkpoint already exists at {final.url}; pass force=True to replace it")
            return _relative_name(final, self.strategy.begin(final))

        try:
            staging = _staging_location(final, scope.broadcast("staging", begin))
        except BaseException as exc:
            scope.fail(exc)
            raise
        with _active_lock:
            _active[staging.url] = self.collective
        return staging

    def commit(self, staging: Location, final: Location, *, replace: bool) -> None:
        scope = self.collective.scope

        def commit() -> str:
            if self.before_commit is not None:
                self.before_commit()
            self.strategy.commit(staging, final, replace=replace)
            return "committed"

        try:
            scope.gather("ready", True)  # the primary learns that every process's data is durable
            scope.broadcast("outcome", commit)
        except BaseException as exc:
            scope.fail(exc)
            raise
        finally:
            self._forget(staging)

    def abort(self, staging: Location) -> None:
        self.collective.scope.fail(ProcessFailedError("the save was aborted"), f"ready/{self.collective.group.me}")
        self._forget(staging)
        if self.collective.group.is_primary:
            self.strategy.abort(staging)

    def _forget(self, staging: Location) -> None:
        with _active_lock:
            _active.pop(staging.url, None)

    def __getattr__(self, name: str) -> Any:  # is_committed, is_staging, delete
        return getattr(self.strategy, name)


def commit_strategy(strategy: Any, collective: CollectiveSave | None) -> Any:
    """``strategy`` itself for one process, else its collective wrapper."""
    return strategy if collective is None else CollectiveCommit(strategy, collective)


def write(
    prepared: PreparedSave,
    collective: CollectiveSave,
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
    """The collective version of :func:`ckptcore.saving.write`; every process calls it."""
    from ckptcore import storage
    from ckptcore.io import save as saving

    location = storage.resolve(path, storage_options)
    strategy = CollectiveCommit(storage.atomicity(location), collective, check_exists=not force)
    strategy.before_commit = before_commit
    staging = strategy.begin(location)
    with saving.aborted_on_failure(strategy, staging, f"{location.url} on process {collective.group.me}"):
        write_contents(
            prepared, staging, url=location.url, format=format, format_options=format_options,
            metadata=metadata, progress=progress,
        )
        strategy.commit(staging, location, replace=force)
    return location


def _relative_name(final: Location, staging: Location) -> str:
    """How the others find ``staging``: "" (in place), a sibling's name, or a full URL."""
    if staging.url == final.url:
        return ""
    if staging.parent().url == final.parent().url:
        return "sibling:" + staging.name
    return "url:" + staging.url


def _staging_location(final: Location, name: str) -> Location:
    from ckptcore import storage

    if not name:
        return final
    if name.startswith("sibling:"):
        return final.parent().child(name[len("sibling:") :])
    return storage.resolve(name[len("url:") :], final.options)


def _collective_of(staging: Location, fallback: CollectiveSave) -> CollectiveSave:
    """The collective save writing into ``staging`` or a directory above it (a manager step's item)."""
    with _active_lock:
        for url, collective in _active.items():
            if staging.url == url or staging.url.startswith(url.rstrip("/") + "/"):
                return collective
    return fallback


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
    """Write this process's shards into ``staging``; the primary also writes the index.

    Every process calls it with the same arguments, inside a collective save (whose scope
    is found from ``staging``). Returns the index on the primary, and on the others an
    index without its tree (its formats and size).
    """
    from ckptcore.io import save as saving
    from ckptcore.plugins.manager import registry

    collective = _collective_of(staging, prepared.collective)
    scope, group = collective.scope, collective.group
    user_metadata = saving.check_json(dict(metadata or {}), "checkpoint metadata")
    format_name = format or (registry().default_array_format() if prepared.writes else "")
    fmt = registry().array_format(format_name) if prepared.writes else None
    prefix = hashlib.sha1(staging.url.encode()).hexdigest()[:12] + "/"  # several items in one operation
    try:
        # 1. Who writes what: a leaf that several processes hold whole (NumPy leaves,
        # process-local jax arrays) is written once, by the primary if it holds it, else by
        # the lowest holder. The primary also checks that every process saves the same tree.
        whole = [i for i, w in enumerate(prepared.writes) if _holds_whole(w)]
        plans = scope.gather(f"{prefix}plan", {"tree": _tree_digest(prepared), "whole": whole})
        assignment = scope.broadcast(f"{prefix}assign", lambda: _assign(plans or [], group, url))
        writers = {int(k): v for k, v in assignment.items()}
        # 2. Every process writes its part into its own directory, then reports it.
        mine = [
            (i, w) for i, w in enumerate(prepared.writes)
            if w.request.shards and writers.get(i, group.me) == group.me
        ]
        leaves: list[dict[str, Any]] = []
        if mine and fmt is not None:
            if progress:
                progress(0, prepared.nbytes)
            leaves = _write_mine(mine, fmt, staging.child(format_name), group, dict(format_options or {}))
            if progress:
                progress(prepared.nbytes, prepared.nbytes)
        reports = scope.gather(f"{prefix}written", leaves)
    except BaseException as exc:
        scope.fail(exc)
        raise
    if reports is None:
        formats: dict[str, Any] = {format_name: {}} if fmt is not None else {}
        return {"array_formats": formats, "total_bytes": prepared.nbytes}
    # 3. The primary records who holds which shard, and writes the index.
    try:
        _merge_reports(prepared, reports, group, format_name, staging.url)
        return saving.write_index(prepared, staging, url=url, format_name=format_name, fmt=fmt, metadata=user_metadata)
    except BaseException as exc:
        scope.fail(exc)
        raise


def _holds_whole(write: Any) -> bool:
    """Whether this process's shards of a leaf cover all of it."""
    import math

    total = math.prod(write.request.shape)
    held = sum(math.prod(s.stop - s.start for s in shard.index) for shard in write.request.shards)
    return bool(write.request.shards) and held == total


def _assign(plans: list[dict[str, Any]], group: ProcessGroup, url: str) -> dict[str, int]:
    """The one writer of every leaf held whole by several processes (the primary first)."""
    mine = plans[group.processes.index(group.me)]["tree"]
    for process, plan in zip(group.processes, plans, strict=True):
        if plan["tree"] != mine:
            raise CheckpointError(
                f"saving {url}: process {process} passed a state whose structure, shapes or dtypes differ from "
                f"process {group.me}'s; every process must save the same tree"
            )
    holders: dict[int, list[int]] = {}
    for process, plan in zip(group.processes, plans, strict=True):
        for i in plan["whole"]:
            holders.setdefault(int(i), []).append(process)
    return {str(i): (group.primary if group.primary in ps else min(ps)) for i, ps in holders.items()}


def _write_mine(
    mine: list[tuple[int, Any]], fmt: Any, location: Location, group: ProcessGroup, options: dict[str, Any]
) -> list[dict[str, Any]]:
    from ckptcore.io import leaves as arrays

    requests = [w.request for _, w in mine]
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckptcore-checksum") as pool:
        sums = [[pool.submit(arrays.checksum, s.data) for s in r.shards] for r in requests]
        infos = fmt.format.write(location.child(f"process_{group.me}"), requests, options)
        return [
            {
                "w": i,
                "info": info,
                "shards": [[[s.start, s.stop] for s in shard.index] for shard in r.shards],
                "checksums": [f.result() for f in futs],
            }
            for (i, _), r, info, futs in zip(mine, requests, infos, sums, strict=True)
        ]


def _tree_digest(prepared: PreparedSave) -> str:
    """A digest of the tree's structure, shapes and dtypes (not of per-process details)."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in ("format_info", "nbytes", "value", "checksum")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return hashlib.sha1(json.dumps(strip(prepared.tree), sort_keys=True, default=str).encode()).hexdigest()


def _merge_reports(
    prepared: PreparedSave, reports: list[list[dict[str, Any]]], group: ProcessGroup, format_name: str, url: str
) -> None:
    """Fill the primary's index records from every process's report; check each leaf is covered once."""
    import numpy as np

    writers: list[list[dict[str, Any]]] = [[] for _ in prepared.writes]
    for process, report in zip(group.processes, reports, strict=True):
        for leaf in report:
            writers[leaf["w"]].append({"process": process, **leaf})
    for w, found in zip(prepared.writes, writers, strict=True):
        shape = tuple(w.request.shape)
        covered = sum(int(np.prod([b - a for a, b in index], dtype=np.int64)) for f in found for index in f["shards"])
        if covered != int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(
                f"saving {url}: the processes wrote {covered} of the {int(np.prod(shape, dtype=np.int64))} elements "
                f"of {w.request.key!r} (shape {shape}); some shards live on processes outside the active set "
                f"{list(group.processes)}, or several processes claimed the same shard"
            )
        entries = [
            {"index": index, "checksum": checksum}
            for f in found
            for index, checksum in zip(f["shards"], f["checksums"], strict=True)
        ]
        record: dict[str, Any] = {
            "format": format_name,
            "key": w.request.key,
            "format_info": {
                "writers": [{"process": f["process"], "info": f["info"], "shards": f["shards"]} for f in found]
            },
        }
        if len(entries) == 1 and entries[0]["index"] == [[0, n] for n in shape]:
            record["checksum"] = entries[0]["checksum"]
        else:
            record["shard_checksums"] = sorted(entries, key=lambda e: e["index"])
        w.record.pop("checksum", None)
        w.record.pop("shard_checksums", None)
        w.record.update(record)


# -- reading a multi-writer checkpoint ---------------------------------------------------


def read_arrays(
    fmt: ArrayFormat, location: Location, requests: Sequence[ReadRequest], options: Mapping[str, Any]
) -> list[list[np.ndarray]]:
    """``fmt.read``, also for leaves written by several processes (``info["writers"]``).

    Each requested region is assembled from the intersections with the shards each writer
    holds; a writer's data lives in ``<location>/process_<i>/``.
    """
    if not any("writers" in r.info for r in requests):
        return fmt.read(location, requests, options)
    import dataclasses

    import numpy as np

    results: list[list[Any]] = [[] for _ in requests]
    plain = [i for i, r in enumerate(requests) if "writers" not in r.info]
    if plain:
        for i, arrays_read in zip(plain, fmt.read(location, [requests[i] for i in plain], options), strict=True):
            results[i] = arrays_read
    # Per writer process: (request index, region index, piece) of every intersection.
    pieces: dict[int, list[tuple[int, int, tuple[slice, ...], dict[str, Any]]]] = {}
    for i, r in enumerate(requests):
        if "writers" not in r.info:
            continue
        results[i] = [None] * len(r.regions)  # filled by the pieces (allocated when there are several)
        covered = [0] * len(r.regions)
        for writer in r.info["writers"]:
            for index in writer["shards"]:
                for j, region in enumerate(r.regions):
                    piece = tuple(slice(max(a, s.start), min(b, s.stop)) for (a, b), s in zip(index, region, strict=True))
                    if all(p.start < p.stop for p in piece):
                        pieces.setdefault(int(writer["process"]), []).append((i, j, piece, writer["info"]))
                        covered[j] += int(np.prod([p.stop - p.start for p in piece], dtype=np.int64))
        for j, region in enumerate(r.regions):
            size = int(np.prod([s.stop - s.start for s in region], dtype=np.int64))
            if covered[j] != size:
                raise CorruptCheckpointError(
                    f"array {r.key!r}: the writers recorded in the index cover {covered[j]} of the "
                    f"{size} elements of region {[(s.start, s.stop) for s in region]}; the index is corrupt"
                )
    allocate = threading.Lock()

    def read_from(process: int) -> None:
        items = pieces[process]
        # One request per (leaf, writer) carrying all its pieces, so formats batch them.
        by_leaf: dict[int, list[tuple[int, tuple[slice, ...], dict[str, Any]]]] = {}
        for i, j, piece, info in items:
            by_leaf.setdefault(i, []).append((j, piece, info))
        leaves = list(by_leaf)
        sub = [
            dataclasses.replace(requests[i], info=by_leaf[i][0][2], regions=tuple(p for _, p, _ in by_leaf[i]))
            for i in leaves
        ]
        got = fmt.read(location.child(f"process_{process}"), sub, options)
        for i, arrays_read in zip(leaves, got, strict=True):
            for (j, piece, _), data in zip(by_leaf[i], arrays_read, strict=True):
                region = requests[i].regions[j]
                if all(p == s for p, s in zip(piece, region, strict=True)):
                    results[i][j] = data  # one writer holds the whole region: no copy
                    continue
                with allocate:
                    if results[i][j] is None:
                        shape = [s.stop - s.start for s in region]
                        results[i][j] = np.empty(shape, dtype=requests[i].dtype)
                dest = tuple(slice(p.start - s.start, p.stop - s.start) for p, s in zip(piece, region, strict=True))
                results[i][j][dest] = data

    with ThreadPoolExecutor(max_workers=min(4, max(1, len(pieces))), thread_name_prefix="ckptcore-read") as pool:
        for future in [pool.submit(read_from, p) for p in sorted(pieces)]:
            future.result()
    return results
