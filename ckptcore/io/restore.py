"""Restoring one checkpoint: open it, plan the reads against the target, read in waves.

Reads are grouped by array format and issued in waves of at most ``max_bytes_in_flight``
bytes; the next wave is read while the previous one is verified, so disk and CPU overlap
and memory stays near the size of the result.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptcore import storage
from ckptcore.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleVersionError,
    MissingPluginError,
    NotCommittedError,
    PluginError,
    StorageError,
    TransformError,
)
from ckptcore.io import gcpause, index, memory, multiwriter
from ckptcore.io.restore_plan import PendingRead, Planner, fill
from ckptcore.io.transforms import RestoreReport, TransformPlan, Transforms, set_last_report
from ckptcore.parallel.coordinator import LOCAL, Coordinator
from ckptcore.plugins.manager import registry
from ckptcore.plugins.registrations import ArrayFormatRegistration, Location, ProgressCallback, ReadRequest
from ckptcore.tree.keys import format_key_path
from ckptcore.tree.nodes import iter_leaves, validate_tree

# Small enough that a restore onto devices (whose host copies are transient) peaks near its
# result's size, large enough to keep the format's reads parallel.
DEFAULT_MAX_BYTES_IN_FLIGHT = 256 << 20


@dataclass(frozen=True)
class OpenedCheckpoint:
    """A checkpoint ready to restore: where it is, its index, and (for another system's layout) its readers."""

    location: Location
    doc: dict[str, Any]
    layout: str = "ckptcore"
    description: str = "ckptcore layout"
    formats: Mapping[str, Any] = field(default_factory=dict)


def open_checkpoint(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> OpenedCheckpoint:
    """The committed checkpoint at ``path``: ckptcore's own, else one a checkpoint-layout plugin recognizes."""
    location = storage.resolve(path, storage_options)
    strategy = storage.atomicity(location)
    committed = strategy.is_committed(location)  # on POSIX: any directory (a rename made it visible)
    if committed and location.fs.exists(f"{location.path.rstrip('/')}/{index.INDEX_FILE}"):
        return OpenedCheckpoint(location, index.read_index(location))
    foreign = _open_foreign(location)
    if foreign is not None:
        return foreign
    if committed:
        index.read_index(location)  # raises the clear "not a ckptcore checkpoint" error
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


def _open_foreign(location: Location) -> OpenedCheckpoint | None:
    """The first checkpoint-layout plugin that recognizes ``location`` opens it (its tree validated)."""
    for reg in registry().checkpoint_layouts():
        where = f"the {reg.name!r} checkpoint layout ({reg.distribution or 'registered in process'})"
        try:
            if not reg.layout.recognize(location):
                continue
            opened = reg.layout.open(location)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CorruptCheckpointError(
                f"{location.url} looks like a checkpoint of {where}, but reading it failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        doc = dict(opened.index)
        try:
            validate_tree(doc.get("tree"))
        except CheckpointError as exc:
            raise PluginError(f"{where} described {location.url} with an invalid tree: {exc}") from exc
        doc.setdefault("array_formats", {name: {} for name in opened.formats})
        return OpenedCheckpoint(location, doc, reg.name, opened.description, dict(opened.formats))
    return None


def open_committed(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[Location, dict[str, Any]]:
    """The location and index of the committed ckptcore checkpoint (or recognized foreign one) at ``path``."""
    opened = open_checkpoint(path, storage_options)
    return opened.location, opened.doc


def restore_location(
    location: Location,
    doc: dict[str, Any],
    target: Any = None,
    *,
    partial: bool = False,
    max_bytes_in_flight: int | None = None,
    progress: ProgressCallback | None = None,
    coordinator: Coordinator = LOCAL,
    formats: Mapping[str, Any] | None = None,
    transforms: Transforms | None = None,
) -> Any:
    """Restore from a location whose index ``doc`` is already read (commit checked by the caller).

    For callers that commit several checkpoints as one unit, such as a manager's items.
    ``formats`` are the readers of a checkpoint of another layout (see :func:`open_checkpoint`),
    which read from ``location`` itself rather than from a format's directory inside it.
    ``transforms`` map the checkpoint onto a target that differs from it (see
    :mod:`ckptcore.io.transforms`). The restore's report is left in
    :func:`ckptcore.io.transforms.last_restore_report`.
    """
    with gcpause.paused():  # thousands of leaves: see ckptcore.gcpause
        return _restore_location(
            location, doc, target, partial, max_bytes_in_flight, progress, coordinator, formats or {}, transforms
        )


def _restore_location(
    location: Location,
    doc: dict[str, Any],
    target: Any,
    partial: bool,
    max_bytes_in_flight: int | None,
    progress: ProgressCallback | None,
    coordinator: Coordinator,
    formats: Mapping[str, Any],
    transforms: Transforms | None = None,
) -> Any:
    target, widen = coordinator.narrow_targets(target)  # what this process reads itself (all, unless single-replica)
    tree, plan = doc["tree"], None
    if transforms is not None:
        if target is None:
            raise TransformError(
                f"restoring {location.url} with transforms needs a target: the transforms map the saved keys "
                "onto its key paths (e.g. target=jax.eval_shape(init) or ckptcore.metadata(path))"
            )
        plan = TransformPlan(transforms, tree, location.url)
        tree = plan.encode_target(target)
    planner = Planner(partial, plan)
    skeleton = planner.plan(tree, target, (), target is not None)
    if plan is not None:
        plan.raise_if_invalid()
    if planner.missing:  # only for "did you mean" hints: thousands of paths are costly to format
        planner.saved_paths = [format_key_path(p) for p, _ in iter_leaves(doc["tree"])]
    planner.raise_if_mismatched(location.url)
    limit = max_bytes_in_flight or DEFAULT_MAX_BYTES_IN_FLIGHT
    nbytes = _execute_reads(location, doc, planner.reads, limit, progress, formats)
    slots = {id(r.slot) for r in planner.reads}
    report = RestoreReport(url=location.url) if plan is None else plan.report
    if plan is not None:
        plan.compute()
        slots |= plan.slot_ids()
    report.leaves_read, report.bytes_read = len(planner.reads), nbytes
    set_last_report(report)
    return widen(fill(skeleton, slots))


def _execute_reads(
    location: Location,
    doc: dict[str, Any],
    reads: list[PendingRead],
    limit: int,
    progress: ProgressCallback | None,
    foreign: Mapping[str, Any],
) -> int:
    by_format: dict[str, list[PendingRead]] = {}
    for r in reads:
        by_format.setdefault(r.record.get("format", ""), []).append(r)
    nbytes = {id(r): r.request.dtype.itemsize * _region_elements(r.request) for r in reads}
    total = sum(nbytes.values())
    done = 0
    for name, group in by_format.items():
        if name in foreign:  # another layout's reader: its data is where the checkpoint is
            fmt, base = ArrayFormatRegistration(name=name, format=foreign[name]), location
        else:
            fmt, base = _format_for(name, doc, location.url), location.child(name)
        waves = _waves(group, limit)
        # The next wave is read while this one is verified and finished: disk and CPU overlap.
        # The read buffers in flight stay one wave's (finishing allocates nothing for NumPy).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptcore-read") as reader:
            pending = reader.submit(_read_wave, fmt, base, name, waves[0]) if waves else None
            for k, wave in enumerate(waves):
                assert pending is not None
                results = pending.result()
                pending = reader.submit(_read_wave, fmt, base, name, waves[k + 1]) if k + 1 < len(waves) else None
                _finish_wave(wave, results, nbytes)
                del results
                wave_bytes = sum(nbytes[id(r)] for r in wave)
                if wave_bytes >= _TRIM_AFTER_BYTES:  # trimming costs ~10 ms: not worth it for small waves
                    memory.release_free_memory()  # the wave's read buffers, before more are allocated
                done += wave_bytes
                if progress:
                    progress(done, total)
    return total


def _read_wave(fmt: Any, location: Location, name: str, wave: list[PendingRead]) -> list[list[np.ndarray]]:
    """Read one wave from ``location`` (the format's directory, or a foreign checkpoint's own)."""
    # fmt.format.read, also for leaves written by several processes
    results = multiwriter.read_or_explain(
        fmt.format, location, [r.request for r in wave],
        lambda exc: f"reading arrays of {location.url} (format {name!r}) failed: {exc}; "
        "the data is missing or corrupt, or the storage failed",
    )
    if len(results) != len(wave):
        raise PluginError(
            f"array format {name!r} ({fmt.distribution}) returned {len(results)} results for "
            f"{len(wave)} read requests; report this to the plugin's authors"
        )
    return results


_PARALLEL_FINISH_BYTES = 1 << 20
_TRIM_AFTER_BYTES = 64 << 20


def _finish_wave(wave: list[PendingRead], results: list[list[np.ndarray]], nbytes: dict[int, int]) -> None:
    """Run the finishers (checksum checks) of a wave; large leaves' in threads, as CRC-32C releases the GIL."""
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


def _waves(group: list[PendingRead], limit: int) -> list[list[PendingRead]]:
    waves: list[list[PendingRead]] = [[]]
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
