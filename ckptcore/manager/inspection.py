"""Looking at checkpoints without restoring them: ``verify``, ``diff`` and a run's listing (``ckptcore ls``).

Each takes what a user points at: a checkpoint (``ckptcore.save``'s, or another system's
that a checkpoint-layout plugin recognises), a manager's step (its items, key paths then
prefixed with ``<item>/``), or, for :func:`verify` and :func:`list_run`, a manager's root.
Nothing here writes to storage: no lease, no lock, no clean-up.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ckptcore import progress as progress_lib
from ckptcore import storage
from ckptcore.errors import CheckpointError, CheckpointNotFoundError, InvalidOptionError, NotCommittedError
from ckptcore.io import index
from ckptcore.io.diff import DiffReport, entries, structure_diff, value_diffs
from ckptcore.io.restore import OpenedCheckpoint, open_checkpoint
from ckptcore.io.verify import VerifyReport, execute_verify, plan_verify, planned_bytes
from ckptcore.manager.documents import JSON_ITEM_FILE, ROOT_FILE, STEP_FILE, decode_step_doc
from ckptcore.manager.listing import list_names
from ckptcore.manager.manager import CheckpointManager
from ckptcore.manager.options import CheckpointManagerOptions
from ckptcore.plugins.registrations import Location, ProgressCallback
from ckptcore.storage import locks


@dataclass
class _Resolved:
    kind: Literal["checkpoint", "step", "root"]
    url: str
    items: list[tuple[str | None, OpenedCheckpoint]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # damage found while opening (step files, Json items)


def _resolve(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None, roots: bool) -> list[_Resolved]:
    location = storage.resolve(path, storage_options)
    fs, base = location.fs, location.path.rstrip("/")
    fs.invalidate_cache(base)
    if fs.exists(f"{base}/{STEP_FILE}"):
        return [_open_step(location)]
    if not fs.exists(f"{base}/{index.INDEX_FILE}") and fs.exists(f"{base}/{ROOT_FILE}"):
        if not roots:
            raise InvalidOptionError(
                f"{location.url} is a CheckpointManager root; compare two of its steps (ROOT/<step>) instead"
            )
        with CheckpointManager(location.url, CheckpointManagerOptions(read_only=True),
                               storage_options=location.options) as mgr:
            urls = [mgr.step_metadata(s).url for s in mgr.all_steps()]
        return [_open_step(storage.resolve(u, location.options)) for u in urls] or [_Resolved("root", location.url)]
    return [_Resolved("checkpoint", location.url, [(None, open_checkpoint(path, storage_options))])]


def _open_step(location: Location) -> _Resolved:
    if not storage.atomicity(location).is_committed(location):
        raise NotCommittedError(f"{location.url} is not a committed step (a save there was interrupted or is running)")
    name = location.path.rstrip("/").rpartition("/")[2]
    digits = "".join(c for c in name if c.isdigit())
    step = int(digits) if digits else -1
    raw = storage.read_file(location, STEP_FILE)
    assert raw is not None
    doc = decode_step_doc(raw, step, location.url)
    out = _Resolved("step", location.url)
    for item, entry in doc.items.items():
        where = location.child(item)
        if entry.kind == "json":
            try:
                json.loads(location.fs.cat_file(f"{where.path}/{JSON_ITEM_FILE}"))
            except (OSError, ValueError) as exc:
                out.errors.append(f"{where.url}: the Json item {item!r} is missing or not valid JSON ({exc})")
            continue
        try:
            out.items.append((item, OpenedCheckpoint(where, index.read_index(where))))
        except CheckpointError as exc:
            out.errors.append(f"{where.url}: {type(exc).__name__}: {exc}")
    return out


# -- verify ------------------------------------------------------------------------------


def verify(
    path: str | os.PathLike[str],
    *,
    progress: ProgressCallback | bool | None = None,
    max_bytes_in_flight: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Read every stored byte of ``path`` and check every checksum; return what was found.

    :param path: a checkpoint, a manager step (all its items) or a manager root (all its steps).
    :param progress: ``True`` for a progress bar, or a callable(bytes read, bytes total).
    :param max_bytes_in_flight: the most bytes read at once (default 256 MiB): memory stays near it.
    :returns: a :class:`VerifyReport`; ``report.ok`` is false when any leaf is bad (each is in
        ``report.bad``, with its key path and storage key). Damaged leaves do not stop the walk.
    :raises CheckpointNotFoundError, NotCommittedError: nothing verifiable at ``path``.
    """
    started = time.perf_counter()
    resolved = _resolve(path, storage_options, roots=True)
    report = VerifyReport(url=storage.resolve(path, storage_options).url)
    plans = []
    for r in resolved:
        report.errors += r.errors
        for item, opened in r.items:
            report.checkpoints.append(opened.location.url)
            plans.append((opened, plan_verify(opened, report, item)))
    total = sum(planned_bytes(reads) for _, reads in plans)
    with progress_lib.resolve(progress, f"verifying {path}") as callback:
        done = 0
        for opened, reads in plans:
            done = execute_verify(opened, reads, report, max_bytes_in_flight, callback, done, total)
    report.seconds = time.perf_counter() - started
    return report


# -- diff --------------------------------------------------------------------------------


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    values: bool = False,
    atol: float = 0.0,
    rtol: float = 0.0,
    max_bytes_in_flight: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> DiffReport:
    """Compare two checkpoints (or two manager steps): structure, shapes, dtypes, scalars.

    :param values: also read every array leaf present in both with the same shape and
        report its largest absolute and relative difference (``|a - b|``, ``|a - b| / |b|``).
    :param atol, rtol: with ``values``, a leaf is within tolerance when
        ``|a - b| <= atol + rtol * |b|`` everywhere (NaN equals NaN); the defaults ask for equality.
    :returns: a :class:`DiffReport`; ``report.same`` is true when nothing differs.
    """
    if atol < 0 or rtol < 0 or not all(isinstance(x, int | float) for x in (atol, rtol)):
        raise InvalidOptionError(f"diff(atol={atol!r}, rtol={rtol!r}): tolerances are numbers >= 0")
    ra, rb = _resolve(a, storage_options, roots=False)[0], _resolve(b, storage_options, roots=False)[0]
    report = DiffReport(ra.url, rb.url, compared_values=values, atol=float(atol), rtol=float(rtol))
    items_a, items_b = dict(ra.items), dict(rb.items)
    prefixed = ra.kind == "step" or rb.kind == "step"
    if prefixed and (None in items_a or None in items_b):
        raise InvalidOptionError(f"diff compares two checkpoints or two manager steps, not one of each: {ra.url}, {rb.url}")
    from ckptcore.io.diff import LeafDiff

    for item in [*items_a, *(i for i in items_b if i not in items_a)]:
        prefix = f"{item}/" if prefixed else ""
        if item not in items_b:
            report.differences.append(LeafDiff(f"{item}", "only_in_a", "item"))
            continue
        if item not in items_a:
            report.differences.append(LeafDiff(f"{item}", "only_in_b", "", "item"))
            continue
        oa, ob = items_a[item], items_b[item]
        ea, eb = entries(oa.doc["tree"]), entries(ob.doc["tree"])
        report.differences += structure_diff(ea, eb, prefix)
        if values:
            common = [p for p, e in ea.items() if e.kind == "array" and p in eb and eb[p].kind == "array"
                      and eb[p].shape == e.shape]
            report.values += value_diffs(oa, ob, ea, eb, common, atol, rtol, max_bytes_in_flight, prefix)
    return report


# -- ls ----------------------------------------------------------------------------------


@dataclass
class StepListing:
    """One step of a run as :func:`list_run` sees it."""

    step: int
    url: str
    commit_time: str | None
    bytes: int
    items: list[str]
    metrics: Any
    latest: bool = False
    best: bool = False
    protected: bool = False  # a live reader lease protects it from retention
    error: str | None = None


@dataclass
class RunListing:
    """A manager root: its committed steps, and what interrupted saves left behind."""

    url: str
    steps: list[StepListing]
    leftovers: list[str]
    best_metric: str | None = None
    best_mode: str = "min"
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url, "best_metric": self.best_metric, "best_mode": self.best_mode,
            "metadata": self.metadata, "leftovers": self.leftovers,
            "steps": [_json_safe(s.__dict__) for s in self.steps],
        }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def list_run(
    root: str | os.PathLike[str],
    *,
    best_metric: str | None = None,
    best_mode: Literal["min", "max"] = "min",
    storage_options: Mapping[str, Any] | None = None,
) -> RunListing:
    """The steps of the manager root ``root``: commit times, sizes, metrics, latest, best, protection, leftovers.

    :param best_metric: the metric that ranks steps (``best`` marks the best one); the root
        does not record the run's ``best_fn``, so say which metric it used.
    :param best_mode: ``"min"`` or ``"max"``.
    """
    if best_mode not in ("min", "max"):
        raise InvalidOptionError(f"best_mode={best_mode!r}: use 'min' or 'max'")
    location = storage.resolve(root, storage_options)
    fs, base = location.fs, location.path.rstrip("/")
    if fs.exists(f"{base}/{index.INDEX_FILE}") or fs.exists(f"{base}/{STEP_FILE}"):
        raise InvalidOptionError(f"{location.url} is a checkpoint or a step, not a manager root; use ckptcore inspect")
    if not fs.isdir(base):
        raise CheckpointNotFoundError(f"no directory at {location.url}; check the path")
    with CheckpointManager(location.url, CheckpointManagerOptions(read_only=True),
                           storage_options=location.options) as mgr:
        steps = []
        for step in mgr.all_steps():
            try:
                meta = mgr.step_metadata(step)
            except CheckpointError as exc:
                steps.append(StepListing(step, "", None, 0, [], None, error=f"{type(exc).__name__}: {exc}"))
                continue
            size = sum(int(i.get("total_bytes") or 0) for i in meta.items.values())
            when = meta.commit_time.isoformat() if meta.commit_time else None
            steps.append(StepListing(step, meta.url, when, size, sorted(meta.items), meta.metrics))
        run_metadata = mgr.metadata()
    leased = locks.leased_steps(location)
    for s in steps:
        s.protected = s.step in leased
    if steps:
        steps[-1].latest = True
    if best_metric is not None:
        scored = [s for s in steps if isinstance(s.metrics, Mapping) and _number(s.metrics.get(best_metric)) is not None]
        if scored:
            pick = min if best_mode == "min" else max
            pick(scored, key=lambda s: _number(s.metrics[best_metric]) or 0.0).best = True
    strategy = storage.atomicity(location)
    leftovers = [location.child(n).url for n in list_names(location) if strategy.is_staging(location.child(n))]
    return RunListing(location.url, steps, leftovers, best_metric, best_mode, dict(run_metadata or {}))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value == value else None


__all__ = ["RunListing", "StepListing", "diff", "list_run", "verify"]
