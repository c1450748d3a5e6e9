"""A process's *view* of a state: what one process must keep to restore its part alone.

The local tier stores, per process, an ordinary ckptcore checkpoint of the user's tree in
which every ``jax.Array`` holds only the regions that process's devices hold (each distinct
region once, replicas included: a restore onto the same mesh then needs nothing from any
other process). NumPy leaves, scalars and process-local arrays are stored whole, as
every process holds them.

A peer's view is the same checkpoint for another process: the records (shape, dtype,
logical sharding) are the same, the shards are the peer's regions, received over the replica
channel (:mod:`ckptcore.emergency.channel`) as the parts :func:`replica_parts` names. The
*fingerprint* of a state names its tree, shapes, dtypes and which process holds which
region: two saves with equal fingerprints were made on the same mesh and process layout, so
a view of one restores onto the other.
"""

from __future__ import annotations

import copy as copying
import dataclasses
import functools
import hashlib
import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from ckptcore.errors import UnsupportedLeafError
from ckptcore.io import jax_leaves
from ckptcore.io import save as saving
from ckptcore.io.plans import PlannedWrite, PreparedSave, is_jax_value
from ckptcore.plugins.registrations import Shard
from ckptcore.tree.keys import KeyPath, format_key_path
from ckptcore.tree.nodes import Node, encode_tree

RegionKey = tuple[tuple[int, int], ...]


@dataclasses.dataclass
class JaxLeaf:
    """A ``jax.Array`` leaf of the state: where it is in the writes, and its key data if it is a key array."""

    write: int  # index into PreparedSave.writes
    path: KeyPath
    value: Any  # the jax.Array (key data for PRNG keys)


@dataclasses.dataclass
class View:
    """This process's view, ready to write, and the jax leaves it came from."""

    prepared: PreparedSave
    jax_leaves: list[JaxLeaf]
    fingerprint: str


def prepare_view(state: Any, copy_array: Callable[[np.ndarray], np.ndarray] | None, processes: int) -> View:
    """Snapshot ``state`` as this process's view (``copy_array``: the copy of a NumPy leaf)."""
    writes: list[PlannedWrite] = []
    found: list[JaxLeaf] = []
    signature: list[tuple[KeyPath, tuple[int, ...], str, Any]] = []

    def encode_leaf(path: KeyPath, value: Any) -> Node:
        if is_jax_value(value) and hasattr(type(value), "addressable_shards"):
            import jax

            planned = jax_leaves.plan_write(path, value, copy=False, shards=False)
            data = jax.random.key_data(value) if planned.record["kind"] == jax_leaves.KIND_PRNG_KEY else value
            signature.append((path, tuple(int(n) for n in value.shape), str(value.dtype), value.sharding))
            if not data.is_fully_addressable:
                shards = tuple(Shard(index, np.asarray(d)) for index, d in own_regions(data))
                planned.request = dataclasses.replace(planned.request, shards=shards)
            found.append(JaxLeaf(len(writes), path, data))
            writes.append(planned)
            return planned.record
        return saving.encode_leaf_into(writes, path, value, copy=True, copy_array=copy_array)  # as a save does

    if sys.modules.get("jax") is not None and not _cpu_only():
        _start_host_copies(state)
    tree = encode_tree(state, encode_leaf)
    return View(PreparedSave(tree, writes), found, _fingerprint(tuple(signature), processes))


@functools.lru_cache(maxsize=64)
def _fingerprint(signature: tuple[tuple[KeyPath, tuple[int, ...], str, Any], ...], processes: int) -> str:
    """:func:`digest` of a state's jax leaves (path, shape, dtype, sharding): the same each save, so kept.

    A save blocks while its view is prepared, and computing the regions of every device is
    most of that; a training run saves the same shapes and shardings every time.
    """
    return digest([(format_key_path(path), list(shape), dtype, _regions_by_process(sharding, shape))
                   for path, shape, dtype, sharding in signature], processes)


def target_fingerprint(target: Any, processes: int) -> str | None:
    """The fingerprint a state matching ``target`` would have; ``None`` when a leaf has no concrete sharding."""
    shape_of: list[Any] = []
    missing = []

    def leaf(path: KeyPath, value: Any) -> Node:
        if is_jax_value(value):
            import jax

            sharding = getattr(value, "sharding", None)
            if not isinstance(sharding, jax.sharding.Sharding):
                missing.append(path)
                return {}
            shape = tuple(int(n) for n in value.shape)
            try:
                by_process = _regions_by_process(sharding, shape)
            except (ValueError, TypeError, IndexError):
                missing.append(path)
                return {}
            shape_of.append((format_key_path(path), list(shape), str(value.dtype), by_process))
        return {}

    try:
        encode_tree(target, leaf)
    except UnsupportedLeafError:
        return None
    return None if missing else digest(shape_of, processes)


def digest(shape_of: list[Any], processes: int) -> str:
    """The fingerprint of a state whose jax leaves are ``shape_of`` (path, shape, dtype, regions by process)."""
    text = json.dumps([processes, shape_of], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _regions_by_process(sharding: Any, shape: tuple[int, ...]) -> dict[str, list[list[list[int]]]]:
    out: dict[str, set[RegionKey]] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        out.setdefault(str(device.process_index), set()).add(_key(_normalize(index, shape)))
    return {p: [[list(s) for s in r] for r in sorted(regions)] for p, regions in sorted(out.items())}


def own_regions(value: Any) -> list[tuple[Any, Any]]:
    """Each distinct region this process's devices hold, once, with the device array holding it."""
    shape = tuple(int(n) for n in value.shape)
    seen: set[RegionKey] = set()
    out = []
    for shard in sorted(value.addressable_shards, key=lambda s: s.device.id):
        index = _normalize(shard.index, shape)
        if _key(index) not in seen:
            seen.add(_key(index))
            out.append((index, shard.data))
    return out


def process_regions(value: Any, process: int) -> list[tuple[Any, Any]]:
    """The distinct regions ``process``'s devices hold, each with the first of its devices holding it."""
    shape = tuple(int(n) for n in value.shape)
    seen: set[RegionKey] = set()
    out = []
    items = [(d, i) for d, i in value.sharding.devices_indices_map(shape).items() if d.process_index == process]
    for device, raw in sorted(items, key=lambda item: item[0].id):
        index = _normalize(raw, shape)
        if _key(index) not in seen:
            seen.add(_key(index))
            out.append((index, device))
    return out


def peer_view(view: View, source: int, rows: dict[int, dict[RegionKey, np.ndarray]]) -> PreparedSave:
    """The view of process ``source``: this view's tree, with ``source``'s regions as the jax leaves' shards.

    ``rows[write][region]`` holds the regions received from ``source``; a region this process
    holds itself (a replicated one) is taken from its own shards.
    """
    memo: dict[int, Any] = {}
    tree = copying.deepcopy(view.prepared.tree, memo)
    writes: list[PlannedWrite] = []
    jax_by_write = {leaf.write: leaf for leaf in view.jax_leaves}
    for i, planned in enumerate(view.prepared.writes):
        record = memo.get(id(planned.record), planned.record)
        request = planned.request
        leaf = jax_by_write.get(i)
        if leaf is not None and not leaf.value.is_fully_addressable:
            mine = {_key(s.index): s.data for s in request.shards}
            received = rows.get(i, {})
            shards = []
            for index, _device in process_regions(leaf.value, source):
                data = received.get(_key(index))
                if data is None:
                    data = mine.get(_key(index))
                if data is None:
                    raise UnsupportedLeafError(
                        f"the replica of process {source} lacks region {_key(index)} of {format_key_path(planned.path)}"
                    )
                shards.append(Shard(index, data))
            request = dataclasses.replace(request, shards=tuple(shards))
        writes.append(PlannedWrite(planned.path, record, request))
    return PreparedSave(tree, writes)


def replica_parts(view: View, holder: int) -> list[tuple[str, np.ndarray]]:
    """The regions of this process's view that process ``holder`` lacks, each named for :func:`replica_rows`."""
    parts = []
    for leaf in view.jax_leaves:
        if leaf.value.is_fully_addressable:
            continue
        held = {_key(index) for index, _ in process_regions(leaf.value, holder)}
        for shard in view.prepared.writes[leaf.write].request.shards:
            if _key(shard.index) not in held:
                parts.append((json.dumps([leaf.write, _key(shard.index)]), shard.data))
    return parts


def replica_rows(view: View, parts: dict[str, np.ndarray]) -> dict[int, dict[RegionKey, np.ndarray]]:
    """The regions a peer sent (:func:`replica_parts` of its view), as :func:`peer_view` takes them.

    Raises ``ValueError`` for a part that names no region of a leaf of this view or has the wrong size.
    """
    by_write = {leaf.write: leaf for leaf in view.jax_leaves}
    rows: dict[int, dict[RegionKey, np.ndarray]] = {}
    for name, buffer in parts.items():
        write, raw = json.loads(name)
        leaf = by_write.get(write)
        if leaf is None or len(raw) != len(leaf.value.shape):
            raise ValueError(f"a part named {name!r} is no region of a jax.Array of this state")
        key: RegionKey = tuple((int(a), int(b)) for a, b in raw)
        shape = tuple(b - a for a, b in key)
        dtype = np.dtype(leaf.value.dtype)
        if any(n < 0 for n in shape) or buffer.nbytes != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"the part {name!r} holds {buffer.nbytes} bytes, not a {shape} {dtype} region")
        rows.setdefault(write, {})[key] = buffer.view(dtype).reshape(shape)
    return rows


@functools.lru_cache(maxsize=1)
def _cpu_only() -> bool:
    """Whether every device of this process is a CPU: then no shard needs a copy to the host."""
    import jax

    return all(d.platform == "cpu" for d in jax.local_devices())


def _start_host_copies(state: Any) -> None:
    """Start every addressable shard's device-to-host copy (not only replica 0's): a view holds them all."""
    for value in jax_leaves._leaves(state):
        if not is_jax_value(value) or not hasattr(type(value), "addressable_shards"):
            continue
        try:
            if value.is_deleted() or all(d.platform == "cpu" for d in value.sharding.device_set):
                continue
            for shard in value.addressable_shards:
                shard.data.copy_to_host_async()
        except Exception:  # a prefetch only: prepare_view reports real errors
            continue


def _normalize(index: tuple[Any, ...], shape: tuple[int, ...]) -> Any:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))


def _key(index: Any) -> RegionKey:
    return tuple((int(s.start), int(s.stop)) for s in index)
