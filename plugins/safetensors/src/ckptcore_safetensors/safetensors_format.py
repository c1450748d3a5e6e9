"""The ``safetensors`` array format: one safetensors file per writing process (split at ``max_file_bytes``).

Layout of a save (the core hands ``write`` the format's own directory, one per process):

* ``data.safetensors`` (or ``data-0000i-of-0000n.safetensors`` when split): a conformant
  safetensors file. A leaf held whole is the tensor named by its storage key; a leaf held
  as several shards is one tensor per shard, ``<key>@<start>_<stop>,<start>_<stop>...``.
* The JSON header is padded with spaces so that the data section starts on a 4 KiB
  boundary, and tensors whose size is a multiple of 4 KiB come first, so large arrays
  sit on page boundaries (the format allows no gaps between tensors).
* dtypes safetensors lacks (complex128, int4, float8_e4m3, float4/float6 of ml_dtypes...)
  are stored as raw bytes: dtype ``U8`` with a trailing dimension of the item size. The
  true dtype is in ckptcore's index; the leaf's info says ``"raw": true``.

Read: every header is parsed and validated first. On local disk a region that is a
whole stored tensor of at least 1 MiB is restored as a copy-on-write mapping of the file's
pages, filled in parallel (no copy, no fresh memory: see ``fileio``). Any other region is
read straight into its (64-byte aligned) result array with parallel ``preadv``
(neighbouring ranges merged into one call), or, for a region whose rows are short runs in
the file, row block by row block into a bounded buffer and copied. On object stores the
same ranges become coalesced ranged GETs.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeGuard

import numpy as np

from ckptcore.errors import CorruptCheckpointError, InvalidOptionError
from ckptcore.plugins.buffers import ALIGN, aligned_empty
from ckptcore_safetensors import fileio, header, tensorstore_io

OPTIONS = ("max_file_bytes", "threads", "align", "early_writeback", "direct_io")
DEFAULT_MAX_FILE_BYTES = 4 << 30
# An object is uploaded as one sequential stream; several smaller objects upload in parallel.
DEFAULT_REMOTE_MAX_FILE_BYTES = 64 << 20
# Measured on a 2-core VM with an ext4 disk (benchmarks/bench_safetensors.py): buffered writes
# to one file serialise on its inode lock, and concurrent reads of one file defeat the kernel's
# readahead on a cold cache. So few threads on small machines, more where cores can copy in parallel.
DEFAULT_THREADS = min(8, max(2, os.cpu_count() or 2))
DEFAULT_READ_THREADS = min(8, max(1, (os.cpu_count() or 2) // 2))
REMOTE_HEADER_THREADS = 16  # an object store answers each header request after a round trip: many in flight
DEFAULT_ALIGN = 4096
DIRECT_RUN_BYTES = 64 << 10  # contiguous runs at least this long are read straight into the result
# Otherwise rows are read in blocks of this size into a reused buffer and copied out while
# they are still in the CPU's caches: 2 MiB against 8 MiB made the (4, 2) -> (2, 4) restore
# of bench_safetensors.py 0.75 s against 0.85 s cold and 0.20 s against 0.24 s warm
# (medians of 9 alternating runs on a 2-core VM, 32 MiB L3). On object stores a block is
# one ranged GET, whose round trip costs more than the cache misses: larger blocks there.
ROW_BLOCK_BYTES = 2 << 20
REMOTE_ROW_BLOCK_BYTES = 8 << 20
ARENA_ITEM_BYTES = 64 << 10  # results up to this size share arenas of ARENA_BYTES
ARENA_BYTES = 4 << 20
MAP_MIN_BYTES = 1 << 20  # local tensors at least this large are mapped, not copied (fileio); smaller ones share arenas
FORMAT_METADATA = {"format": "pt", "writer": "ckptcore-safetensors"}  # "pt": what HF loaders expect

# A plain file name inside the directory: no separators, no "..", no control characters,
# not hidden (Hugging Face names like "model-00001-of-00002.safetensors", unicode too).
_FILE_NAME = re.compile(r"[^./\\\x00-\x1f\x7f][^/\\\x00-\x1f\x7f]{0,250}\.safetensors")


def is_safe_file_name(name: object) -> TypeGuard[str]:
    """Whether ``name`` (read from an index) is a safetensors file directly inside the directory."""
    return type(name) is str and _FILE_NAME.fullmatch(name) is not None and ".." not in name


def file_name(i: int, n: int) -> str:
    return "data.safetensors" if n == 1 else f"data-{i + 1:05d}-of-{n:05d}.safetensors"


def tensor_name(key: str) -> str:
    """The tensor name of a leaf held whole: its storage key, except the one name the header reserves."""
    # "~" followed by a letter other than "e" never starts an escaped storage key segment.
    return "~" + key if key == header.METADATA_KEY else key


def shard_tensor_name(key: str, index: Sequence[slice]) -> str:
    # '@' and ',' never occur in an escaped storage key, so these names never collide with one.
    return f"{key}@" + ",".join(f"{s.start}_{s.stop}" for s in index)


class SafetensorsFormat:
    """Writes and reads batches of leaves as safetensors files."""

    # -- write -----------------------------------------------------------------------

    def write(self, location: Any, requests: Sequence[Any], options: Mapping[str, Any]) -> list[dict[str, Any]]:
        local = _local_directory(location)
        if local is None and "max_file_bytes" not in options:
            options = {**options, "max_file_bytes": DEFAULT_REMOTE_MAX_FILE_BYTES}
        max_file_bytes, threads, align = _write_options(options)
        tensors: list[tuple[str, str, tuple[int, ...], memoryview]] = []  # name, st dtype, st shape, bytes
        infos: list[dict[str, Any]] = []
        owners: list[list[dict[str, Any]]] = []  # per tensor: the info dicts that name its file
        for r in requests:
            dtype = r.dtype
            if len(r.shards) == 1 and r.shards[0].data.shape == tuple(r.shape):
                # A leaf held whole (the common case, kept cheap for thousands of small leaves).
                st_dtype, st_shape, raw = header.stored_as(dtype, tuple(r.shape))
                name = tensor_name(r.key)
                tensors.append((name, st_dtype, st_shape, _contiguous_bytes(r.shards[0].data, dtype)))
                whole_info: dict[str, Any] = {"tensor": name, "raw": True} if raw else {"tensor": name}
                owners.append([whole_info])
                infos.append(whole_info)
                continue
            seen: set[tuple[tuple[int, int], ...]] = set()
            shards = []
            for shard in r.shards:
                index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(shard.index, r.shape, strict=True))
                spans = tuple((s.start, s.stop) for s in index)
                if spans not in seen:  # replicas of one region are stored once
                    seen.add(spans)
                    shards.append((index, shard.data))
            whole = len(shards) == 1 and all(s.start == 0 and s.stop == n for s, n in zip(shards[0][0], r.shape, strict=True))
            info: dict[str, Any] = {}
            if whole:
                st_dtype, st_shape, raw = header.stored_as(dtype, tuple(r.shape))
                tensors.append((tensor_name(r.key), st_dtype, st_shape, _contiguous_bytes(shards[0][1], dtype)))
                info["tensor"] = tensor_name(r.key)
                owners.append([info])
            else:
                raw = header.stored_as(dtype, ())[2]
                info["shards"] = []
                for index, data in shards:
                    extent = tuple(s.stop - s.start for s in index)
                    st_dtype, st_shape, _ = header.stored_as(dtype, extent)
                    name = shard_tensor_name(r.key, index)
                    entry = {"index": [[s.start, s.stop] for s in index], "tensor": name}
                    info["shards"].append(entry)
                    tensors.append((name, st_dtype, st_shape, _contiguous_bytes(data, dtype)))
                    owners.append([entry])
            if raw:
                info["raw"] = True
            infos.append(info)

        files = _assign_files(list(range(len(tensors))), [len(t[3]) for t in tensors], max_file_bytes, align)
        planned: list[tuple[str, int, list[tuple[int, memoryview]]]] = []
        for i, members in enumerate(files):
            name = file_name(i, len(files))
            head, offsets = header.encode(
                [(tensors[t][0], tensors[t][1], tensors[t][2], len(tensors[t][3])) for t in members], FORMAT_METADATA, align
            )
            parts = [(0, memoryview(head))]
            for t, off in zip(members, offsets, strict=True):
                if len(tensors[t][3]):
                    parts.append((len(head) + off, tensors[t][3]))
                for owner in owners[t]:
                    owner["file"] = name
            size = len(head) + sum(len(tensors[t][3]) for t in members)
            planned.append((name, size, parts))
        if local is not None:
            fileio.write_local_files(local, planned, threads, bool(options.get("early_writeback", True)),
                                     bool(options.get("direct_io", True)))
        else:
            kv = tensorstore_io.open_kvstore(location)
            if kv is not None:
                tensorstore_io.write_objects(kv, location.url, planned)
            else:
                fileio.write_remote_files(location.fs, location.path.rstrip("/"), planned, threads)
        return infos

    # -- read ------------------------------------------------------------------------

    def read(self, location: Any, requests: Sequence[Any], options: Mapping[str, Any]) -> list[list[np.ndarray]]:
        threads = int(options.get("threads", DEFAULT_READ_THREADS))
        local = _local_directory(location)
        if local is not None:
            reader: Any = fileio.LocalReader(local)
        else:
            reader = tensorstore_io.remote_reader(location)
        try:
            checked = [_checked_info(r, reader) for r in requests]
            names = sorted({f for info in checked for f, _, _ in info})
            headers = _read_headers(reader, names, threads if local is not None else max(threads, REMOTE_HEADER_THREADS))
            plan = (_ReadPlan(reader.mapped, ROW_BLOCK_BYTES) if local is not None
                    else _ReadPlan(None, REMOTE_ROW_BLOCK_BYTES))
            outs: list[list[np.ndarray]] = []
            for r, entries in zip(requests, checked, strict=True):
                outs.append(plan.request(r, entries, headers))
            plan.finish_planning()
            reader.read(plan.segments, plan.blocks, threads)
        finally:
            reader.close()
        results = []
        for r, arrays in zip(requests, outs, strict=True):
            dtype = np.dtype(r.dtype)
            results.append([a if a.dtype == dtype else a.astype(dtype) for a in arrays])
        return results


def _local_directory(location: Any) -> str | None:
    """The local directory of ``location``, or None when its bytes live in an object store (read through ``fs``).

    A core with format-neutral storage addresses says where the bytes live in
    ``location.address`` (a ``dirfs://``-like backend may keep them in local directories);
    an older one only has the URL's scheme.
    """
    address = getattr(location, "address", None)
    if address is not None and getattr(address, "scheme", None) is not None:
        if address.scheme != "file":
            return None
        return str(address.path).rstrip("/") or "/"
    return location.path if location.scheme == "file" else None


# -- write helpers ---------------------------------------------------------------------


def _write_options(options: Mapping[str, Any]) -> tuple[int, int, int]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InvalidOptionError(f"unknown format option(s) {unknown} for the safetensors format; known: {list(OPTIONS)}")
    try:
        max_file_bytes = int(options.get("max_file_bytes", DEFAULT_MAX_FILE_BYTES))
        threads = int(options.get("threads", DEFAULT_THREADS))
        align = int(options.get("align", DEFAULT_ALIGN))
    except (TypeError, ValueError) as exc:
        raise InvalidOptionError(f"safetensors format options must be integers: {exc}") from exc
    if max_file_bytes < 1 or threads < 1 or align < 8 or align & (align - 1):
        raise InvalidOptionError(
            "safetensors format options: max_file_bytes and threads must be >= 1, align a power of two >= 8; "
            f"got max_file_bytes={max_file_bytes}, threads={threads}, align={align}"
        )
    return max_file_bytes, threads, align


def _contiguous_bytes(data: np.ndarray, dtype: np.dtype) -> memoryview:
    if type(data) is not np.ndarray or data.dtype != dtype or not data.flags.c_contiguous:
        data = np.ascontiguousarray(np.asarray(data), dtype=dtype)
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    return memoryview(data.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy stubs: ndarray is a buffer


def _assign_files(tensors: list[int], sizes: list[int], max_file_bytes: int, align: int) -> list[list[int]]:
    """Tensors in order into files of at most ``max_file_bytes`` (a larger tensor gets a file of its own).

    Within a file, tensors whose size is a multiple of ``align`` come first (in order), so
    their offsets stay aligned: safetensors allows no padding between tensors.
    """
    files: list[list[int]] = [[]]
    size = 0
    for t in tensors:
        if files[-1] and size + sizes[t] > max_file_bytes:
            files.append([])
            size = 0
        files[-1].append(t)
        size += sizes[t]
    return [sorted(f, key=lambda t: sizes[t] % align != 0) for f in files]


# -- read helpers ----------------------------------------------------------------------


def _corrupt_info(r: Any, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"array {r.key!r}: its safetensors info in the index is invalid ({what}); the index is corrupt")


def _checked_info(r: Any, reader: Any) -> list[tuple[str, str, tuple[tuple[int, int], ...]]]:
    """(file, tensor, index) per stored piece of the leaf, after checking the info from the index."""
    info = r.info
    if not isinstance(info, Mapping):
        raise _corrupt_info(r, "not a map")
    if "shards" not in info:
        file, tensor = info.get("file"), info.get("tensor")
        if type(tensor) is str and is_safe_file_name(file):
            return [(file, tensor, ())]  # the index of a whole leaf is not needed
    shape = tuple(int(n) for n in r.shape)
    if "shards" in info:
        shards = info["shards"]
        if not isinstance(shards, list):
            raise _corrupt_info(r, "shards is not a list")
        entries = []
        for s in shards:
            if not isinstance(s, Mapping) or not isinstance(s.get("index"), list) or len(s["index"]) != len(shape):
                raise _corrupt_info(r, f"bad shard entry {s!r}")
            index = []
            for pair, n in zip(s["index"], shape, strict=True):
                if (not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(v, int) for v in pair)
                        or not 0 <= pair[0] <= pair[1] <= n):
                    raise _corrupt_info(r, f"bad shard index {s['index']!r} for shape {shape}")
                index.append((pair[0], pair[1]))
            entries.append((s.get("file"), s.get("tensor"), tuple(index)))
    else:
        entries = [(info.get("file"), info.get("tensor"), tuple((0, n) for n in shape))]
    checked: list[tuple[str, str, tuple[tuple[int, int], ...]]] = []
    for file, tensor, region in entries:
        if not is_safe_file_name(file):
            raise CorruptCheckpointError(
                f"array {r.key!r}: the index names safetensors file {file!r} in {reader.path('')}, "
                "which is not a plain file name inside the checkpoint; the index is corrupt"
            )
        if not isinstance(tensor, str):
            raise _corrupt_info(r, f"tensor name {tensor!r}")
        checked.append((file, tensor, region))
    return checked


def _read_headers(reader: Any, names: list[str], threads: int) -> dict[str, header.Header]:
    def one(name: str) -> header.Header:
        path = reader.path(name)
        size, prefix = reader.open(name)
        n = header.header_length(path, prefix, size)
        return header.parse(path, reader.read_range(name, 8, 8 + n), size)

    if len(names) <= 1:
        return {name: one(name) for name in names}
    with ThreadPoolExecutor(max_workers=min(threads, len(names)), thread_name_prefix="ckptcore-safetensors") as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


def _is_whole(region: Sequence[slice], shape: Sequence[int]) -> bool:
    if len(region) != len(shape):
        return False
    i = 0
    for s in region:
        if s.start or s.step not in (None, 1) or (s.stop is not None and s.stop != shape[i]):
            return False
        i += 1
    return True


def _strides(shape: Sequence[int]) -> list[int]:
    out = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        out[i] = out[i + 1] * shape[i + 1]
    return out


class _ReadPlan:
    """Turns (region, stored piece) intersections into file segments that land in the result arrays."""

    def __init__(self, mapped: Callable[[str, int, int, int], np.ndarray | None] | None = None,
                 row_block_bytes: int = ROW_BLOCK_BYTES) -> None:
        self.mapped = mapped  # (file, offset, length) -> a mapped view of those bytes, or None (fileio.LocalReader.mapped)
        self.row_block_bytes = row_block_bytes
        self.segments: dict[str, list[fileio.ReadSegment]] = {}
        self.blocks: dict[str, list[fileio.ReadBlock]] = {}
        self.arena: np.ndarray | None = None
        self.arena_view = memoryview(b"")
        self.arena_used = 0
        # (file, tensor start) -> (entry, stored shape, saved dtype, [(src box, out, dst box)])
        self.row_blocks: dict[tuple[str, int], tuple[header.TensorEntry, tuple[int, ...], np.dtype, list[Any]]] = {}

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, memoryview]:
        """A 64-byte aligned result array and its bytes; small ones are carved from shared arenas (one allocation, not thousands)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > ARENA_ITEM_BYTES:
            out = aligned_empty(shape, dtype)
            return out, fileio.byte_view(out)
        start = self.arena_used + (-self.arena_used % ALIGN)
        if self.arena is None or start + nbytes > len(self.arena):
            self.arena = aligned_empty((ARENA_BYTES,), np.dtype(np.uint8))
            self.arena_view = memoryview(self.arena)  # type: ignore[arg-type]  # numpy stubs: ndarray is a buffer
            start = 0
        self.arena_used = start + nbytes
        out = self.arena[start : start + nbytes].view(dtype).reshape(shape)
        return out, self.arena_view[start : start + nbytes]

    def map(self, r: Any, file: str, entry: header.TensorEntry, shape: tuple[int, ...]) -> np.ndarray | None:
        """The whole stored tensor ``entry`` as a mapped view of its file, or None (too small, unaligned, not local, mapping off).

        A result for JAX's CPU devices must be 64-byte aligned to be adopted as it is (else it
        is copied, and reading it into an aligned buffer is the cheaper copy); NumPy needs
        only its items aligned (Hugging Face files align tensors to 8 bytes).
        """
        dtype = r.saved_dtype
        nbytes = math.prod(shape) * dtype.itemsize
        if self.mapped is None or nbytes < MAP_MIN_BYTES:
            return None
        view = self.mapped(file, entry.start, nbytes, ALIGN if r.aligned else dtype.alignment)
        return None if view is None else view.view(dtype).reshape(shape)

    def request(self, r: Any, entries: list[tuple[str, str, tuple[tuple[int, int], ...]]], headers: dict[str, header.Header]) -> list[np.ndarray]:
        saved = r.saved_dtype
        raw = bool(r.info.get("raw"))
        shape = r.shape
        if len(entries) == 1 and len(r.regions) == 1 and _is_whole(r.regions[0], shape):
            # The common case, kept cheap for thousands of small leaves: one tensor, read whole.
            file, tensor, _ = entries[0]
            entry = headers[file].tensor(tensor, r.key)
            self._check(headers[file], tensor, entry, r, saved, tuple(shape), raw)
            view = self.map(r, file, entry, tuple(shape))
            if view is not None:
                return [view]
            out, dest = self.alloc(tuple(shape), saved)
            if len(dest):
                self.segments.setdefault(file, []).append(fileio.ReadSegment(entry.start, len(dest), dest))
            return [out]
        stored = []
        for file, tensor, index in entries:
            if len(index) != len(shape):  # a whole leaf (see _checked_info)
                index = tuple((0, int(n)) for n in shape)
            entry = headers[file].tensor(tensor, r.key)
            extent = tuple(b - a for a, b in index)
            self._check(headers[file], tensor, entry, r, saved, extent, raw)
            stored.append((file, entry, index, extent))
        outs = []
        for region in r.regions:
            box = []
            for s, n in zip(region, shape, strict=True):
                start, stop, step = s.indices(n)
                if step != 1 or (s.start is not None and s.start != start) or (s.stop is not None and s.stop != stop):
                    raise CorruptCheckpointError(f"array {r.key!r}: region {region} is not inside its shape {shape}")
                box.append((start, max(start, stop)))
            view = next((self.map(r, file, entry, extent) for file, entry, index, extent in stored
                         if list(index) == box), None)  # a region stored as a tensor of its own
            if view is not None:
                outs.append(view)
                continue
            out, _ = self.alloc(tuple(b - a for a, b in box), saved)
            covered = 0
            for file, entry, index, extent in stored:
                piece = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(box, index, strict=True)]
                if any(lo >= hi for lo, hi in piece) and shape:
                    continue
                src = [(lo - c, hi - c) for (lo, hi), (c, _) in zip(piece, index, strict=True)]
                dst = [(lo - a, hi - a) for (lo, hi), (a, _) in zip(piece, box, strict=True)]
                covered += math.prod(hi - lo for lo, hi in piece)
                self._piece(file, entry, extent, saved, src, out, dst)
            if covered != out.size:
                raise CorruptCheckpointError(
                    f"array {r.key!r}: the safetensors tensors recorded in the index cover {covered} of the "
                    f"{out.size} elements of region {box}; the index is corrupt"
                )
            outs.append(out)
        return outs

    @staticmethod
    def _check(head: header.Header, tensor: str, entry: header.TensorEntry, r: Any, saved: np.dtype,
               extent: tuple[int, ...], raw: bool) -> None:
        want_dtype, want_shape, want_raw = header.stored_as(saved, extent)
        if raw != want_raw or entry.dtype != want_dtype or entry.shape != want_shape:
            raise CorruptCheckpointError(
                f"{head.file}: tensor {tensor!r} is {entry.dtype} {list(entry.shape)}, but the index "
                f"says array {r.key!r} holds {saved.name} {list(extent)} there"
                f"{' (as raw bytes)' if raw else ''}; the file does not match the index"
            )

    def _add(self, file: str, offset: int, dest: memoryview) -> None:
        self.segments.setdefault(file, []).append(fileio.ReadSegment(offset, len(dest), dest))

    def _piece(self, file: str, entry: header.TensorEntry, shape: tuple[int, ...], dtype: np.dtype,
               src: list[tuple[int, int]], out: np.ndarray, dst: list[tuple[int, int]]) -> None:
        ext = [b - a for a, b in src]
        if math.prod(ext) == 0:
            return
        itemsize = dtype.itemsize
        flat = fileio.byte_view(out)
        n = len(shape)
        if n == 0:
            self._add(file, entry.start, flat[:itemsize])
            return
        ss, ds = _strides(shape), _strides(out.shape)
        k = n - 1  # dims after k are whole in the file and in the result: runs are contiguous in both
        while k > 0 and src[k] == (0, shape[k]) and dst[k] == (0, out.shape[k]):
            k -= 1
        run = ext[k] * ss[k] * itemsize
        nruns = math.prod(ext[:k])
        if nruns > 1 and run < DIRECT_RUN_BYTES:
            key = (file, entry.start)
            self.row_blocks.setdefault(key, (entry, shape, dtype, []))[3].append((src, out, dst))
            return
        base_s = sum(a * s for (a, _), s in zip(src, ss, strict=True))
        base_d = sum(a * s for (a, _), s in zip(dst, ds, strict=True))
        if nruns == 1:
            pairs = [(base_s, base_d)]
        else:
            grid = np.indices(ext[:k]).reshape(k, -1)
            so = base_s + np.asarray(ss[:k]) @ grid
            do = base_d + np.asarray(ds[:k]) @ grid
            pairs = list(zip(so.tolist(), do.tolist(), strict=True))
        for s_off, d_off in pairs:
            self._add(file, entry.start + s_off * itemsize, flat[d_off * itemsize : d_off * itemsize + run])

    def finish_planning(self) -> None:
        """Row blocks: the rows (dim 0) the short-run pieces of one tensor need, read once each and copied out."""
        for (file, _), (entry, shape, dtype, pieces) in self.row_blocks.items():
            row_bytes = _strides(shape)[0] * dtype.itemsize
            per_block = max(1, self.row_block_bytes // max(1, row_bytes))
            intervals = sorted((src[0][0], src[0][1]) for src, _, _ in pieces)
            merged: list[list[int]] = []
            for lo, hi in intervals:
                if merged and lo <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], hi)
                else:
                    merged.append([lo, hi])
            for lo, hi in merged:
                for r0 in range(lo, hi, per_block):
                    r1 = min(hi, r0 + per_block)
                    copy = _RowBlockCopy(dtype, shape, r0, r1, pieces)
                    self.blocks.setdefault(file, []).append(
                        fileio.ReadBlock(entry.start + r0 * row_bytes, (r1 - r0) * row_bytes, copy)
                    )


class _RowBlockCopy:
    """Copies rows ``r0:r1`` of a stored tensor (read into a block buffer) into the pieces that need them."""

    def __init__(self, dtype: np.dtype, shape: tuple[int, ...], r0: int, r1: int, pieces: list[Any]) -> None:
        self.dtype, self.shape, self.r0, self.r1, self.pieces = dtype, shape, r0, r1, pieces

    def __call__(self, block: np.ndarray) -> None:
        rows = block.view(self.dtype).reshape((self.r1 - self.r0, *self.shape[1:]))
        for src, out, dst in self.pieces:
            lo, hi = max(src[0][0], self.r0), min(src[0][1], self.r1)
            if lo >= hi:
                continue
            source = rows[(slice(lo - self.r0, hi - self.r0), *(slice(a, b) for a, b in src[1:]))]
            d0 = dst[0][0] + lo - src[0][0]
            out[(slice(d0, d0 + hi - lo), *(slice(a, b) for a, b in dst[1:]))] = source
