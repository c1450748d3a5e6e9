"""Checkpoints whose arrays several processes wrote: who writes what, and reading it back.

In a ``jax.distributed`` save every process writes the shards it owns into its own
directory of the array format (``<format>/process_<i>/``). The index then lists, per leaf,
the writers and the regions each holds (``format_info["writers"]``). A single process
writes everything into the format's directory itself, and its records carry the format's
info directly: the layout of ckptcore 0.1.0, unchanged.

Replica-parallel saves: a large region several processes hold (a replicated ``jax.Array``
across hosts, a NumPy leaf every process holds) is split into row blocks, one per holder
(:func:`split_rows`); each holder writes its block into its own directory and the index
lists the blocks as that writer's shards. Readers need nothing new: a record is still a
list of writers with their regions.

Reading needs no coordination: :func:`read_arrays` assembles every requested region from
the writers that hold it, in whatever process (or job size) restores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptcore.errors import CheckpointError, CorruptCheckpointError
from ckptcore.io.plans import PreparedSave
from ckptcore.parallel.coordinator import Coordinator, Operation
from ckptcore.parallel.options import current_options

if TYPE_CHECKING:
    from ckptcore.plugins.registrations import ArrayFormat, Index, Location, ReadRequest


# -- writing ---------------------------------------------------------------------------


SPLIT_MIN_BLOCK_BYTES = 1 << 20
"""Replica-parallel saves split a region only into row blocks of at least this many bytes."""


def active_processes() -> tuple[int, ...] | None:
    """The processes taking part in collective calls (``None``: every process of the job)."""
    return current_options().processes


def split_rows(index: Index, count: int, itemsize: int) -> list[Index]:
    """``index`` cut along its first axis into at most ``count`` row blocks (of equal rows, the last shorter).

    The blocks of a region several processes hold: holder ``k`` (in ascending process
    order) writes block ``k``. A region whose blocks would be smaller than
    :data:`SPLIT_MIN_BLOCK_BYTES`, or a scalar, stays one block.
    """
    if count <= 1 or not index:
        return [index]
    start, stop = int(index[0].start), int(index[0].stop)
    rows = stop - start
    row_bytes = itemsize * math.prod(int(s.stop - s.start) for s in index[1:])
    count = min(count, rows, (rows * row_bytes) // SPLIT_MIN_BLOCK_BYTES)
    if count <= 1:
        return [index]
    step = -(-rows // count)
    return [(slice(a, min(a + step, stop)), *index[1:]) for a in range(start, stop, step)]


def block_writers(holders: Sequence[int], key: str, ordinal: int = 0, blocks: int = 1) -> list[int]:
    """The holders in the order they write the blocks of region ``ordinal`` of leaf ``key``.

    Rotated by a digest of the storage key and by the region's position, so that leaves
    and regions with fewer blocks than holders do not all fall on the lowest processes.
    Every process computes the same order.
    """
    ordered = sorted(holders)
    if not ordered:
        return []
    offset = (zlib.crc32(key.encode()) + ordinal * blocks) % len(ordered)
    return ordered[offset:] + ordered[:offset]


def assign_whole_leaves(
    prepared: PreparedSave, operation: Operation, coordinator: Coordinator, url: str, prefix: str
) -> dict[int, int]:
    """Who writes the leaves that several processes hold whole (write index -> process).

    NumPy leaves and process-local arrays are held whole by every process. A small one is
    written by the primary if it holds it, else by the lowest holder. A large one is split
    into row blocks among its holders (:func:`split_rows`), like a replicated ``jax.Array``:
    this process's request is narrowed to its block here, and the leaf is assigned to it.
    The primary also checks that every process saves the same tree. A single process
    holds and writes everything (nothing is split).
    """
    if coordinator.size == 1:
        return {}
    whole = [i for i, w in enumerate(prepared.writes) if _holds_whole(w)]
    plan = {"process": coordinator.process, "tree": _tree_digest(prepared), "whole": whole}
    plans = operation.gather(f"{prefix}plan", plan)
    assignment = operation.broadcast(f"{prefix}assign", lambda: _assign(plans or [], prepared, coordinator, url))
    writers: dict[int, int] = {}
    for key, value in assignment.items():
        i = int(key)
        if isinstance(value, list):  # split among these holders: block k is written by value[k]
            writers[i] = coordinator.process if _narrow_to_block(prepared.writes[i], value, coordinator.process) else -1
        else:
            writers[i] = int(value)
    return writers


def _narrow_to_block(write: Any, holders: list[int], process: int) -> bool:
    """Narrow ``write`` to this process's row block of a leaf split among ``holders``; False if it has none."""
    request = write.request
    full = tuple(slice(0, n) for n in request.shape)
    blocks = split_rows(full, len(holders), request.dtype.itemsize)
    position = holders.index(process) if process in holders else len(blocks)
    if position >= len(blocks):
        return False
    block = blocks[position]
    data = request.shards[0].data[block[0]]
    shard = dataclasses.replace(request.shards[0], index=block, data=data)
    chunk = tuple(s.stop - s.start for s in blocks[0])
    write.request = dataclasses.replace(request, shards=(shard,), chunk_hint=chunk)
    return True


def _holds_whole(write: Any) -> bool:
    """Whether this process's shards of a leaf cover all of it."""
    total = math.prod(write.request.shape)
    held = sum(math.prod(s.stop - s.start for s in shard.index) for shard in write.request.shards)
    return bool(write.request.shards) and held == total


def _assign(
    plans: list[dict[str, Any]], prepared: PreparedSave, coordinator: Coordinator, url: str
) -> dict[str, int | list[int]]:
    """Run on the primary, with every process's plan."""
    mine = next(p["tree"] for p in plans if p["process"] == coordinator.process)
    for plan in plans:
        if plan["tree"] != mine:
            raise CheckpointError(
                f"saving {url}: process {plan['process']} passed a state whose structure, shapes or dtypes differ "
                f"from process {coordinator.process}'s; every process must save the same tree"
            )
    holders: dict[int, list[int]] = {}
    for plan in plans:
        for i in plan["whole"]:
            holders.setdefault(int(i), []).append(plan["process"])
    primary = coordinator.process
    assignment: dict[str, int | list[int]] = {}
    for i, ps in holders.items():
        request = prepared.writes[i].request
        full = tuple(slice(0, n) for n in request.shape)
        if len(ps) > 1 and len(split_rows(full, len(ps), request.dtype.itemsize)) > 1:
            assignment[str(i)] = block_writers(ps, request.key)
        else:
            assignment[str(i)] = primary if primary in ps else min(ps)
    return assignment


def _tree_digest(prepared: PreparedSave) -> str:
    """A digest of the tree's structure, shapes and dtypes (not of per-process details)."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in ("format_info", "nbytes", "value", "checksum")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return hashlib.sha1(json.dumps(strip(prepared.tree), sort_keys=True, default=str).encode()).hexdigest()


def merge_reports(
    prepared: PreparedSave, reports: list[list[dict[str, Any]]], coordinator: Coordinator, format_name: str, url: str
) -> None:
    """Complete the index records from every writer's report; check each leaf is covered exactly once."""
    single = coordinator.size == 1
    writes = prepared.writes
    found: list[list[dict[str, Any]]] = [[] for _ in writes]
    for report in reports:
        for leaf in report:
            if leaf.get("whole") and not found[leaf["w"]]:
                # The common case (thousands of leaves): one writer holding the whole leaf.
                w = writes[leaf["w"]]
                done = w.record
                done["format"], done["key"] = format_name, w.request.key
                done["format_info"] = leaf["info"] if single else {"writers": [_writer_entry(leaf)]}
                done["checksum"] = leaf["checksums"][0]
            found[leaf["w"]].append(leaf)
    for w, writers in zip(writes, found, strict=True):
        if len(writers) == 1 and writers[0].get("whole"):
            continue  # completed above
        shape = tuple(w.request.shape)
        size = math.prod(shape)
        covered = sum(math.prod(b - a for a, b in index) for f in writers for index in f["shards"])
        if covered != size:
            raise CheckpointError(
                f"saving {url}: the processes wrote {covered} of the {size} elements of {w.request.key!r} "
                f"(shape {shape}); some shards live on processes outside the active set, or several "
                "processes claimed the same shard"
            )
        entries = sorted(
            ({"index": index, "checksum": checksum} for f in writers for index, checksum in zip(f["shards"], f["checksums"], strict=True)),
            key=lambda e: e["index"],
        )
        info = writers[0]["info"] if single else {"writers": [_writer_entry(f) for f in writers]}
        record: dict[str, Any] = {"format": format_name, "key": w.request.key, "format_info": info}
        if len(entries) == 1 and entries[0]["index"] == [[0, n] for n in shape]:
            record["checksum"] = entries[0]["checksum"]
        else:
            record["shard_checksums"] = entries
        w.record.update(record)



def _writer_entry(report: dict[str, Any]) -> dict[str, Any]:
    return {"process": report["process"], "info": report["info"], "shards": report["shards"]}


# -- reading ---------------------------------------------------------------------------


def read_arrays(
    fmt: ArrayFormat, location: Location, requests: Sequence[ReadRequest], options: Mapping[str, Any]
) -> list[list[np.ndarray]]:
    """``fmt.read``, also for leaves written by several processes (``info["writers"]``).

    Each requested region is assembled from the intersections with the shards each writer
    holds; a writer's data lives in ``<location>/process_<i>/``.
    """
    if not any("writers" in r.info for r in requests):
        return fmt.read(location, requests, options)
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


def read_or_explain(
    fmt: ArrayFormat, location: Location, requests: Sequence[ReadRequest], explain: Callable[[Exception], str]
) -> list[list[np.ndarray]]:
    """:func:`read_arrays`; a failure that is not already a ckptcore error becomes a
    :class:`CorruptCheckpointError` with the message ``explain(exc)`` (the original chained)."""
    try:
        return read_arrays(fmt, location, requests, {})
    except CheckpointError:
        raise
    except Exception as exc:
        raise CorruptCheckpointError(explain(exc)) from exc
