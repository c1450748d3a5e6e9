"""The coordinator of a ``jax.distributed`` job: several processes, one checkpoint.

Coordination goes through JAX's own distributed runtime: its key-value store and nothing
else. No device collective is used to coordinate, so a save works on CPU and while
accelerators are busy. Chosen by :func:`ckptcore.parallel.current.current_coordinator`
only when several processes take part; the walks in :mod:`ckptcore.io.save` and
:mod:`ckptcore.io.restore` use it through the :class:`~ckptcore.parallel.coordinator.Coordinator`
interface and never import it.

The protocol of one collective save (every active process calls ``save`` with the same
arguments, in the same order, like any JAX collective): the primary checks the target,
begins the atomic commit and broadcasts where the data goes; every process writes the
shards it owns into its own directory ``<format>/process_<i>/`` (an OCDBT database needs a
single writer, and per-process directories make any third-party format safe too) and
reports what it wrote once it is durable; the primary gathers the reports, writes the
index and commits, then broadcasts the outcome. Nobody returns before the outcome.

Any process that fails publishes its error in the slot the others wait on (and in the
operation's abort key), so a failure on one process becomes a :class:`CheckpointError`
naming it on all; a process that dies is noticed by the timeout of every wait.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ckptcore.errors import CheckpointError, CheckpointTimeoutError, ProcessFailedError
from ckptcore.parallel import preemption
from ckptcore.parallel.coordinator import Widen, narrow_to_single_replica
from ckptcore.parallel.options import MultiprocessOptions

T = TypeVar("T")

KEY_PREFIX = "ckptcore"
VALUE_PART_BYTES = 1 << 20  # larger KV values are split into parts (the runtime's messages are bounded)


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


class PrimaryFirst:
    """Let the primary do something first: others block in ``__init__`` until it called ``done``.

    The primary calls ``done()`` or ``failed(exc)``; the others then go on (or raise its error).
    """

    def __init__(self, group: ProcessGroup, name: str) -> None:
        self.scope = group.scope(name, name)
        if not group.is_primary:
            self.scope.get("done", group.primary, self.scope.deadline())
            self.scope._ack("done")

    def done(self) -> None:
        if self.scope.group.is_primary:
            self.scope.put("done", True)

    def failed(self, exc: BaseException) -> None:
        if self.scope.group.is_primary:
            self.scope.fail(exc, "done")


class JaxCoordinator:
    """The :class:`~ckptcore.parallel.coordinator.Coordinator` of a group of ``jax.distributed`` processes."""

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group

    @property
    def process(self) -> int:
        return self.group.me

    @property
    def size(self) -> int:
        return self.group.size

    @property
    def is_primary(self) -> bool:
        return self.group.is_primary

    @property
    def writer_directory(self) -> str:
        return f"process_{self.group.me}"

    def operation(self, name: str, what: str = "") -> Scope:
        return self.group.scope(name, what or name)

    def agree(self, name: str, decide: Callable[[], T]) -> T:
        return self.group.scope(name, f"agreeing on {name}").broadcast("value", decide)  # type: ignore[no-any-return]

    def primary_first(self, name: str) -> PrimaryFirst:
        return PrimaryFirst(self.group, name)

    def narrow_targets(self, target: Any) -> tuple[Any, Widen]:
        return narrow_to_single_replica(target)

    def reached_preemption(self, step: int) -> bool:
        """JAX's preemption sync manager when it runs; else SIGTERM, agreed through the key-value store."""
        sync = preemption.sync_manager()
        if sync is not None:
            return bool(sync.reached_sync_point(int(step)))
        return _kv_preemption(self.group, int(step))


@dataclass
class _KvPreemption:
    sync_step: int | None = None
    published: bool = False


_kv_state: dict[str, _KvPreemption] = {}


def _kv_preemption(group: ProcessGroup, step: int) -> bool:
    """Every process saves the largest step any of them was at when the first saw SIGTERM."""
    preemption.install_preemption_handler()
    state = _kv_state.setdefault(group.tag, _KvPreemption())
    if state.sync_step is not None:
        return step == state.sync_step
    notice_key = f"{KEY_PREFIX}/{group.tag}/preemption/notice"
    if preemption.sigterm_received() and not state.published:
        try:
            group.client.key_value_set(notice_key, str(group.me))
        except Exception:  # another process published the notice first
            pass
        state.published = True
    try:
        noticed = group.client.key_value_try_get(notice_key)
    except Exception:  # NOT_FOUND: no process was told to stop
        noticed = None
    if noticed is None:
        return False
    # Everyone saw the notice: the sync step is the largest step any process is at now.
    scope = group.scope("preemption-sync", "agreeing on the preemption step")
    steps = scope.gather("step", step)
    state.sync_step = int(scope.broadcast("sync", lambda: max(steps or [step])))
    return step == state.sync_step


_groups: dict[tuple[Any, ...], ProcessGroup] = {}
_groups_lock = threading.Lock()


def coordinator(state: Any, opts: MultiprocessOptions) -> JaxCoordinator | None:
    """The coordinator of the processes ``opts`` names, or ``None`` when only this one takes part."""
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
    return JaxCoordinator(group)
