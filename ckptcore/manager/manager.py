"""CheckpointManager: the steps of a training run in one directory, on any storage.

On storage (``<root>`` is the manager's directory)::

    <root>/ckptcore_manager.json          root file: format, step naming, user metadata
    <root>/<step name>/                   one step, committed atomically as a unit
        ckptcore_step.json                commit time, metrics, items and their formats
        <item>/ckptcore_index.json ...    a pytree item (a ckptcore checkpoint without its own commit)
        <item>/ckptcore_json.json         a Json item
        <item>/ckptcore_proto.binpb       a Proto item (and ckptcore_proto.txtpb, its text rendering)
    <root>/.ckptcore-writer.json          writer lock (lease file)
    <root>/.ckptcore-readers/             reader leases (steps retention must not delete now)

Only the storage and atomicity plugins touch storage (``Location.fs`` is fsspec), so the
same code serves local disk (rename commit) and object stores (commit-marker commit).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import operator
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec

from ckptcore import storage
from ckptcore.checkpointers import background
from ckptcore.checkpointers.background import BackgroundWriter
from ckptcore.checkpointers.engine import AsyncSaveEngine
from ckptcore.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConcurrentWriterError,
    CorruptCheckpointError,
    InvalidMetadataError,
    InvalidOptionError,
    NotACheckpointRootError,
    NotCommittedError,
    ReadOnlyError,
    StepAlreadyExistsError,
    StepInUseError,
    StorageError,
    TargetMismatchError,
)
from ckptcore.io import index
from ckptcore.io import save as saving
from ckptcore.io.metadata import metadata_tree
from ckptcore.io.restore import open_checkpoint, restore_location
from ckptcore.io.transforms import Transforms, last_restore_report, merge_reports, set_last_report
from ckptcore.manager import policies
from ckptcore.manager.composite import (
    DEFAULT_ITEM,
    Composite,
    Json,
    Proto,
    ProtoMetadata,
    parse_proto,
    proto_checksum,
    serialize_proto,
)
from ckptcore.manager.documents import (
    JSON_ITEM_FILE,
    PROTO_ITEM_FILE,
    PROTO_TEXT_FILE,
    ROOT_FILE,
    STEP_FILE,
    encode_step_doc,
    read_root_file,
    read_step_doc,
    write_root_file,
)
from ckptcore.manager.foreign import open_foreign_step
from ckptcore.manager.listing import committed_steps, list_names
from ckptcore.manager.options import CheckpointManagerOptions
from ckptcore.manager.retention import StepRecord, policy_info, steps_to_delete
from ckptcore.parallel.current import current_coordinator
from ckptcore.plugins.manager import registry
from ckptcore.plugins.registrations import Location
from ckptcore.storage import locks

log = logging.getLogger("ckptcore.manager.manager")

STEP_LAYOUT = "prefixed"
_UNCOMMITTED = object()  # a listed directory that is another system's step whose save never finished


@dataclass(frozen=True)
class StepMetadata:
    """What a step's metadata file says (no array data is read)."""

    step: int
    url: str
    commit_time: datetime.datetime | None
    metrics: Any
    items: Mapping[str, Mapping[str, Any]]  # name -> {"kind": "pytree"|"json"|"proto", "array_formats": [...], ...}
    composite: bool
    layout: str = "ckptcore"  # or the checkpoint layout of another system's step (e.g. "orbax")


# -- metrics ---------------------------------------------------------------------------

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def check_metrics(metrics: Any, where: str = "metrics") -> Any:
    """Metrics as JSON data: a mapping of names to numbers (nested mappings allowed).

    NumPy/JAX scalars become Python numbers; NaN and infinities are stored as the strings
    ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (JSON has no such numbers) and read back as floats.
    """
    if not isinstance(metrics, Mapping):
        raise InvalidMetadataError(
            f"{where} must be a mapping of metric names to numbers, like {{'loss': 0.5}}; got {type(metrics).__name__}"
        )
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise InvalidMetadataError(f"{where}: metric names must be strings, got {key!r}")
        here = f"{where}[{key!r}]"
        if isinstance(value, Mapping):
            out[key] = check_metrics(value, here)
            continue
        if getattr(value, "shape", None) == () and hasattr(value, "item"):
            value = value.item()  # NumPy / JAX scalar
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidMetadataError(
                f"{here} is {value!r} ({type(value).__name__}); a metric must be a number (int, float, or a "
                "NumPy/JAX scalar). Nothing was saved."
            )
        if isinstance(value, float) and not math.isfinite(value):
            value = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        out[key] = value
    return out


def decode_metrics(stored: Any) -> Any:
    if isinstance(stored, dict):
        return {k: decode_metrics(v) for k, v in stored.items()}
    if isinstance(stored, str):
        return _NON_FINITE.get(stored, stored)
    return stored


# -- the manager -----------------------------------------------------------------------


class CheckpointManager:
    """Saves, lists, keeps and restores the steps of a run in ``directory``.

    :param directory: a local path or a URL of an installed storage plugin (``gs://``, ``s3://``).
    :param options: :class:`CheckpointManagerOptions` (orbax-checkpoint's names and meanings).
    :param metadata: JSON-able data about the run, written with the root file when the
        directory is first set up, and returned by :meth:`metadata`.
    :param storage_options: options of the storage plugin (overrides ``options.storage_options``).

    Use it as a context manager, or call :meth:`close`: it waits for background saves,
    surfaces their errors and releases the writer lock.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        options: CheckpointManagerOptions | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._options = options if options is not None else CheckpointManagerOptions()
        opts = self._options
        self._root = storage.resolve(directory, storage_options if storage_options is not None else opts.storage_options)
        self._strategy = storage.atomicity(self._root)
        self._layout = registry().step_layout(STEP_LAYOUT).layout
        self._lock = threading.RLock()
        self._records: dict[int, StepRecord] = {}
        self._names: dict[int, str] = {}
        self._pending_step: int | None = None
        self._restored_step: int | None = None
        # The same engine as AsyncCheckpointer's: pooled snapshots, one step in flight, save_timeout
        # as the write deadline of a background step (past it the step is abandoned, never committed).
        self._engine = AsyncSaveEngine("ckptcore-manager-save", timeout=opts.save_timeout)
        self._deleter = BackgroundWriter("ckptcore-manager-delete")
        self._writer_lease: locks.Lease | None = None
        self._closed = False
        user_metadata = saving.check_json(dict(metadata or {}), "manager metadata")
        # Several jax.distributed processes: the primary sets the directory up (lock, root
        # file, clean-up) and lists the steps while the others wait, then broadcasts its
        # listing (_share_listing): N hosts do not list the directory N times.
        self._coordinator = current_coordinator()
        self._primary = self._coordinator.is_primary
        setup = not opts.read_only and self._primary
        opening = self._coordinator.primary_first(f"manager-open:{self._root.url}")

        try:
            names = self._open_root() if self._primary else []
            if setup and opts.writer_lock:
                self._writer_lease = locks.acquire_writer_lock(self._root, opts.lease_ttl_secs)
                # A manager dropped without close() must not keep the directory locked until
                # its lease expires (e.g. re-created in a notebook): release when collected.
                self._release_lock = weakref.finalize(self, self._writer_lease.release)
            root_doc = read_root_file(self._root) if ROOT_FILE in names else None
            if root_doc is None and setup:
                root_doc = self._write_root_file(user_metadata)
                names = list_names(self._root)
            elif root_doc is not None and metadata is not None and root_doc.get("metadata") != user_metadata:
                log.warning("%s already has root metadata; the metadata passed is ignored (it is written once)",
                            self._root.url)
            self._root_doc = root_doc or {}
            if opts.cleanup_tmp_directories and setup:
                from ckptcore.storage.cleanup import clean

                for url in clean(self._root.url, storage_options=self._root.options):
                    log.info("removed leftover of an interrupted save: %s", url)
                names = list_names(self._root)
            self._load(names)
        except BaseException as exc:
            opening.failed(exc)
            if self._writer_lease is not None:
                self._writer_lease.release()
            raise
        opening.done()
        self._share_listing()

    # -- set-up ------------------------------------------------------------------------

    def _open_root(self) -> list[str]:
        root, fs = self._root, self._root.fs
        fs.invalidate_cache(root.path)
        try:
            kind = fs.info(root.path).get("type")
        except FileNotFoundError:
            kind = None
        except OSError as exc:
            raise StorageError(f"could not open {root.url}: {exc}") from exc
        if kind is None:
            if self._options.read_only or not self._options.create:
                raise CheckpointNotFoundError(
                    f"{root.url} does not exist; pass options with create=True (and read_only=False) to start a new run there"
                )
            fs.makedirs(root.path, exist_ok=True)
            return []
        if kind != "directory":
            raise NotACheckpointRootError(f"{root.url} is a file, not a directory of checkpoint steps")
        names = list_names(root)
        if index.INDEX_FILE in names:
            raise NotACheckpointRootError(
                f"{root.url} is a single checkpoint (saved with ckptcore.save), not a directory of steps; "
                "restore it with ckptcore.restore, or give the manager another directory"
            )
        if STEP_FILE in names:
            raise NotACheckpointRootError(
                f"{root.url} is one step of a CheckpointManager; open the manager on its parent {root.parent().url}"
            )
        return names

    def _write_root_file(self, user_metadata: dict[str, Any]) -> dict[str, Any]:
        return write_root_file(
            self._root, step_prefix=self._options.step_prefix,
            step_format_fixed_length=self._options.step_format_fixed_length, metadata=user_metadata,
        )

    def _prefixes(self) -> tuple[str | None, ...]:
        ours = self._options.step_prefix
        saved = self._root_doc.get("step_prefix") if hasattr(self, "_root_doc") else None
        return (ours,) if saved == ours else (ours, saved)

    def _load(self, names: list[str]) -> None:
        steps = committed_steps(self._root, self._strategy, self._prefixes(), names)
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="ckptcore-list") as pool:
            docs = list(pool.map(lambda item: self._try_step_doc(*item), steps.items()))
        with self._lock:
            self._names = dict(steps)
            self._records = {}
            for (step, _), doc in zip(steps.items(), docs, strict=True):
                if not isinstance(doc, StepMetadata) and doc is not None:  # _UNCOMMITTED: another system's
                    del self._names[step]  # unfinished step (e.g. orbax's) is never listed
                    continue
                self._records[step] = self._record(step, doc)

    def _share_listing(self) -> None:
        """Several processes: the primary's listing (root file, steps, metrics) becomes everyone's.

        Only the primary lists the directory and reads the step files; the others get the
        result through the coordinator (orbax-checkpoint's ``single_host_load_and_broadcast``).
        """
        if self._coordinator.size == 1:
            return
        shared = self._coordinator.agree(f"manager-listing:{self._root.url}", self._listing_here)
        if self._primary:
            return
        with self._lock:
            self._root_doc = dict(shared["root_doc"] or {})
            self._names = {int(step): name for step, name, _, _ in shared["steps"]}
            self._records = {
                int(step): StepRecord(int(step), float(when), metrics, self._score(int(step), metrics, strict=False))
                for step, _, when, metrics in shared["steps"]
            }

    def _listing_here(self) -> dict[str, Any]:
        with self._lock:
            steps = [[s, self._names[s], r.time, r.metrics] for s, r in sorted(self._records.items()) if s in self._names]
        return {"root_doc": self._root_doc, "steps": steps}

    def _try_step_doc(self, step: int, name: str) -> StepMetadata | object | None:
        try:
            return self._read_step_doc(step, self._root.child(name))
        except NotCommittedError:
            return _UNCOMMITTED
        except CheckpointError as exc:
            log.warning("step %d: %s", step, exc)
            return None

    def _record(self, step: int, meta: StepMetadata | None) -> StepRecord:
        if meta is None:  # damaged or foreign: listed (restore says why it fails), never scored
            return StepRecord(step, 0.0)
        when = meta.commit_time.timestamp() if meta.commit_time else 0.0
        return StepRecord(step, when, meta.metrics, self._score(step, meta.metrics, strict=False))

    def _score(self, step: int, metrics: Any, *, strict: bool) -> float | None:
        ranking = self._ranking
        if ranking is None or metrics is None:
            return None
        best_fn = ranking[0]
        try:
            score = best_fn(metrics)
            if getattr(score, "shape", None) == () and hasattr(score, "item"):
                score = score.item()
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise TypeError(f"it returned {score!r} ({type(score).__name__}), not a number")
            return float(score)
        except Exception as exc:
            message = f"best_fn failed on the metrics of step {step} ({metrics!r}): {type(exc).__name__}: {exc}"
            if strict:
                raise InvalidMetadataError(message + ". Nothing was saved; fix best_fn or the metrics.") from exc
            log.warning("%s; the step is ranked as a step without metrics", message)
            return None

    # -- reading step metadata ---------------------------------------------------------

    def _read_step_doc(self, step: int, location: Location) -> StepMetadata:
        try:
            doc = read_step_doc(step, location)
        except CorruptCheckpointError:
            foreign = self._read_foreign_step(step, location)  # another system's step (e.g. orbax's)
            if foreign is None:
                raise
            return foreign
        return StepMetadata(
            step=step, url=location.url,
            commit_time=None if doc.commit_time is None
            else datetime.datetime.fromtimestamp(doc.commit_time, datetime.UTC),
            metrics=decode_metrics(doc.metrics), items=msgspec.to_builtins(doc.items), composite=doc.composite,
        )

    def _read_foreign_step(self, step: int, location: Location) -> StepMetadata | None:
        found = open_foreign_step(location)
        if found is None:
            return None
        layout, foreign = found
        if not foreign.committed:
            raise NotCommittedError(
                f"step {step} at {location.url} ({foreign.description or layout}) was never committed: its save was "
                "interrupted or is still running. Restore another step (all_steps())."
            )
        metrics = None
        if foreign.metrics is not None:
            try:
                metrics = decode_metrics(check_metrics(foreign.metrics, f"metrics of step {step}"))
            except InvalidMetadataError as exc:
                log.warning("step %d (%s): %s; ranked as a step without metrics", step, layout, exc)
        return StepMetadata(
            step=step, url=location.url,
            commit_time=None if foreign.commit_time is None
            else datetime.datetime.fromtimestamp(foreign.commit_time, datetime.UTC),
            metrics=metrics, items={k: dict(v) for k, v in foreign.items.items()},
            composite=set(foreign.items) != {DEFAULT_ITEM}, layout=layout,
        )

    # -- queries -----------------------------------------------------------------------

    @property
    def directory(self) -> str:
        """The URL (or absolute path) of the managed directory."""
        return self._root.url

    @property
    def options(self) -> CheckpointManagerOptions:
        return self._options

    def all_steps(self) -> list[int]:
        """Every committed step, ascending (as of the last save, delete or :meth:`reload`)."""
        with self._lock:
            return sorted(self._records)

    def latest_step(self) -> int | None:
        """The newest committed step, or ``None``. A save still in flight is never reported.

        In a multi-process job the primary's answer is every process's: call it on all of them.
        """
        return self._coordinator.agree(f"latest_step:{self._root.url}", self._latest_step_here)

    def _latest_step_here(self) -> int | None:
        with self._lock:
            return max(self._records, default=None)

    def best_step(self) -> int | None:
        """The best step by ``best_fn`` (the latest step without ``best_fn``); ``None`` if none is scored.

        Without ``best_fn``, a ``BestN`` in ``preservation_policy`` ranks the steps (orbax then
        returns the latest step).
        """
        ranking = self._ranking
        if ranking is None:
            return self.latest_step()
        with self._lock:
            scored = [r for r in self._records.values() if r.score is not None]
        if not scored:
            return None
        mode = ranking[1]
        worst = -math.inf if mode == "max" else math.inf

        def quality(r: StepRecord) -> float:
            score = float(r.score if r.score is not None else worst)
            return worst if math.isnan(score) else score

        # orbax's order: stable sort by score (ascending quality), the best is last.
        ranked = sorted(sorted(scored, key=lambda r: r.step), key=quality, reverse=mode == "min")
        return ranked[-1].step

    def metrics(self, step: int) -> Any:
        """The metrics saved with ``step`` (``None`` if it was saved without), even without ``best_fn``."""
        with self._lock:
            record = self._records.get(step)
        if record is None:
            raise self._not_found(step)
        return record.metrics

    def step_metadata(self, step: int) -> StepMetadata:
        """Commit time, metrics, item names and formats of ``step``."""
        return self._read_step_doc(step, self._step_location(step))

    def item_metadata(self, step: int | None = None) -> Any:
        """The saved tree(s) of ``step`` with arrays as :class:`ckptcore.ArrayMetadata`; no array is read.

        A Composite for composite steps; Json items are returned as their value, Proto items
        as :class:`ckptcore.manager.composite.ProtoMetadata` (type name, text rendering, size).
        """
        step = self._resolve_step(step)
        location = self._step_location(step)
        meta = self._read_step_doc(step, location)
        out = {}
        for name, item in meta.items.items():
            if item.get("kind") == "json":
                out[name] = self._read_json_item(step, location, name, item.get("file"))
            elif item.get("kind") == "proto":
                text = self._read_proto_file(step, location, name, PROTO_TEXT_FILE).decode("utf-8", "replace")
                out[name] = ProtoMetadata(str(item.get("type_name")), text, int(item.get("total_bytes") or 0))
            else:
                out[name] = metadata_tree(self._open_item(step, location, name, meta)[0])
        return Composite(out) if meta.composite else out[DEFAULT_ITEM]

    def metadata(self) -> dict[str, Any]:
        """The user metadata stored when the directory was set up (``{}`` if none)."""
        return dict(self._root_doc.get("metadata") or {})

    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` would write ``step`` now (orbax's rules).

        False when read-only or when ``step`` is not newer than the latest step (saved or
        in flight). Otherwise what the save decision policy says
        (:meth:`CheckpointManagerOptions.effective_save_decision_policy`: by default ``step``
        is a multiple of ``save_interval_steps``, or no step exists yet). In a multi-process job
        the primary decides for every process: call it on all of them.
        """
        # Preemption is agreed by every process (a collective), so it is asked before the
        # primary decides; and only of a policy that saves on preemption.
        preempted = (not self._options.read_only and policies.uses_preemption(self._save_policy)
                     and self.reached_preemption(step))
        return bool(self._coordinator.agree(
            f"should_save:{self._root.url}", lambda: self._should_save_here(step, bool(preempted))
        ))

    @property
    def _save_policy(self) -> Any:
        return self._options.effective_save_decision_policy()

    @property
    def _preservation_policy(self) -> Any:
        return self._options.effective_preservation_policy()

    @property
    def _ranking(self) -> tuple[Callable[[Any], Any], str] | None:
        """What ranks steps for best_step: best_fn, else the preservation policy's (first) BestN."""
        if self._options.best_fn is not None:
            return self._options.best_fn, self._options.best_mode
        best = policies.first_best_n(self._preservation_policy)
        if best is None or best.get_metric_fn is None:
            return None
        return best.get_metric_fn, str(best.mode)

    def reached_preemption(self, step: int) -> bool:
        """Whether every process must save ``step`` now because the job is being preempted.

        Call it at every step on every process (JAX's preemption sync manager when
        ``jax.distributed`` runs, else a SIGTERM handler); save and exit when it is true.
        """
        return self._coordinator.reached_preemption(step)

    def _should_save_here(self, step: int, preempted: bool = False) -> bool:
        if self._options.read_only:
            return False
        now = policies.to_datetime(policies.now())
        with self._lock:
            previous = [policy_info(self._records[s]) for s in sorted(self._records)]
            pending = self._pending_step
        if pending is not None and pending not in self._records:  # a step still being saved counts as saved now
            previous = sorted([*previous, policies.PolicyCheckpointInfo(pending, now)], key=lambda i: i.step)
        if previous and max(i.step for i in previous) >= step:
            return False
        context = policies.DecisionContext(is_saving_in_progress=self.is_saving_in_progress(), reached_preemption=preempted)
        return bool(self._save_policy.should_save(policies.PolicyCheckpointInfo(step, now), previous, context=context))

    def is_saving_in_progress(self) -> bool:
        return self._engine.in_progress() or self._deleter.in_progress()

    # -- save --------------------------------------------------------------------------

    def save(self, step: int, state: Any, *, metrics: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Save ``state`` (a pytree, a :class:`ckptcore.Json`, or a :class:`ckptcore.Composite`) as ``step``.

        Returns False, writing nothing, when the step is not due (:meth:`should_save`) and
        ``force`` is false. The step's items, metadata and metrics become visible together at
        commit; then retention deletes the steps the options no longer keep. With
        ``enable_async_checkpointing`` it returns once the state is snapshotted.

        :param metrics: numbers describing the step (``{"loss": 0.1}``), stored with it,
            returned by :meth:`metrics` and ranked by ``best_fn``.
        :param force: save even if not due, and replace the step if it exists.
        :raises StepAlreadyExistsError: ``step`` exists and ``force`` is false (checked before
            ``should_save``, so saving an existing step is an error, not a silent no-op).
        :raises ReadOnlyError: the manager is read-only.
        :raises InvalidMetadataError: a metric is not a number, or ``best_fn`` fails on the metrics.
        """
        self._check_open()
        if self._options.read_only:
            raise ReadOnlyError(f"this CheckpointManager of {self._root.url} is read-only; save refused")
        step = _check_step(step)
        with self._lock:
            exists = step in self._records or step == self._pending_step
        if exists and not force:
            hint = " (it is the latest step: a resumed loop starts at latest_step() + 1)" if (
                step == self.latest_step()) else ""
            raise StepAlreadyExistsError(
                f"step {step} already exists in {self._root.url}{hint}; pass force=True to replace it"
            )
        if not force and not self.should_save(step):
            return False
        self._engine.raise_errors()  # a previous background save's error surfaces here
        self._engine.make_room(0)  # one step in flight: wait for the previous one (bounded by its deadline)
        self._engine.raise_errors()
        self._check_writer_lease()
        if not force and self._coordinator.agree(  # several processes: the primary looks
            f"step-exists:{self._root.url}", lambda: self._strategy.is_committed(self._root.child(self._step_name(step)))
        ):
            raise StepAlreadyExistsError(
                f"step {step} already exists in {self._root.url} (saved by another process since this manager "
                "listed the steps: call reload()); pass force=True to replace it"
            )
        stored_metrics = check_metrics(metrics, f"metrics of step {step}") if metrics is not None else None
        decoded = decode_metrics(stored_metrics)
        score = self._score(step, decoded, strict=True)
        if self._ranking is not None and metrics is None:
            log.warning("step %d saved without metrics while steps are ranked by metrics (best_fn or BestN): it is "
                        "ranked as a step without metrics",
                        step)
        operation = self._coordinator.operation("save", "a collective save")  # every process in the same order
        if not self._options.enable_async_checkpointing:
            composite, items = self._prepare_items(state, operation, None)
            self._write_step(step, composite, items, stored_metrics, decoded, score, force, operation)
            return True
        (composite, items), snap = self._engine.snapshot(lambda copy: self._prepare_items(state, operation, copy))

        def write() -> None:
            try:
                self._write_step(step, composite, items, stored_metrics, decoded, score, force, operation)
            finally:
                with self._lock:
                    if self._pending_step == step:
                        self._pending_step = None

        with self._lock:
            self._pending_step = step
        nbytes = sum(payload.nbytes for kind, payload in items.values() if kind == "pytree")
        try:
            self._engine.submit(write, snap, nbytes=nbytes, key=self._root.url,
                                description=f"save step {step} to {self._root.url}")
        except BaseException:
            with self._lock:
                self._pending_step = None
            raise
        return True

    def _prepare_items(
        self, state: Any, operation: Any, copy_array: Any
    ) -> tuple[bool, dict[str, tuple[str, Any]]]:
        """Validate and snapshot every item (``copy_array``: copy NumPy leaves, for a background save)."""
        entries = dict(state) if isinstance(state, Composite) else {DEFAULT_ITEM: state}
        items: dict[str, tuple[str, Any]] = {}
        try:
            for name, value in entries.items():
                if isinstance(value, Json):
                    data = saving.check_json(value.value, f"Json item {name!r}")
                    items[name] = ("json", json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False).encode())
                elif isinstance(value, Proto):  # serialized now: later changes to the message are not saved
                    items[name] = ("proto", (value.type_name, *serialize_proto(value, name)))
                else:
                    copy = {"copy": True, "copy_array": copy_array} if copy_array is not None else {}
                    items[name] = ("pytree", saving.prepare(value, **copy))
        except BaseException as exc:
            operation.fail(exc)  # the other processes' save fails now instead of timing out
            raise
        return isinstance(state, Composite), items

    def _write_step(
        self, step: int, composite: bool, items: dict[str, tuple[str, Any]], stored_metrics: Any,
        metrics: Any, score: float | None, force: bool, operation: Any,
    ) -> None:
        final = self._root.child(self._step_name(step))
        # The primary begins and commits; a deadline passed in the background aborts before the commit.
        transaction = saving.Transaction(
            self._strategy, operation, self._coordinator, before_commit=background.check_deadline
        )
        staging = transaction.begin(final)
        with saving.aborted_on_failure(transaction, staging, f"step {step} to {final.url}"):
            described: dict[str, dict[str, Any]] = {}
            for name, (kind, payload) in items.items():
                target = staging.child(name)
                if kind == "json" and not self._primary:
                    described[name] = {"kind": "json"}
                elif kind == "json":
                    target.fs.makedirs(target.path, exist_ok=True)
                    target.fs.pipe_file(f"{target.path}/{JSON_ITEM_FILE}", payload)
                    described[name] = {"kind": "json"}
                elif kind == "proto":
                    type_name, data, text = payload
                    if self._primary:
                        target.fs.makedirs(target.path, exist_ok=True)
                        target.fs.pipe_file(f"{target.path}/{PROTO_ITEM_FILE}", data)
                        target.fs.pipe_file(f"{target.path}/{PROTO_TEXT_FILE}", text.encode())
                    described[name] = {"kind": "proto", "type_name": type_name, "total_bytes": len(data),
                                       "checksum": proto_checksum(data)}
                else:
                    doc = saving.write_contents(
                        payload, target, url=final.child(name).url, operation=operation,
                        coordinator=self._coordinator, format=self._options.array_format,
                        format_options=self._options.format_options, prefix=f"{name}/",
                    )
                    described[name] = {
                        "kind": "pytree", "array_formats": sorted(doc["array_formats"]),
                        "total_bytes": doc["total_bytes"],
                    }
            commit_time = policies.now()
            step_doc = encode_step_doc(
                step=step, commit_time=commit_time, composite=composite, items=described, metrics=stored_metrics
            )
            if self._primary:
                staging.fs.pipe_file(f"{staging.path.rstrip('/')}/{STEP_FILE}", step_doc)
            transaction.commit(staging, final, replace=force)
        with self._lock:
            self._records[step] = StepRecord(step, commit_time, metrics, score)
            self._names[step] = final.name
            if self._restored_step is not None and step > self._restored_step:
                self._restored_step = None  # a newer step is committed: the restored one needs no protection
        self._apply_retention(just_saved=step)

    # -- retention and deletes ---------------------------------------------------------

    def _apply_retention(self, just_saved: int) -> None:
        # The primary decides and deletes; the other processes (if any) forget the same steps.
        removed = self._coordinator.agree(f"retention:{self._root.url}", lambda: self._apply_retention_here(just_saved))
        if not self._primary:
            with self._lock:
                for step in removed:
                    self._records.pop(step, None)
                    self._names.pop(step, None)

    def _apply_retention_here(self, just_saved: int) -> list[int]:
        with self._lock:
            records = [self._records[s] for s in sorted(self._records)]
        doomed = steps_to_delete(records, self._preservation_policy)
        if not doomed:
            return []
        # Never the step this run restored from (until a newer one is committed), never a
        # step a reader holds: both are deleted by a later retention pass instead. The steps
        # are marked for deletion before the leases are listed: a reader leasing one meanwhile
        # is either seen here or sees the mark and skips it (see storage.locks). (Storage I/O:
        # done outside the lock so all_steps() never waits on it.)
        with self._lock:
            restored = self._restored_step
        marks = locks.mark_for_deletion(self._root, [s for s in doomed if s != restored], self._options.lease_ttl_secs)
        protected = set(marks.protected)
        with self._lock:
            if self._restored_step is not None:
                protected.add(self._restored_step)
            kept = [s for s in doomed if s in protected]
            if kept:
                log.info("retention keeps steps %s for now: being read, or restored from", kept)
            doomed = [s for s in doomed if s not in protected and s in self._records]
            removed = {s: (self._records.pop(s), self._names.pop(s)) for s in doomed}
        if not removed:
            marks.release()
            return []

        def delete() -> None:
            try:
                self._delete_removed(removed)
            finally:
                marks.release()  # the steps are gone (or stay listed after a failure)

        if self._options.enable_background_delete:
            self._deleter.submit(delete, description=f"delete steps {sorted(removed)}")
        else:
            delete()
        return sorted(removed)

    def _delete_removed(self, removed: dict[int, tuple[StepRecord, str]]) -> None:
        errors = []
        for step, (record, name) in removed.items():
            try:
                self._delete_location(self._root.child(name))
            except Exception as exc:  # keep deleting the others; the step stays listed
                with self._lock:
                    self._records[step], self._names[step] = record, name
                errors.append(f"step {step}: {type(exc).__name__}: {exc}")
        if errors:
            raise StorageError(f"retention could not delete some steps of {self._root.url}: " + "; ".join(errors))

    def _delete_location(self, location: Location) -> None:
        subdir = self._options.todelete_subdir
        if subdir is None:
            self._strategy.delete(location)
            return
        trash = self._root.child(subdir.strip("/"))
        fs = location.fs
        fs.makedirs(trash.path, exist_ok=True)
        destination = trash.child(location.name)
        if "file" in _protocols(fs) or "local" in _protocols(fs):
            fs.mv(location.path, destination.path, recursive=True)  # a rename: the step vanishes at once
        else:
            # Object stores have no rename: copy, then delete through the atomicity plugin so the
            # step is never visible half-deleted.
            fs.copy(location.path, destination.path, recursive=True)
            self._strategy.delete(location)

    def delete(self, step: int) -> None:
        """Delete ``step`` now.

        :raises StepInUseError: a reader (an evaluator, a restore in another process) holds it.
        """
        self._check_open()
        if self._options.read_only:
            raise ReadOnlyError(f"this CheckpointManager of {self._root.url} is read-only; delete refused")
        self._engine.wait()
        self._deleter.wait()
        # Several processes: the primary deletes; the others wait for it, then forget the step.
        deleting = self._coordinator.primary_first(f"delete:{self._root.url}")
        if not self._primary:
            with self._lock:
                self._records.pop(step, None)
                self._names.pop(step, None)
            return
        try:
            self._delete_here(step)
        except BaseException as exc:
            deleting.failed(exc)
            raise
        deleting.done()

    def _delete_here(self, step: int) -> None:
        location = self._step_location(step)
        # Marked before the leases are listed, as retention does (see storage.locks).
        marks = locks.mark_for_deletion(self._root, [step], self._options.lease_ttl_secs)
        try:
            if step in marks.protected:
                raise StepInUseError(
                    f"step {step} of {self._root.url} is being read (a reader lease in {locks.READERS_DIR}/); "
                    "retry once the reader is done, or let retention delete it later"
                )
            try:
                self._delete_location(location)
            except OSError as exc:
                raise StorageError(f"could not delete step {step} at {location.url}: {exc}") from exc
        finally:
            marks.release()
        with self._lock:
            self._records.pop(step, None)
            self._names.pop(step, None)
            if self._restored_step == step:
                self._restored_step = None

    def reload(self) -> None:
        """Re-read the steps from storage (after another process changed the directory).

        In a multi-process job call it on every process: the primary lists, the others get
        its listing.
        """
        self._check_open()
        if not self._root_doc and self._primary:
            try:
                self._root_doc = read_root_file(self._root) or {}
            except CheckpointError as exc:
                log.warning("%s", exc)
        self._load(list_names(self._root) if self._primary else [])
        self._share_listing()

    # -- restore -----------------------------------------------------------------------

    def restore(
        self, step: int | None = None, target: Any = None, *, partial: bool = False,
        transforms: Transforms | Mapping[str, Transforms] | None = None,
    ) -> Any:
        """Restore ``step`` (default: the latest committed step).

        :param target: as for :func:`ckptcore.restore` (a tree of arrays or abstract arrays
            saying shapes, dtypes, shardings); for a composite step a :class:`ckptcore.Composite`
            naming the items to restore (a subset is fine; an item ``None`` comes back as saved).
        :param partial: the target(s) may name a subset of the saved leaves.
        :param transforms: a :class:`ckptcore.Transforms` (for every pytree item restored), or
            ``{item name: Transforms}`` for a composite step; see :func:`ckptcore.restore`.
            :func:`ckptcore.last_restore_report` then says what they did (key paths of a
            composite step prefixed with ``<item>/``).
        :returns: the tree (a Composite for composite steps; Json items as their values).

        While it reads, the step holds a reader lease, so retention in any process leaves it alone.
        """
        self._check_open()
        step = self._resolve_step(step)
        location = self._step_location(step)
        lease = self._reader_lease(step)
        try:
            meta = self._read_step_doc(step, location)
            result = self._restore_items(step, location, meta, target, partial, transforms)
        finally:
            if lease is not None:
                lease.release()
        with self._lock:
            self._restored_step = step
        return result

    def _restore_items(
        self, step: int, location: Location, meta: StepMetadata, target: Any, partial: bool,
        transforms: Transforms | Mapping[str, Transforms] | None = None,
    ) -> Any:
        saved = meta.items
        if isinstance(target, Composite):
            unknown = sorted(set(target) - set(saved))
            if unknown:
                raise TargetMismatchError(
                    f"step {step} at {location.url} has no item(s) {unknown}; its items are {sorted(saved)}"
                )
            wanted = dict(target)
        elif meta.composite:
            if target is not None:
                raise TargetMismatchError(
                    f"step {step} at {location.url} holds the items {sorted(saved)}; pass a ckptcore.Composite "
                    "naming the items as target (e.g. Composite(state=abstract_state))"
                )
            wanted = dict.fromkeys(saved)
        else:
            wanted = {DEFAULT_ITEM: target}
        out = {}
        reports = {}
        for name, item_target in wanted.items():
            if name not in saved:
                raise CorruptCheckpointError(f"step {step} at {location.url} lists no item {name!r}")
            if saved[name].get("kind") == "json":
                out[name] = self._read_json_item(step, location, name, saved[name].get("file"))
                continue
            if saved[name].get("kind") == "proto":
                out[name] = self._read_proto_item(step, location, name, saved[name], item_target)
                continue
            if isinstance(item_target, Proto):
                raise TargetMismatchError(
                    f"item {name!r} of step {step} at {location.url} is a {saved[name].get('kind', 'pytree')} item, "
                    f"not a protobuf message; the target asks for {item_target.type_name}"
                )
            item_location = location.child(name)
            doc, formats = self._open_item(step, location, name, meta)
            item_transforms = transforms.get(name) if isinstance(transforms, Mapping) else transforms
            out[name] = restore_location(
                item_location, doc, item_target, partial=partial, coordinator=self._coordinator,
                transforms=item_transforms, formats=formats,
            )
            reports[name] = last_restore_report()
        composite = meta.composite or isinstance(target, Composite)
        if composite and reports:
            set_last_report(merge_reports(location.url, {k: v for k, v in reports.items() if v is not None}))
        return Composite(out) if meta.composite or isinstance(target, Composite) else out[DEFAULT_ITEM]

    def _open_item(
        self, step: int, location: Location, name: str, meta: StepMetadata
    ) -> tuple[dict[str, Any], Mapping[str, Any]]:
        """The index of a pytree item, and (for another system's step) the readers of its arrays."""
        if meta.layout == "ckptcore":
            return self._read_item_index(step, location, name), {}
        opened = open_checkpoint(location.child(name).url, self._root.options)
        return opened.doc, opened.formats

    def _read_item_index(self, step: int, location: Location, name: str) -> dict[str, Any]:
        try:
            return index.read_index(location.child(name))
        except CheckpointNotFoundError as exc:
            raise CorruptCheckpointError(
                f"step {step} at {location.url} is damaged: its item {name!r} has no index. "
                f"Restore another step (all_steps()) or delete it (delete({step}))."
            ) from exc

    def _read_proto_file(self, step: int, location: Location, name: str, file: str) -> bytes:
        try:
            return bytes(location.fs.cat_file(f"{location.child(name).path}/{file}"))
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(
                f"step {step} at {location.url} is damaged: Proto item {name!r} has no {file}. "
                f"Restore another step (all_steps()) or delete it (delete({step}))."
            ) from exc

    def _read_proto_item(self, step: int, location: Location, name: str, saved: Mapping[str, Any], target: Any) -> Any:
        where = f"item {name!r} of step {step} at {location.url}"
        type_name = str(saved.get("type_name"))
        if not isinstance(target, Proto):  # before any read: the error is the target's, not the data's
            return parse_proto(target, type_name, b"", name=name, where=where)
        data = self._read_proto_file(step, location, name, PROTO_ITEM_FILE)
        expected = saved.get("checksum")
        if len(data) != saved.get("total_bytes") or (expected is not None and proto_checksum(data) != expected):
            raise CorruptCheckpointError(
                f"{where} is damaged: {PROTO_ITEM_FILE} has {len(data)} bytes, checksum {proto_checksum(data)}; "
                f"the step recorded {saved.get('total_bytes')} bytes, {expected}. Restore another step "
                f"(all_steps()) or delete it (delete({step}))."
            )
        return parse_proto(target, type_name, data, name=name, where=where)

    def _read_json_item(self, step: int, location: Location, name: str, file: str | None = None) -> Any:
        path = f"{location.child(name).path}/{file or JSON_ITEM_FILE}"
        try:
            return json.loads(location.fs.cat_file(path))
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(f"step {step} at {location.url} is damaged: Json item {name!r} is missing") from exc
        except ValueError as exc:
            raise CorruptCheckpointError(
                f"step {step} at {location.url} is damaged: Json item {name!r} is not valid JSON ({exc})"
            ) from exc

    def _reader_lease(self, step: int) -> locks.Lease | None:
        try:
            # check_deleting: a step retention is deleting right now is not read half-deleted
            return locks.acquire_reader_lease(self._root, step, self._options.lease_ttl_secs, check_deleting=True)
        except Exception as exc:  # e.g. read-only credentials: read unprotected rather than not at all
            log.warning("could not take a reader lease on step %d of %s (%s); reading without it",
                        step, self._root.url, exc)
            return None

    # -- helpers -----------------------------------------------------------------------

    def _step_name(self, step: int) -> str:
        with self._lock:
            name = self._names.get(step)
        return name or self._layout.step_name(step, self._options.step_prefix, self._options.step_format_fixed_length)

    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            latest = self.latest_step()
            if latest is None:
                raise CheckpointNotFoundError(f"{self._root.url} holds no committed step yet")
            return latest
        return _check_step(step)

    def _step_location(self, step: int) -> Location:
        with self._lock:
            name = self._names.get(step)
        if name is None:
            # Maybe written by another process since the last listing.
            candidate = self._root.child(self._step_name(step))
            if not self._strategy.is_committed(candidate):
                raise self._not_found(step)
            return candidate
        return self._root.child(name)

    def _not_found(self, step: int) -> CheckpointNotFoundError:
        return CheckpointNotFoundError(
            f"step {step} is not a committed step of {self._root.url}; steps: {self.all_steps()} "
            "(call reload() if another process saved it)"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"this CheckpointManager of {self._root.url} is closed")

    def _check_writer_lease(self) -> None:
        lease = self._writer_lease
        if lease is not None and lease.lost is not None:
            raise ConcurrentWriterError(
                f"this manager lost the writer lock of {self._root.url} ({lease.lost}); it was not refreshed in "
                f"time (storage stalled for over {lease.ttl} s?). Saving stopped to protect the other writer's steps."
            )

    # -- lifecycle ---------------------------------------------------------------------

    def wait_until_finished(self) -> None:
        """Wait for the background save and deletes; raise the error of a failed one."""
        try:
            self._engine.wait()
        finally:
            self._deleter.wait()

    def close(self) -> None:
        """Finish background work (raising its error), then release the writer lock."""
        if self._closed:
            return
        self._closed = True
        try:
            try:
                self._engine.close()  # waits for the step in flight, then frees the snapshot buffers
            finally:
                self._deleter.wait()
        finally:
            if self._writer_lease is not None:
                self._release_lock()  # runs release() once, and never again at garbage collection
                self._writer_lease = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # the exception already propagating matters more; this one is logged
            log.exception("closing the CheckpointManager of %s failed", self._root.url)

    def __repr__(self) -> str:
        return f"CheckpointManager({self._root.url!r}, steps={self.all_steps()})"


def _check_step(step: Any) -> int:
    try:
        value = operator.index(step)
    except TypeError:
        raise InvalidOptionError(f"a step is a non-negative integer, got {step!r}") from None
    if value < 0:
        raise InvalidOptionError(f"a step is a non-negative integer, got {value}")
    return value


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
