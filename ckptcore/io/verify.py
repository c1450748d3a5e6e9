"""Verifying one checkpoint: every stored byte read, every checksum checked, nothing kept.

Each array leaf is read at its saved dtype in the regions its checksums cover (the whole
array, or each shard of a sharded save), in the restore's waves of at most
``max_bytes_in_flight`` bytes (the next wave read while this one is checked), and dropped
once checked. A damaged leaf does not stop the walk: a wave whose read fails is read again
leaf by leaf, so every bad leaf is named.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptcore.errors import CheckpointError
from ckptcore.io import checksums, memory
from ckptcore.io.restore import (
    DEFAULT_MAX_BYTES_IN_FLIGHT,
    OpenedCheckpoint,
    _format_for,
    _read_wave,
    _region_elements,
    _waves,
)
from ckptcore.io.restore_plan import PendingRead
from ckptcore.plugins.registrations import ArrayFormatRegistration, ProgressCallback, ReadRequest
from ckptcore.tree.dtypes import dtype_from_name
from ckptcore.tree.keys import is_safe_storage_key, key_path_text
from ckptcore.tree.nodes import ARRAY_KINDS, iter_leaves


@dataclass(frozen=True)
class BadLeaf:
    """A leaf that failed verification."""

    checkpoint: str  # the URL of the checkpoint (or manager item) holding it
    path: str  # its key path, ``/``-joined (prefixed with ``<item>/`` for a manager step's items)
    key: str  # its storage key
    error: str  # what is wrong with it


@dataclass
class VerifyReport:
    """What :func:`ckptcore.verify` found: ``ok`` when every leaf read back and matched its checksum."""

    url: str
    checkpoints: list[str] = field(default_factory=list)
    leaves: int = 0
    bytes: int = 0
    bad: list[BadLeaf] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # read fully, but saved without a checksum
    errors: list[str] = field(default_factory=list)  # damage outside array data (indexes, step files, Json items)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.bad and not self.errors

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url, "ok": self.ok, "checkpoints": self.checkpoints, "leaves": self.leaves,
            "bytes": self.bytes, "seconds": round(self.seconds, 3), "unchecked": self.unchecked,
            "errors": self.errors, "bad": [b.__dict__ for b in self.bad],
        }


def plan_verify(opened: OpenedCheckpoint, report: VerifyReport, item: str | None = None) -> list[PendingRead]:
    """One read per array leaf, its regions those its checksums cover; finishing checks and drops them."""
    url = opened.location.url
    reads = []
    for saved_path, record in iter_leaves(opened.doc["tree"]):
        if record.get("kind") not in ARRAY_KINDS:
            continue  # inline in the index, which was validated when it was read
        path = saved_path if item is None else (item, *saved_path)  # a manager step's item: named first
        where = key_path_text(path)
        key = record.get("key")
        if not is_safe_storage_key(key):
            report.bad.append(BadLeaf(url, where, str(key), "its storage key is invalid: the index is corrupt"))
            continue
        try:
            shape = tuple(int(n) for n in record["shape"])
            dtype = dtype_from_name(record["dtype"])
        except (CheckpointError, KeyError, TypeError, ValueError) as exc:
            report.bad.append(BadLeaf(url, where, str(key), f"its index record is invalid: {exc}"))
            continue
        expected: list[tuple[tuple[slice, ...], str | None]]
        if record.get("checksum"):
            expected = [(tuple(slice(0, n) for n in shape), str(record["checksum"]))]
        elif record.get("shard_checksums"):
            expected = [
                (tuple(slice(int(a), int(b)) for a, b in e["index"]), str(e["checksum"]))
                for e in record["shard_checksums"]
            ]
        else:
            expected = [(tuple(slice(0, n) for n in shape), None)]
            report.unchecked.append(where)
        request = ReadRequest(
            key=str(key), shape=shape, saved_dtype=dtype, dtype=dtype, info=record.get("format_info", {}),
            regions=tuple(region for region, _ in expected),
        )
        sums = [s for _, s in expected]
        reads.append(PendingRead(path, record, request, _checker(report, url, where, str(key), sums), [None]))
    return reads


def _checker(report: VerifyReport, url: str, where: str, key: str, sums: list[str | None]) -> Any:
    def finish(arrays: list[np.ndarray]) -> None:
        if len(arrays) != len(sums):
            report.bad.append(BadLeaf(url, where, key, f"the format returned {len(arrays)} regions for {len(sums)}"))
            return
        for i, (data, expected) in enumerate(zip(arrays, sums, strict=True)):
            if expected is not None and not checksums.matches(data, expected):
                part = "" if len(sums) == 1 else f" (shard {i + 1} of {len(sums)})"
                report.bad.append(BadLeaf(url, where, key, f"checksum mismatch{part}: the stored data is corrupt"))
                return
        arrays.clear()

    return finish


def execute_verify(
    opened: OpenedCheckpoint,
    reads: list[PendingRead],
    report: VerifyReport,
    limit: int | None,
    progress: ProgressCallback | None,
    done_before: int,
    total: int,
) -> int:
    """Read and check ``reads`` in waves; returns the bytes done so far (for one progress bar over many checkpoints)."""
    location, doc, url = opened.location, opened.doc, opened.location.url
    limit = limit or DEFAULT_MAX_BYTES_IN_FLIGHT
    by_format: dict[str, list[PendingRead]] = {}
    for r in reads:
        by_format.setdefault(r.record.get("format", ""), []).append(r)
    done = done_before
    for name, group in by_format.items():
        try:
            if name in opened.formats:
                fmt, base = ArrayFormatRegistration(name=name, format=opened.formats[name]), location
            else:
                fmt, base = _format_for(name, doc, url), location.child(name)
        except CheckpointError as exc:
            for r in group:
                report.bad.append(BadLeaf(url, _where(r), r.request.key, f"{type(exc).__name__}: {exc}"))
            continue
        waves = _waves(group, limit)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptcore-verify-read") as reader, \
                ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckptcore-verify") as checker:
            pending = reader.submit(_read_wave, fmt, base, name, waves[0]) if waves else None
            for k, wave in enumerate(waves):
                assert pending is not None
                try:
                    results: list[list[np.ndarray]] | None = pending.result()
                except CheckpointError:
                    results = None
                pending = reader.submit(_read_wave, fmt, base, name, waves[k + 1]) if k + 1 < len(waves) else None
                if results is None:  # read the wave again leaf by leaf: name every bad one
                    results = []
                    for r in wave:
                        try:
                            results.append(_read_wave(fmt, base, name, [r])[0])
                        except CheckpointError as exc:
                            report.bad.append(BadLeaf(url, _where(r), r.request.key, _short(exc)))
                            results.append([])
                            r.slot[0] = "failed"
                jobs = [
                    checker.submit(r.finish, arrays_read)
                    for r, arrays_read in zip(wave, results, strict=True)
                    if r.slot[0] != "failed"
                ]
                for job in jobs:
                    job.result()
                wave_bytes = sum(_nbytes(r) for r in wave)
                del results, jobs
                if wave_bytes >= 64 << 20:
                    memory.release_free_memory()
                done += wave_bytes
                report.leaves += len(wave)
                report.bytes += wave_bytes
                if progress:
                    progress(done, total)
    return done


def _where(r: PendingRead) -> str:
    return key_path_text(r.path)


def _nbytes(r: PendingRead) -> int:
    return r.request.dtype.itemsize * _region_elements(r.request)


def planned_bytes(reads: list[PendingRead]) -> int:
    return sum(_nbytes(r) for r in reads)


def _short(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 400 else text[:397] + "..."


__all__ = ["BadLeaf", "VerifyReport", "execute_verify", "plan_verify", "planned_bytes"]
