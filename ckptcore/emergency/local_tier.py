"""One process's local tier: an ordinary step directory that only this process writes.

Each committed step is ``<local>/<step>/`` with the manager's ``ckptcore_step.json``, the
item ``state`` (this process's view, see :mod:`ckptcore.emergency.views`), one item
``replica_<p>`` per peer ``p`` this process keeps a copy for, and ``ckptcore_emergency.json``
(run id, process count, which process wrote it, the fingerprint of each view). A step is
written into a staging directory and committed atomically by the storage's own strategy,
without any other process (the local coordinator): an interrupted save leaves only a
staging leftover, never a step, so it cannot shadow an older complete one. Readable with
``ckptcore.CheckpointManager(local, CheckpointManagerOptions(read_only=True))``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptcore import storage
from ckptcore.errors import CheckpointError, CorruptCheckpointError, StorageError
from ckptcore.io import save as saving
from ckptcore.io.plans import PreparedSave
from ckptcore.manager.documents import ROOT_FILE, STEP_FILE, encode_step_doc, write_root_file
from ckptcore.manager.listing import committed_steps, list_names
from ckptcore.parallel.coordinator import LOCAL
from ckptcore.plugins.manager import registry

log = logging.getLogger("ckptcore.emergency")

SIDECAR = "ckptcore_emergency.json"
SIDECAR_FORMAT = "ckptcore-emergency-local"
OWN_ITEM = "state"


def replica_item(process: int) -> str:
    return f"replica_{process}"


@dataclass(frozen=True)
class LocalStep:
    """A committed local step that belongs to this run and this process."""

    step: int
    name: str
    views: Mapping[int, str] = field(default_factory=dict)  # process -> fingerprint of its view held here
    items: Mapping[int, str] = field(default_factory=dict)  # process -> item name


class LocalTier:
    """The local step directory of process ``process`` of a job of ``processes``, for run ``run_id``."""

    def __init__(
        self, directory: str, *, process: int, processes: int, run_id: str | None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.root = storage.resolve(directory, storage_options)
        self.strategy = storage.atomicity(self.root)
        self.layout = registry().step_layout("prefixed").layout
        self.process, self.processes, self.run_id = process, processes, run_id
        self.skipped: dict[int, str] = {}  # step -> why it is not used
        try:
            self.root.fs.makedirs(self.root.path, exist_ok=True)
            if ROOT_FILE not in list_names(self.root):
                write_root_file(self.root, step_prefix=None, step_format_fixed_length=None,
                                metadata={"ckptcore_emergency": {"process": process, "processes": processes}})
            from ckptcore.storage.cleanup import clean

            for url in clean(self.root.url, storage_options=self.root.options):
                log.info("local tier of process %d: removed the leftover of an interrupted save: %s", process, url)
        except OSError as exc:
            raise StorageError(f"could not open the local tier {self.root.url} of process {process}: {exc}") from exc

    def step_name(self, step: int) -> str:
        return str(self.layout.step_name(step, None, None))

    # -- listing -------------------------------------------------------------------------

    def steps(self) -> dict[int, LocalStep]:
        """This run's committed steps here; steps of another run, process or job size are skipped (logged)."""
        found: dict[int, LocalStep] = {}
        for step, name in committed_steps(self.root, self.strategy, (None,)).items():
            why, entry = self._read(step, name)
            if entry is not None:
                found[step] = entry
                self.skipped.pop(step, None)
            elif self.skipped.get(step) != why:
                self.skipped[step] = why
                log.warning("local tier of process %d: step %d at %s is skipped: %s",
                            self.process, step, self.root.child(name).url, why)
        return found

    def _read(self, step: int, name: str) -> tuple[str, LocalStep | None]:
        raw = storage.read_file(self.root.child(name), SIDECAR)
        if raw is None:
            return f"no {SIDECAR}: not written by ckptcore.emergency", None
        try:
            doc = json.loads(raw)
            if doc.get("format") != SIDECAR_FORMAT:
                return f"{SIDECAR} is not an emergency step file", None
            if self.run_id is not None and doc.get("run_id") != self.run_id:
                return f"it belongs to another run ({doc.get('run_id')!r}, this run is {self.run_id!r})", None
            if int(doc["processes"]) != self.processes:
                return f"it was saved by a job of {doc['processes']} processes, this job has {self.processes}", None
            if int(doc["holder"]) != self.process:
                return f"it was written by process {doc['holder']}, not by this process {self.process}", None
            if int(doc["step"]) != step:
                return f"its {SIDECAR} names step {doc['step']}", None
            views = {int(p): str(v["fingerprint"]) for p, v in doc["views"].items()}
            items = {int(p): str(v["item"]) for p, v in doc["views"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"{SIDECAR} is damaged ({exc})", None
        return "", LocalStep(step, name, views, items)

    # -- writing -------------------------------------------------------------------------

    def write(
        self, step: int, views: Mapping[int, tuple[str, PreparedSave]], *, fingerprint: str,
        format: str | None = None, format_options: Mapping[str, Any] | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        """Commit ``step`` holding ``views`` (process -> (item name, prepared view)) atomically."""
        final = self.root.child(self.step_name(step))
        transaction = saving.Transaction(self.strategy, LOCAL.operation("save"), LOCAL, before_commit=before_commit)
        staging = transaction.begin(final)
        with saving.aborted_on_failure(transaction, staging, f"local step {step} of process {self.process}"):
            described: dict[str, dict[str, Any]] = {}
            for _, (name, prepared) in sorted(views.items()):
                doc = write_view(prepared, staging.child(name), url=final.child(name).url, process=self.process,
                                 format=format, format_options=format_options)
                described[name] = {"kind": "pytree", "array_formats": sorted(doc["array_formats"]),
                                   "total_bytes": doc["total_bytes"]}
            sidecar = {p: {"item": name, "fingerprint": fingerprint} for p, (name, _) in views.items()}
            self._finish(staging, step, described, sidecar)
            transaction.commit(staging, final, replace=True)

    def _finish(self, staging: Any, step: int, described: dict[str, Any], views: Mapping[int, Any]) -> None:
        doc = {
            "format": SIDECAR_FORMAT, "version": 1, "run_id": self.run_id, "processes": self.processes,
            "holder": self.process, "step": step, "views": {str(p): v for p, v in sorted(views.items())},
        }
        staging.fs.makedirs(staging.path, exist_ok=True)
        staging.fs.pipe_file(f"{staging.path.rstrip('/')}/{SIDECAR}", json.dumps(doc, indent=1).encode())
        step_doc = encode_step_doc(step=step, commit_time=time.time(), composite=True, items=described, metrics=None)
        staging.fs.pipe_file(f"{staging.path.rstrip('/')}/{STEP_FILE}", step_doc)

    def delete(self, step: int, name: str | None = None) -> None:
        location = self.root.child(name or self.step_name(step))
        try:
            if location.fs.exists(location.path):
                location.fs.rm(location.path, recursive=True)
        except OSError as exc:
            log.warning("local tier of process %d: could not delete step %d: %s", self.process, step, exc)

    # -- handing a view over -------------------------------------------------------------

    def view_files(self, entry: LocalStep, process: int) -> list[tuple[str, bytes]]:
        """The files (path inside the item, bytes) of the view of ``process`` in ``entry`` (see :meth:`adopt`)."""
        item = self.root.child(entry.name).child(check_item(entry, process))
        fs, base = item.fs, item.path.rstrip("/")
        try:
            paths = sorted(p for p in fs.find(base) if not fs.isdir(p))
            return [(p[len(base) + 1 :], fs.cat_file(p)) for p in paths]
        except OSError as exc:
            raise StorageError(f"process {self.process} could not read its replica of process {process} at {item.url}: "
                               f"{exc}") from exc

    def adopt(self, step: int, files: Mapping[str, Any], fingerprint: str, source: int) -> None:
        """Commit ``step`` here from the files of this process's view that process ``source`` kept and sent."""
        final = self.root.child(self.step_name(step))
        transaction = saving.Transaction(self.strategy, LOCAL.operation("save"), LOCAL)
        staging = transaction.begin(final)
        with saving.aborted_on_failure(transaction, staging, f"local step {step} of process {self.process}"):
            item = staging.child(OWN_ITEM)
            total = 0
            for name, data in files.items():
                if not name or name.startswith("/") or ".." in name.split("/"):
                    raise CorruptCheckpointError(f"the replica sent by process {source} names a file outside it: {name}")
                path = f"{item.path.rstrip('/')}/{name}"
                item.fs.makedirs(path.rpartition("/")[0], exist_ok=True)
                data = memoryview(data)
                item.fs.pipe_file(path, data)
                total += data.nbytes
            self._finish(staging, step, {OWN_ITEM: {"kind": "pytree"}},
                         {self.process: {"item": OWN_ITEM, "fingerprint": fingerprint}})
            transaction.commit(staging, final, replace=True)
        log.info("process %d: step %d restored into its local tier from the replica held by process %d (%d bytes)",
                 self.process, step, source, total)


def write_view(
    prepared: PreparedSave, staging: Any, *, url: str, process: int, format: str | None,
    format_options: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Write a view (whose arrays hold only some regions) and its index; commit nothing.

    The save walk's own ``write_contents`` insists that every element of every array is
    written; a view holds one process's regions only, so its records list exactly the
    regions written (``shard_checksums``) and a restore reads only those (a target on the
    saved mesh asks for nothing else; :func:`ckptcore.emergency.views.target_fingerprint`
    checks that before any read).
    """
    format_name = format or (registry().default_array_format() if prepared.writes else "")
    fmt = registry().array_format(format_name) if prepared.writes else None
    mine = [(i, w) for i, w in enumerate(prepared.writes) if w.request.shards]
    reports = (
        saving.write_own_shards(mine, fmt, staging.child(format_name), process, dict(format_options or {}))
        if mine and fmt is not None else []
    )
    for report in reports:
        w = prepared.writes[report["w"]]
        shape = list(w.request.shape)
        entries = sorted(({"index": index, "checksum": checksum}
                          for index, checksum in zip(report["shards"], report["checksums"], strict=True)),
                         key=lambda e: e["index"])
        record: dict[str, Any] = {"format": format_name, "key": w.request.key, "format_info": report["info"]}
        if len(entries) == 1 and entries[0]["index"] == [[0, n] for n in shape]:
            record["checksum"] = entries[0]["checksum"]
        else:
            record["shard_checksums"] = entries
        w.record.update(record)
    return saving.write_index(prepared, staging, url=url, format_name=format_name, fmt=fmt, metadata={})


def check_item(entry: LocalStep, process: int) -> str:
    try:
        return entry.items[process]
    except KeyError:
        raise CheckpointError(f"local step {entry.step} holds no view of process {process}") from None
