"""Bulk I/O of byte ranges: parallel ``pwritev``/``preadv`` on local disk, ranged requests on object stores.

Both directions work on *parts*: ``(file offset, buffer)`` pairs of one file. Parts are
grouped into jobs of neighbouring ranges (one ``pwritev``/``preadv`` with many buffers,
or one ranged GET), large buffers are cut so that several threads share one large array,
and the jobs run on a thread pool (the GIL is released during the system calls).
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from ckptcore.errors import CorruptCheckpointError
from ckptcore.plugins.buffers import ALIGN, aligned_empty

IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)
LOCAL_JOB_BYTES = 64 << 20  # one system call's worth: long sequential runs, and still 16 jobs per GiB for the threads
LOCAL_MERGE_GAP = 4 << 10  # reading a page we do not need is cheaper than another system call
REMOTE_JOB_BYTES = 32 << 20  # one ranged GET at most: large leaves download in parallel pieces (through fsspec, smaller ones were slower on both emulators)
REMOTE_WRITE_THREADS = 16  # objects uploaded at once (network-bound, not CPU-bound)
REMOTE_MERGE_GAP = 1 << 20  # neighbouring ranges closer than this become one request
REMOTE_BATCH_BYTES = 256 << 20  # downloaded bytes held at once before they are copied into place
def byte_view(array: np.ndarray) -> memoryview:
    """A flat uint8 memoryview of a C-contiguous array (any dtype, ml_dtypes included)."""
    return memoryview(array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy stubs: ndarray is a buffer


@dataclass
class ReadSegment:
    offset: int
    length: int
    dest: memoryview  # written with exactly ``length`` bytes


@dataclass
class ReadBlock:
    """A range read into a buffer allocated only when it is read, then handed to ``consume`` (row blocks)."""

    offset: int
    length: int
    consume: Callable[[np.ndarray], None]


@dataclass
class _Job:
    offset: int
    buffers: list[memoryview] = field(default_factory=list)
    nbytes: int = 0


def _cut(offset: int, buf: memoryview, limit: int) -> list[tuple[int, memoryview]]:
    if len(buf) <= limit:
        return [(offset, buf)]
    return [(offset + i, buf[i : i + limit]) for i in range(0, len(buf), limit)]


def _jobs(parts: Sequence[tuple[int, memoryview]], job_bytes: int, gap: int, scratch: memoryview | None) -> list[_Job]:
    """Group parts (sorted by offset, not overlapping) into jobs of contiguous file ranges.

    A hole of at most ``gap`` bytes between two parts is filled with ``scratch`` (reads only).
    """
    jobs: list[_Job] = []
    end = -1
    for offset, buf in parts:
        for off, piece in _cut(offset, buf, job_bytes):
            job = jobs[-1] if jobs else None
            hole = off - end
            fits = job is not None and job.nbytes + hole + len(piece) <= job_bytes and len(job.buffers) + 2 <= IOV_MAX
            if fits and (hole == 0 or (scratch is not None and 0 < hole <= gap)):
                assert job is not None
                if hole:
                    job.buffers.append(scratch[:hole])  # type: ignore[index]
                    job.nbytes += hole
            else:
                job = _Job(off)
                jobs.append(job)
            job.buffers.append(piece)
            job.nbytes += len(piece)
            end = off + len(piece)
    return jobs


def _run(pool_size: int, tasks: list[Callable[[], None]]) -> None:
    if len(tasks) <= 1 or pool_size <= 1:
        for task in tasks:
            task()
        return
    with ThreadPoolExecutor(max_workers=min(pool_size, len(tasks)), thread_name_prefix="ckptcore-safetensors") as pool:
        for future in [pool.submit(t) for t in tasks]:
            future.result()


# -- local disk ------------------------------------------------------------------------


def _past(buffers: list[memoryview], n: int) -> list[memoryview]:
    """What is left of ``buffers`` once a vectored call moved ``n`` bytes."""
    while buffers and n >= len(buffers[0]):
        n -= len(buffers[0])
        buffers = buffers[1:]
    if buffers and n:
        buffers = [buffers[0][n:], *buffers[1:]]
    return buffers


def _pwritev_all(fd: int, buffers: list[memoryview], offset: int) -> None:
    while buffers:
        n = os.pwritev(fd, buffers, offset)
        offset += n
        buffers = _past(buffers, n)


def _preadv_all(fd: int, buffers: list[memoryview], offset: int, path: str) -> None:
    while buffers:
        n = os.preadv(fd, buffers, offset)
        if n == 0:
            raise CorruptCheckpointError(f"{path}: the file ends at byte {offset}, before the data its header describes")
        offset += n
        buffers = _past(buffers, n)


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's ``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)``, or None where unavailable."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        fn.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None

    def start_writeback(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE: start writing back, do not wait; errors surface at fsync

    return start_writeback


_START_WRITEBACK = _sync_file_range()


def _write_job(fd: int, job: _Job, early_writeback: bool) -> None:
    _pwritev_all(fd, job.buffers, job.offset)
    if early_writeback and _START_WRITEBACK is not None:
        # The disk starts on this range while the next ones are copied into the page cache,
        # instead of all of it at the final fsync (and dirty pages never pile up to the
        # kernel's throttling limit). The one fsync per file still makes it durable.
        _START_WRITEBACK(fd, job.offset, job.nbytes)


# -- direct I/O ---------------------------------------------------------------------------
#
# With O_DIRECT the data goes from a small aligned bounce buffer straight to the disk: no
# page cache is filled. That is steadier, not only lighter: filling the page cache means
# the kernel finds a free page per 4 KiB written, and on a virtual machine whose host takes
# freed memory back (virtio-balloon free page reporting), a page not touched for a few
# seconds costs a fault into the host first (about 2.6 s per GiB on the CI machine, against
# 0.07 s for a recently used one). O_DIRECT needs offsets, lengths and buffer addresses
# aligned to the device's block size: the file is written in aligned stripes copied into
# page-aligned buffers (a copy runs at memory speed, with the GIL released), the last stripe
# padded, and the file cut to its size before the one fsync.

DIRECT_ALIGN = 4096  # a multiple of every common logical block size
DIRECT_STRIPE_BYTES = 8 << 20  # one pwrite: large enough for the disk, small enough to keep a few per thread
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_bounce_lock = threading.Lock()
_bounce_free: list[np.ndarray] = []  # kept between saves: a recently used buffer costs no page faults


def _bounce_buffer() -> np.ndarray:
    with _bounce_lock:
        while _bounce_free:
            buffer = _bounce_free.pop()
            if len(buffer) >= DIRECT_STRIPE_BYTES:  # (a buffer of a smaller stripe size is dropped)
                return buffer
    raw = mmap.mmap(-1, DIRECT_STRIPE_BYTES)  # anonymous maps are page-aligned
    return np.frombuffer(raw, np.uint8)


def _release_bounce(buffer: np.ndarray) -> None:
    with _bounce_lock:
        _bounce_free.append(buffer)


def _open_direct(path: str) -> int | None:
    """``path`` opened for O_DIRECT writing, or None where the platform or file system refuses it (tmpfs...)."""
    if not _O_DIRECT:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | _O_DIRECT, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise


def _stripes(size: int, parts: Sequence[tuple[int, memoryview]]) -> list[tuple[int, int, list[tuple[int, memoryview]]]]:
    """``(start, stop, pieces)`` per stripe of the file: the parts' bytes that fall in ``[start, stop)``."""
    out: list[tuple[int, int, list[tuple[int, memoryview]]]] = []
    i = 0
    for start in range(0, size, DIRECT_STRIPE_BYTES):
        stop = min(size, start + DIRECT_STRIPE_BYTES)
        pieces: list[tuple[int, memoryview]] = []
        while i < len(parts) and parts[i][0] + len(parts[i][1]) <= start:
            i += 1
        j = i
        while j < len(parts) and parts[j][0] < stop:
            offset, buf = parts[j]
            a, b = max(offset, start), min(offset + len(buf), stop)
            if a < b:
                pieces.append((a - start, buf[a - offset : b - offset]))
            j += 1
        out.append((start, stop, pieces))
    return out


def _write_stripe(fd: int, start: int, stop: int, pieces: list[tuple[int, memoryview]]) -> None:
    buffer = _bounce_buffer()
    try:
        length = -(-(stop - start) // DIRECT_ALIGN) * DIRECT_ALIGN  # the last stripe is padded; truncated later
        covered = sum(len(piece) for _, piece in pieces)
        if covered < length:  # a gap (or the padding) reads as zeros, as in a sparse file
            buffer[:length] = 0
        for at, piece in pieces:
            np.copyto(buffer[at : at + len(piece)], np.frombuffer(piece, np.uint8))
        view = memoryview(buffer)[:length]  # type: ignore[arg-type]  # numpy stubs: ndarray is a buffer
        done = 0
        while done < length:
            done += os.pwrite(fd, view[done:], start + done)
    finally:
        _release_bounce(buffer)


def write_local_files(
    directory: str, files: Sequence[tuple[str, int, list[tuple[int, memoryview]]]], threads: int,
    early_writeback: bool = True, direct: bool = True,
) -> None:
    """Write ``files`` ((name, size, parts sorted by offset)) in parallel, then fsync each once.

    ``direct``: with O_DIRECT where the file system takes it (see above), else through the
    page cache (``early_writeback``: each range handed to the disk once it is written).
    """
    os.makedirs(directory, exist_ok=True)
    fds: list[tuple[int, int, bool]] = []  # fd, size, written directly
    try:
        tasks: list[Callable[[], None]] = []
        for name, size, parts in files:
            path = os.path.join(directory, name)
            fd = _open_direct(path) if direct else None
            if fd is not None:
                fds.append((fd, size, True))
                for start, stop, pieces in _stripes(size, parts):
                    tasks.append(partial(_write_stripe, fd, start, stop, pieces))
                continue
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            fds.append((fd, size, False))
            os.ftruncate(fd, size)  # concurrent writers never race on the file's size
            for job in _jobs(parts, LOCAL_JOB_BYTES, 0, None):
                tasks.append(partial(_write_job, fd, job, early_writeback))
        _run(threads, tasks)
        for fd, size, was_direct in fds:
            if was_direct:
                os.ftruncate(fd, size)  # drop the last stripe's padding
        _run(threads, [partial(os.fsync, fd) for fd, _, _ in fds])
    finally:
        for fd, _, _ in fds:
            os.close(fd)


# -- mapped reads -------------------------------------------------------------------------
#
# A tensor is restored as a copy-on-write view of the file's pages (``MAP_PRIVATE``): the
# kernel reads the file into the page cache and maps those pages into the result, so there
# is no copy and no fresh memory. A copy into new arrays pays the first touch of that memory
# (zeroing it, and on a virtual machine whose host takes freed memory back a fault into the
# host: 0.4-1.4 s per GiB, ``benchmarks/first_touch.py``) on top of the page cache, which
# holds the data as well. The view is writable (writes go to private pages, never to the
# file) and stays valid when the file is deleted; ckptcore never rewrites a committed file.
# The pages are faulted in up front by ``madvise(MADV_POPULATE_READ)`` on the thread pool,
# so a read error is an exception there and the restore never waits on a page fault later.
# ``CKPTCORE_SAFETENSORS_MAP=0`` turns mapping off: every tensor is then read with
# ``preadv`` into memory of its own.

MAP_ENV = "CKPTCORE_SAFETENSORS_MAP"
PAGE = mmap.PAGESIZE
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python names it from 3.13 on


def _can_populate() -> bool:
    """Whether this kernel takes ``MADV_POPULATE_READ`` (Linux 5.14 and later)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap.mmap, "madvise"):
        return False
    probe = mmap.mmap(-1, PAGE)
    try:
        probe.madvise(_MADV_POPULATE_READ, 0, PAGE)
        return True
    except OSError:
        return False
    finally:
        probe.close()


CAN_POPULATE = _can_populate()  # this kernel fills mappings up front, so tensors may be mapped


def mapping_enabled() -> bool:
    return CAN_POPULATE and os.environ.get(MAP_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _populate(mapping: mmap.mmap, fd: int, start: int, stop: int, path: str) -> None:
    first = start - start % PAGE
    if hasattr(os, "posix_fadvise"):  # the whole range asked of the disk at once, then waited for page by page
        os.posix_fadvise(fd, first, stop - first, os.POSIX_FADV_WILLNEED)
    try:
        mapping.madvise(_MADV_POPULATE_READ, first, stop - first)
    except OSError as exc:
        raise CorruptCheckpointError(
            f"{path}: reading bytes {start}-{stop} failed ({exc}); the file is damaged or was cut short"
        ) from exc


class LocalReader:
    """Reads the header and the data of local files: large tensors mapped, the rest with ``pread``/``preadv``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.fds: dict[str, int] = {}
        self.maps: dict[str, tuple[mmap.mmap, np.ndarray] | None] = {}  # per file: its copy-on-write mapping
        self.populate: dict[str, list[tuple[int, int]]] = {}  # per file: the mapped byte ranges
        self.mapping = mapping_enabled()

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def open(self, name: str) -> tuple[int, bytes]:
        """The file's size and its first bytes (the header length)."""
        fd = self.fds.get(name)
        if fd is None:
            try:
                fd = os.open(self.path(name), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError as exc:
                raise CorruptCheckpointError(f"{self.path(name)}: safetensors file missing from the checkpoint") from exc
            self.fds[name] = fd
        return os.fstat(fd).st_size, os.pread(fd, 8, 0)

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        return os.pread(self.fds[name], stop - start, start)

    def mapped(self, name: str, start: int, length: int, alignment: int = ALIGN) -> np.ndarray | None:
        """Bytes ``[start, start + length)`` of file ``name`` as a writable copy-on-write view of
        its pages (filled by :meth:`read`), when they start on an ``alignment`` boundary; else None."""
        if not self.mapping or start % alignment:
            return None
        if name not in self.maps:
            try:
                mapping = mmap.mmap(self.fds[name], 0, access=mmap.ACCESS_COPY)
                self.maps[name] = (mapping, np.frombuffer(mapping, np.uint8))
            except (OSError, ValueError):  # a file system that cannot map, an empty file
                self.maps[name] = None
        entry = self.maps[name]
        if entry is None or start + length > len(entry[1]):
            return None
        self.populate.setdefault(name, []).append((start, start + length))
        return entry[1][start : start + length]

    def read(self, segments: dict[str, list[ReadSegment]], blocks: dict[str, list[ReadBlock]], threads: int) -> None:
        scratch = memoryview(bytearray(LOCAL_MERGE_GAP))  # holes between merged ranges land here, unused
        tasks: list[Callable[[], None]] = []
        for name, segs in segments.items():
            fd, path = self.fds[name], self.path(name)
            segs.sort(key=lambda s: s.offset)
            for job in _jobs([(s.offset, s.dest) for s in segs], LOCAL_JOB_BYTES, LOCAL_MERGE_GAP, scratch):
                tasks.append(lambda fd=fd, job=job, path=path: _preadv_all(fd, job.buffers, job.offset, path))  # type: ignore[misc]  # a lambda with default arguments
        for name, ranges in self.populate.items():
            fd, path, mapped = self.fds[name], self.path(name), self.maps[name]
            assert mapped is not None  # ranges are only recorded for a mapped file
            mapping = mapped[0]
            for start, stop in ranges:
                for at in range(start, stop, LOCAL_JOB_BYTES):
                    tasks.append(partial(_populate, mapping, fd, at, min(stop, at + LOCAL_JOB_BYTES), path))
        self.populate.clear()
        # Block buffers are reused: memory touched for the first time costs more than the copy.
        spare: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        for name, bls in blocks.items():
            fd, path = self.fds[name], self.path(name)
            tasks.extend(lambda fd=fd, b=b, path=path: _read_block(fd, b, path, spare) for b in bls)  # type: ignore[misc]  # a lambda with default arguments
        # Row blocks are read, then copied: two threads at least, so one copies while one reads.
        _run(max(threads, 2) if blocks else threads, tasks)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.maps.clear()  # a mapping lives on while an array viewing it does


def _read_block(fd: int, block: ReadBlock, path: str, spare: queue.SimpleQueue[np.ndarray]) -> None:
    try:
        buf = spare.get_nowait()
    except queue.Empty:
        buf = aligned_empty((block.length,), np.dtype(np.uint8))
    if len(buf) < block.length:
        buf = aligned_empty((block.length,), np.dtype(np.uint8))
    view = buf[: block.length]
    _preadv_all(fd, [memoryview(view)], block.offset, path)  # type: ignore[arg-type]  # numpy stubs: ndarray is a buffer
    block.consume(view)
    spare.put(buf)


# -- object stores (fsspec) ------------------------------------------------------------


def write_remote_files(fs: Any, directory: str, files: Sequence[tuple[str, int, list[tuple[int, memoryview]]]], threads: int) -> None:
    """Upload each file as one object, streamed (the client sends it block by block); objects in parallel.

    Streaming holds one client block per object in memory, not the object. (Assembling each
    object and uploading it with ``pipe_file`` was measured too: no faster on fake-gcs-server,
    somewhat faster on moto, and it holds whole objects in memory.)
    """
    try:
        fs.makedirs(directory, exist_ok=True)
    except Exception:  # object stores have no directories; some clients refuse to make one
        pass

    def upload(name: str, parts: list[tuple[int, memoryview]]) -> None:
        with fs.open(f"{directory}/{name}", "wb") as f:
            for _, buf in parts:
                f.write(buf)

    _run(max(threads, REMOTE_WRITE_THREADS), [lambda n=name, p=parts: upload(n, p) for name, _, parts in files])  # type: ignore[misc]  # a lambda with default arguments


class RemoteReader:
    """Reads headers and data of objects with ranged requests (``cat_file`` / ``cat_ranges``)."""

    HEAD_BYTES = 1 << 20
    job_bytes = REMOTE_JOB_BYTES  # the largest ranged GET

    def __init__(self, fs: Any, directory: str) -> None:
        self.fs = fs
        self.directory = directory
        self.heads: dict[str, bytes] = {}

    def path(self, name: str) -> str:
        return f"{self.directory}/{name}"

    def open(self, name: str) -> tuple[int, bytes]:
        try:
            size = int(self.fs.info(self.path(name))["size"])
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(f"{self.path(name)}: safetensors file missing from the checkpoint") from exc
        head = self.fs.cat_file(self.path(name), start=0, end=min(size, self.HEAD_BYTES)) if size else b""
        self.heads[name] = head
        return size, head

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        head = self.heads.get(name, b"")
        if stop <= len(head):
            return head[start:stop]
        return self.fs.cat_file(self.path(name), start=start, end=stop)

    def read(self, segments: dict[str, list[ReadSegment]], blocks: dict[str, list[ReadBlock]], threads: int) -> None:
        batch: list[tuple[str, int, int, list[tuple[int, Any]]]] = []
        size = 0
        for r in self._ranges_of(segments, blocks):
            batch.append(r)
            size += r[2] - r[1]
            if size >= REMOTE_BATCH_BYTES:
                self._fetch(batch, threads)
                batch, size = [], 0
        if batch:
            self._fetch(batch, threads)

    def _ranges_of(self, segments: dict[str, list[ReadSegment]],
                   blocks: dict[str, list[ReadBlock]]) -> list[tuple[str, int, int, list[tuple[int, Any]]]]:
        """The ranged requests: ``(path, start, stop, [(offset within the range, segment or block)])``."""
        ranges: list[tuple[str, int, int, list[tuple[int, Any]]]] = []
        for name, bls in blocks.items():
            ranges.extend((self.path(name), b.offset, b.offset + b.length, [(0, b)]) for b in bls)
        for name, segs in segments.items():
            path = self.path(name)
            segs.sort(key=lambda s: s.offset)
            for seg in segs:
                for off, piece in _cut(seg.offset, seg.dest, self.job_bytes):
                    part = ReadSegment(off, len(piece), piece)
                    if ranges and ranges[-1][0] == path and 0 <= off - ranges[-1][2] <= REMOTE_MERGE_GAP and (
                        off + len(piece) - ranges[-1][1] <= self.job_bytes
                    ):
                        p, start, _, members = ranges[-1]
                        ranges[-1] = (p, start, off + len(piece), members)
                    else:
                        ranges.append((path, off, off + len(piece), []))
                    ranges[-1][3].append((off - ranges[-1][1], part))
        return ranges

    def _fetch(self, batch: list[tuple[str, int, int, list[tuple[int, Any]]]], threads: int) -> None:
        got = self.fs.cat_ranges([b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch], on_error="raise")
        self._deliver(batch, got, threads)

    def _deliver(self, batch: list[tuple[str, int, int, list[tuple[int, Any]]]], got: Sequence[Any], threads: int) -> None:
        """Copy each downloaded range of ``batch`` into its segments, and hand its row blocks over."""
        finishers: list[Callable[[], None]] = []
        for (path, start, stop, members), data in zip(batch, got, strict=True):
            if isinstance(data, BaseException):
                raise data
            if len(data) != stop - start:
                raise CorruptCheckpointError(
                    f"{path}: the object holds fewer bytes than its safetensors header describes "
                    f"(range {start}-{stop} returned {len(data)} bytes); it is truncated"
                )
            view = memoryview(data)
            for rel, seg in members:
                if isinstance(seg, ReadBlock):
                    finishers.append(
                        lambda seg=seg, data=data, rel=rel: seg.consume(np.frombuffer(data, np.uint8, seg.length, rel))  # type: ignore[misc]  # a lambda with default arguments
                    )
                else:
                    seg.dest[:] = view[rel : rel + seg.length]
        _run(threads, finishers)

    def close(self) -> None:
        self.heads.clear()
