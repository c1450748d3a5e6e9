"""Checkpoints whose arrays several processes wrote: who writes what, and reading it back.

In a ``jax.distributed`` save every process writes the shards it owns into its own
directory of the array format (``<format>/process_<i>/``). The index then lists, per leaf,
the writers and the regions each holds (``format_info["writers"]``). A single process
writes everything into the format's directory itself, and its records carry the format's
info directly: the layout of ckptcore 0.1.0, unchanged.

Reading needs no coordination: :func:`read_arrays` assembles every requested region from
the writers that hold it, in whatever process (or job size) restores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptcore.errors import CheckpointError, CorruptCheckpointError
from ckptcore.io.plans import PreparedSave
from ckptcore.parallel.coordinator import Coordinator, Operation

if TYPE_CHECKING:
    from ckptcore.plugins.registrations import ArrayFormat, Location, ReadRequest


# -- writing ---------------------------------------------------------------------------


def assign_whole_leaves(
    prepared: PreparedSave, operation: Operation, coordinator: Coordinator, url: str, prefix: str
) -> dict[int, int]:
    """The one writer of every leaf that several processes hold whole (write index -> process).

    NumPy leaves and process-local arrays are held whole by every process: the primary
    writes them if it holds them, else the lowest holder. The primary also checks that
    every process saves the same tree. A single process holds and writes everything.
    """
    if coordinator.size == 1:
        return {}
    whole = [i for i, w in enumerate(prepared.writes) if _holds_whole(w)]
    plan = {"process": coordinator.process, "tree": _tree_digest(prepared), "whole": whole}
    plans = operation.gather(f"{prefix}plan", plan)
    assignment = operation.broadcast(f"{prefix}assign", lambda: _assign(plans or [], coordinator, url))
    return {int(k): int(v) for k, v in assignment.items()}


def _holds_whole(write: Any) -> bool:
    """Whether this process's shards of a leaf cover all of it."""
    total = math.prod(write.request.shape)
    held = sum(math.prod(s.stop - s.start for s in shard.index) for shard in write.request.shards)
    return bool(write.request.shards) and held == total


def _assign(plans: list[dict[str, Any]], coordinator: Coordinator, url: str) -> dict[str, int]:
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
    return {str(i): (primary if primary in ps else min(ps)) for i, ps in holders.items()}


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
    found: list[list[dict[str, Any]]] = [[] for _ in prepared.writes]
    for report in reports:
        for leaf in report:
            found[leaf["w"]].append(leaf)
    for w, writers in zip(prepared.writes, found, strict=True):
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
        if coordinator.size == 1:
            info: Any = writers[0]["info"]
        else:
            info = {"writers": [{"process": f["process"], "info": f["info"], "shards": f["shards"]} for f in writers]}
        record: dict[str, Any] = {"format": format_name, "key": w.request.key, "format_info": info}
        if len(entries) == 1 and entries[0]["index"] == [[0, n] for n in shape]:
            record["checksum"] = entries[0]["checksum"]
        else:
            record["shard_checksums"] = entries
        w.record.update(record)


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
