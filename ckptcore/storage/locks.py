"""Lease files: the writer lock of a checkpoint directory and the reader leases on steps.

A lease is a small JSON file (owner, host, pid, expiry time) written through fsspec, so
it works the same on local disk and on object stores. Its holder rewrites it every third
of its lifetime from a daemon thread; a process that crashes stops refreshing, and its
lease is ignored once expired. Expiry compares wall clocks: hosts sharing a directory
need clocks within a few seconds of each other (NTP does that).

* Writer lock: ``<root>/.ckptcore-writer.json``. A second writing manager gets
  :class:`~ckptcore.errors.ConcurrentWriterError` while the first one's lease is live.
  Created with exclusive-create (``open(mode="xb")``) where the filesystem supports it.
* Reader leases: ``<root>/.ckptcore-readers/<step>.<uuid>.json``. Retention does not
  delete a step while a live lease on it exists; it deletes it at a later save.
* Deletion marks: ``<root>/.ckptcore-deleting/<step>.json``, written by retention before
  it looks for reader leases, and kept (refreshed) until the step is deleted.

Leases and deletion marks are a handshake, so that a reader is never handed a step that
retention deletes under it: the reader writes its lease, *then* looks for a mark
(:func:`acquire_reader_lease` with ``check_deleting``); retention writes its mark, *then*
lists the leases (:func:`mark_for_deletion`). Whichever writes second sees the other's
file. A reader that sees a mark waits until it goes: retention either saw the lease (and
keeps the step) or had listed the leases before it was written (and deletes the step);
then the reader checks that the step still exists. This needs storage where a write is
visible to the next read or listing (local disks; GCS and S3 are strongly consistent).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Annotated, Literal

import msgspec

from ckptcore.errors import ConcurrentWriterError, StorageError
from ckptcore.plugins.registrations import Location

log = logging.getLogger("ckptcore.storage.locks")

WRITER_FILE = ".ckptcore-writer.json"
READERS_DIR = ".ckptcore-readers"
DELETING_DIR = ".ckptcore-deleting"


class LeaseFile(msgspec.Struct, kw_only=True):
    """A writer lock, a reader lease or a deletion mark. Every field may be missing when
    read: a lease without a valid `expires` is expired."""

    kind: Annotated[
        Literal["writer", "reader", "deleting"] | None,
        msgspec.Meta(description="`writer`, `reader`, or `deleting` (a deletion mark)"),
    ] = None
    step: Annotated[
        int | msgspec.UnsetType, msgspec.Meta(description="reader leases: the step they protect from retention")
    ] = msgspec.UNSET
    owner: Annotated[str, msgspec.Meta(description="a random id of the lease holder")] = ""
    host: Annotated[str, msgspec.Meta(description="the holder's host name")] = ""
    pid: Annotated[int | None, msgspec.Meta(description="the holder's process id")] = None
    expires: Annotated[
        float | None, msgspec.Meta(description="when it expires unless refreshed (seconds since the epoch)")
    ] = None
    ttl: Annotated[float | None, msgspec.Meta(description="its lifetime in seconds (refreshed every third)")] = None


_DECODER = msgspec.json.Decoder(LeaseFile)
# A lease file that is not (yet) a valid lease: expired, owned by nobody.
_UNREADABLE = LeaseFile()


def _read_lease(location: Location, path: str) -> LeaseFile | None:
    """The lease at ``path``; None when absent; ``_UNREADABLE`` when it is not (yet) a valid lease."""
    try:
        raw = location.fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        return _DECODER.decode(raw)
    except msgspec.DecodeError:  # also ValidationError (JSON, but not a lease)
        return _UNREADABLE  # being created right now (exclusive create, then write), or damaged


def _atomic_write(location: Location, path: str, data: bytes) -> None:
    # A rename on local disk, a single PUT on object stores: a reader never sees half a lease.
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    location.fs.pipe_file(tmp, data)
    location.fs.mv(tmp, path)


def _is_live(doc: LeaseFile | None, now: float) -> bool:
    return doc is not None and doc.expires is not None and doc.expires > now


def _pid_is_dead(doc: LeaseFile) -> bool:
    """The holder ran on this host and its process is gone (so its lease can be taken now)."""
    if doc.host != socket.gethostname() or doc.pid is None or doc.pid == os.getpid():
        return False
    try:
        os.kill(doc.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class Lease:
    """One lease file, refreshed in the background until released."""

    def __init__(
        self,
        location: Location,
        path: str,
        ttl: float,
        kind: Literal["writer", "reader", "deleting"],
        step: int | None = None,
    ) -> None:
        self.location = location
        self.path = path
        self.ttl = ttl
        self.owner = uuid.uuid4().hex
        self.kind = kind
        self.step = step
        self.lost: str | None = None  # why the lease was lost, if it was
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._released = False

    def _doc(self) -> bytes:
        doc = LeaseFile(
            kind=self.kind, step=msgspec.UNSET if self.step is None else self.step, owner=self.owner,
            host=socket.gethostname(), pid=os.getpid(), expires=time.time() + self.ttl, ttl=self.ttl,
        )
        return json.dumps(msgspec.to_builtins(doc)).encode()  # json.dumps: the bytes ckptcore 0.1.0 wrote

    def write(self, exclusive: bool = False) -> None:
        fs = self.location.fs
        if exclusive:
            try:
                with fs.open(self.path, "xb") as f:
                    f.write(self._doc())
                return
            except (ValueError, NotImplementedError, TypeError):
                pass  # no exclusive create on this filesystem: plain write, checked by reading back
        _atomic_write(self.location, self.path, self._doc())

    def start_refreshing(self) -> None:
        self._thread = threading.Thread(target=self._refresh_loop, name="ckptcore-lease", daemon=True)
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.refresh()
            except Exception as exc:  # storage hiccup: try again next period; expiry decides
                log.warning("could not refresh lease %s: %s", self.path, exc)

    def refresh(self) -> None:
        current = _read_lease(self.location, self.path)
        if current is not None and current is not _UNREADABLE and current.owner != self.owner:
            self.lost = f"taken over by host {current.host or '?'} pid {'?' if current.pid is None else current.pid}"
            self._stop.set()
            return
        _atomic_write(self.location, self.path, self._doc())

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        if self.lost is not None:
            return
        try:
            current = _read_lease(self.location, self.path)
            if current is not None and current.owner == self.owner:
                self.location.fs.rm_file(self.path)
        except FileNotFoundError:
            pass
        except Exception as exc:  # storage unreachable: the lease expires by itself
            if not sys.is_finalizing():  # at interpreter exit imports fail; expiry handles it silently
                log.warning("could not remove lease %s (it expires by itself): %s", self.path, exc)


def acquire_writer_lock(root: Location, ttl: float) -> Lease:
    """Take the writer lock of ``root`` or raise :class:`ConcurrentWriterError`."""
    path = f"{root.path.rstrip('/')}/{WRITER_FILE}"
    lease = Lease(root, path, ttl, "writer")
    fs = root.fs
    fs.invalidate_cache(root.path)
    current = _read_lease(root, path)
    for _ in range(10):  # another writer may be between its exclusive create and its write
        if current is not _UNREADABLE:
            break
        time.sleep(0.1)
        current = _read_lease(root, path)
    if current is _UNREADABLE:
        raise ConcurrentWriterError(
            f"the writer lock {root.url}/{WRITER_FILE} is unreadable; if no other manager writes {root.url}, "
            "delete that file and retry"
        )
    if current is not None:
        if _is_live(current, time.time()) and not _pid_is_dead(current):
            raise _held(root, current)
        try:  # expired, or its process is gone
            fs.rm_file(path)
        except FileNotFoundError:
            pass
    try:
        lease.write(exclusive=True)
    except FileExistsError as exc:
        raise _held(root, _read_lease(root, path) or _UNREADABLE) from exc
    except OSError as exc:
        raise StorageError(f"could not create the writer lock {root.url}/{WRITER_FILE}: {exc}") from exc
    # Without exclusive create two writers may both write: the file keeps one owner, and
    # the other one learns it here.
    written = _read_lease(root, path)
    if written is None or written.owner != lease.owner:
        raise _held(root, written or _UNREADABLE)
    lease.start_refreshing()
    return lease


def _held(root: Location, holder: LeaseFile) -> ConcurrentWriterError:
    left = holder.expires - time.time() if holder.expires is not None else 0
    return ConcurrentWriterError(
        f"{root.url} is being written by another CheckpointManager (host {holder.host or '?'}, "
        f"pid {'?' if holder.pid is None else holder.pid}; its lease {root.url}/{WRITER_FILE} expires in "
        f"{max(0.0, left):.0f} s "
        "unless refreshed). Two writers would delete each other's steps. Open this manager with "
        "read_only=True to read, close the other one, or wait for its lease to expire if it crashed."
    )


def readers_dir(root: Location) -> str:
    return f"{root.path.rstrip('/')}/{READERS_DIR}"


def acquire_reader_lease(root: Location, step: int, ttl: float, *, check_deleting: bool = False) -> Lease:
    """Protect ``step`` from retention while it is read; release it when done.

    With ``check_deleting`` (the handshake with retention, see the module): when the step
    is marked for deletion, wait until the mark goes (retention saw this lease and keeps
    the step, or deleted it) for at most ``ttl`` seconds, else raise
    :class:`StepDeletingError` holding nothing. Then the step, *if it still exists*, stays
    until the lease is released: the caller checks that it exists after this returns.
    """
    directory = readers_dir(root)
    lease = Lease(root, "", ttl, "reader", step)
    lease.path = f"{directory}/{step}.{lease.owner}.json"
    root.fs.makedirs(directory, exist_ok=True)
    lease.write()
    lease.start_refreshing()
    if check_deleting:
        deadline, pause = time.monotonic() + ttl, 0.01
        while is_marked_for_deletion(root, step):
            if time.monotonic() >= deadline:
                lease.release()
                raise StepDeletingError(
                    f"step {step} of {root.url} has been marked for deletion by retention for over {ttl:.0f} s"
                )
            time.sleep(pause)
            pause = min(2 * pause, 0.5)  # retention decides in milliseconds; a deletion may take longer
    return lease


class StepDeletingError(StorageError):
    """The step a reader lease was asked for is being deleted (its deletion mark is live)."""


def _mark_path(root: Location, step: int) -> str:
    return f"{root.path.rstrip('/')}/{DELETING_DIR}/{step}.json"


def is_marked_for_deletion(root: Location, step: int) -> bool:
    """Whether retention marked ``step`` for deletion (a live mark: a crashed writer's expires)."""
    return _is_live(_read_lease(root, _mark_path(root, step)), time.time())


class DeletionMarks:
    """The deletion marks of one retention pass; ``protected`` are the steps readers hold (not marked)."""

    def __init__(self, marks: dict[int, Lease], protected: set[int]) -> None:
        self.marks = marks
        self.protected = protected

    def release(self) -> None:
        """Remove the marks (once the steps are deleted, or when they are kept after all)."""
        for lease in self.marks.values():
            lease.release()
        self.marks = {}


def mark_for_deletion(root: Location, steps: list[int], ttl: float) -> DeletionMarks:
    """Mark ``steps`` for deletion, *then* list the reader leases; unmark the steps readers hold.

    Delete only the marked steps that are not ``protected``, then :meth:`DeletionMarks.release`.
    A reader that leases a step after this sees its mark and skips it.
    """
    marks: dict[int, Lease] = {}
    if steps:
        root.fs.makedirs(f"{root.path.rstrip('/')}/{DELETING_DIR}", exist_ok=True)
    try:
        for step in steps:
            mark = Lease(root, _mark_path(root, step), ttl, "deleting", step)
            mark.write()
            marks[step] = mark
        protected = leased_steps(root, clean_expired=True)
    except BaseException:
        DeletionMarks(marks, set()).release()
        raise
    for step in sorted(protected & set(marks)):
        marks.pop(step).release()
    for mark in marks.values():
        mark.start_refreshing()  # deleting many steps may take longer than a mark's lifetime
    return DeletionMarks(marks, protected)


def leased_steps(root: Location, *, clean_expired: bool = False) -> set[int]:
    """The steps that live reader leases protect; optionally remove expired leases."""
    directory = readers_dir(root)
    fs = root.fs
    fs.invalidate_cache(directory)
    try:
        names = [str(p).rstrip("/").rpartition("/")[2] for p in fs.ls(directory, detail=False)]
    except FileNotFoundError:
        return set()
    now = time.time()
    steps = set()
    for name in names:
        head = name.split(".", 1)[0]
        if not head.isdigit() or not name.endswith(".json"):
            continue
        path = f"{directory}/{name}"
        doc = _read_lease(root, path)
        if _is_live(doc, now):
            steps.add(int(head))
        elif clean_expired and doc is not None:
            try:
                fs.rm_file(path)
            except OSError:
                pass
    return steps
