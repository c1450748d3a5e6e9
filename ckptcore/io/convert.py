"""Converting a checkpoint of any readable layout (orbax-checkpoint's, ckptcore's own...) into ckptcore's.

The conversion streams: the source's arrays are read in batches of at most
``max_bytes_in_flight / 2`` bytes (a leaf larger than that in row blocks), the next batch is
read while the previous one is written, so at most two batches (and one call's worth of
the read-back below, 64 MiB) are held at once whatever the size of the checkpoint.

**Where a batch goes.** A format writes one batch per call, and some formats write one file
(or database commit) per call. Batch ``k`` is therefore written as the multi-writer
layout's writer ``k``: into ``<dst>/<format>/process_<k>/``, and each leaf's index record
lists its writers and the regions each holds (``format_info["writers"]``, exactly as a
``jax.distributed`` save records its processes; :mod:`ckptcore.io.multiwriter`). Any array
format therefore converts without knowing it is being streamed, and every ckptcore reader
since the multi-writer layout reads the result (resharding, partial restores included).

**Safety.** The source is opened and checked first (its layout, tree, storage keys and
array formats: a damaged ``_METADATA`` or a missing ``manifest.ocdbt`` fails before
anything is written). The data is then written into the destination's uncommitted staging
directory (a temporary sibling on disk, an uncommitted prefix on object stores), every
batch checksummed as it is read (and checked against the source's own checksums where it
has them); each batch is read back through the format, in blocks of rows, while the next
one is being written and the one after it read, and compared with those checksums; then
the index is written and read back, and only then is ``dst`` committed. A
source that turns out damaged while streaming (a truncated data file) aborts the staging
directory: ``dst`` never appears.

**Other layouts.** ``to=NAME`` writes the layout of a plugin's checkpoint exporter (the
``ckptcore_checkpoint_exporters`` hook; ``"safetensors"`` writes a Hugging Face directory)
into the same staging directory, fed by the same checked, bounded stream of the source's
arrays; the exporter verifies what it wrote, and the core commits ``dst``.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
from collections.abc import Generator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptcore import progress as progress_lib
from ckptcore import storage
from ckptcore.errors import (
    CheckpointError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    InvalidOptionError,
    PluginError,
)
from ckptcore.io import checksums, index, multiwriter
from ckptcore.io.restore import OpenedCheckpoint, _format_for, open_checkpoint
from ckptcore.io.save import Transaction, aborted_on_failure, check_replaceable
from ckptcore.parallel.coordinator import LOCAL
from ckptcore.plugins.manager import registry
from ckptcore.plugins.registrations import (
    ArrayFormatRegistration,
    ExportLeaf,
    ExportPiece,
    Index,
    ProgressCallback,
    ReadRequest,
    SaveContext,
    Shard,
    WriteRequest,
)
from ckptcore.tree.dtypes import dtype_from_name
from ckptcore.tree.keys import KeyPath, format_key_path, is_safe_storage_key, storage_key
from ckptcore.tree.nodes import ARRAY_KINDS, Node, decode_scalar, iter_leaves
from ckptcore.version import __version__

DEFAULT_MAX_BYTES_IN_FLIGHT = 512 << 20
# Fields of a source record that describe where the source kept it (replaced by the new ones).
_SOURCE_FIELDS = ("format", "key", "format_info", "checksum", "shard_checksums")


@dataclass
class _Leaf:
    path: KeyPath
    record: Node  # the source record
    new: Node  # the converted record (same dict object as in the new tree)
    key: str
    writers: list[dict[str, Any]] = field(default_factory=list)
    sums: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _Piece:
    leaf: _Leaf
    region: Index

    @property
    def nbytes(self) -> int:
        return math.prod(s.stop - s.start for s in self.region) * dtype_from_name(self.leaf.record["dtype"]).itemsize


@dataclass(frozen=True)
class ConvertReport:
    """What :func:`convert` did: where from and to, the bytes converted, and in how many batches."""

    src: str
    dst: str
    layout: str
    format: str
    total_bytes: int
    batches: int
    leaves: int


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    format: str | None = None,
    max_bytes_in_flight: int | None = None,
    progress: ProgressCallback | bool | None = None,
    storage_options: Mapping[str, Any] | None = None,
    dst_storage_options: Mapping[str, Any] | None = None,
    force: bool = False,
    to: str | None = None,
    export_options: Mapping[str, Any] | None = None,
) -> ConvertReport:
    """Convert the checkpoint at ``src`` (any layout ckptcore reads) into a ckptcore checkpoint at ``dst``.

    :param to: the layout to write: ``"ckptcore"`` (the default), or the name of a checkpoint
        exporter a plugin provides (``"safetensors"``: a Hugging Face directory, with the
        safetensors plugin), which gets ``export_options`` (see :func:`_export`).
    :param format: the array format to write (default: the default format, ``ocdbt``).
    :param max_bytes_in_flight: the most array bytes held at once (two batches of half of it).
    :param progress: ``True`` for a progress bar, or a callable(bytes done, bytes total);
        the total counts the bytes written and then the bytes verified.
    :param force: replace an existing checkpoint at ``dst``.
    :returns: a :class:`ConvertReport`, once the written checkpoint is verified and committed.
    :raises CorruptCheckpointError: the source is damaged (nothing is left at ``dst``).
    """
    limit = int(max_bytes_in_flight or DEFAULT_MAX_BYTES_IN_FLIGHT)
    if limit <= 0:
        raise InvalidOptionError(f"max_bytes_in_flight must be positive, got {max_bytes_in_flight!r}")
    if to not in (None, "ckptcore"):
        if format is not None:
            raise InvalidOptionError(f"convert: format={format!r} names an array format of ckptcore's layout; "
                                     f"with to={to!r} pass the exporter's export_options instead")
        return _export(src, dst, str(to), export_options or {}, limit, progress, storage_options,
                       dst_storage_options, force)
    if export_options:
        raise InvalidOptionError("convert: export_options go with to=<exporter>; ckptcore's layout takes format=")
    opened = open_checkpoint(src, storage_options)  # recognised, tree validated, metadata read
    leaves, tree = _plan(opened)
    readers = _readers(opened, leaves)
    format_name = format or (registry().default_array_format() if leaves else "")
    fmt = registry().array_format(format_name) if leaves else None
    batches = _batches(leaves, max(1, limit // 2))
    final = storage.resolve(dst, dst_storage_options if dst_storage_options is not None else storage_options)
    if final.url.rstrip("/") == opened.location.url.rstrip("/"):
        raise InvalidOptionError(f"convert: the destination {final.url} is the source itself; choose another path")
    strategy = storage.atomicity(final)
    operation = LOCAL.operation("convert", "a conversion")
    transaction = Transaction(strategy, operation, LOCAL)
    total = sum(p.nbytes for batch in batches for p in batch)
    with progress_lib.resolve(progress, f"converting {opened.location.url}") as callback:
        staging = transaction.begin(final, check=lambda: check_replaceable(final, strategy, force))
        with aborted_on_failure(transaction, staging, final.url):
            if fmt is not None:
                _stream(opened, readers, fmt, staging.child(format_name), batches, callback, total)
            _finish_records(leaves, format_name)
            doc = _index(opened, tree, format_name, fmt, final.url, total)
            staging.fs.makedirs(staging.path, exist_ok=True)
            staging.fs.pipe_file(f"{staging.path.rstrip('/')}/{index.INDEX_FILE}", index.encode_index(doc))
            index.read_index(staging)  # the index written reads back (typed, validated)
            transaction.commit(staging, final, replace=force)
    return ConvertReport(opened.location.url, final.url, opened.layout, format_name, total, len(batches), len(leaves))


def _export(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str, options: Mapping[str, Any], limit: int,
            progress: ProgressCallback | bool | None, storage_options: Mapping[str, Any] | None,
            dst_storage_options: Mapping[str, Any] | None, force: bool) -> ConvertReport:
    """Another layout (``to``), written by a plugin's exporter into the staging directory of ``dst``, then committed.

    The source is opened and checked as for ckptcore's layout; the exporter gets every leaf
    and the array data streamed as for any conversion (batch ``k+1`` read while batch ``k``
    is written, the source's checksums verified); it refuses what its layout cannot hold
    before writing anything, and when it raises, ``dst`` never appears.
    """
    exporter = registry().checkpoint_exporter(to)
    opened = open_checkpoint(src, storage_options)
    leaves, _ = _plan(opened)
    readers = _readers(opened, leaves)
    position = {tuple(leaf.path): i for i, leaf in enumerate(leaves)}
    described: list[ExportLeaf] = []
    where: dict[int, int] = {}  # id of a _Leaf -> its position in ``described``
    for path, record in iter_leaves(opened.doc["tree"]):
        if record.get("kind") in ARRAY_KINDS:
            leaf = leaves[position[tuple(path)]]
            where[id(leaf)] = len(described)
            described.append(ExportLeaf(tuple(path), str(record["kind"]), tuple(leaf.new["shape"]),
                                        dtype_from_name(record["dtype"])))
        else:
            described.append(ExportLeaf(tuple(path), str(record.get("kind", "")), value=decode_scalar(tuple(path), record)))
    batches = _batches(leaves, max(1, limit // 2))
    final = storage.resolve(dst, dst_storage_options if dst_storage_options is not None else storage_options)
    if final.url.rstrip("/") == opened.location.url.rstrip("/"):
        raise InvalidOptionError(f"convert: the destination {final.url} is the source itself; choose another path")
    strategy = storage.atomicity(final)
    transaction = Transaction(strategy, LOCAL.operation("convert", "a conversion"), LOCAL)
    total = sum(p.nbytes for batch in batches for p in batch)
    with progress_lib.resolve(progress, f"converting {opened.location.url}") as callback:
        staging = transaction.begin(final, check=lambda: check_replaceable(final, strategy, force))
        with aborted_on_failure(transaction, staging, final.url):
            pieces = _export_pieces(opened, readers, batches, where, callback, total)
            try:
                exporter.exporter.export(staging, described, pieces, dict(options))
            except CheckpointError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"the {to!r} checkpoint exporter ({exporter.distribution or 'registered in process'}) failed writing "
                    f"{final.url}: {type(exc).__name__}: {exc}; nothing was committed"
                ) from exc
            finally:
                pieces.close()
            transaction.commit(staging, final, replace=force)
    return ConvertReport(opened.location.url, final.url, opened.layout, to, total, len(batches), len(leaves))


def _export_pieces(opened: OpenedCheckpoint, readers: Mapping[str, tuple[ArrayFormatRegistration, Any]],
                   batches: list[list[_Piece]], where: Mapping[int, int], progress: ProgressCallback | None,
                   total: int) -> Generator[ExportPiece, None, None]:
    """The source's array data in leaf order, batch ``k+1`` read while the exporter writes batch ``k``."""
    done = 0
    if progress:
        progress(0, total)
    for _, batch, data in _read_ahead(opened, readers, batches):
        for piece, array in zip(batch, data, strict=True):
            yield ExportPiece(where[id(piece.leaf)], piece.region, array)
            done += piece.nbytes
            if progress:
                progress(done, total)
        del data


def _read_ahead(
    opened: OpenedCheckpoint, readers: Mapping[str, tuple[ArrayFormatRegistration, Any]], batches: list[list[_Piece]]
) -> Generator[tuple[int, list[_Piece], list[np.ndarray]], None, None]:
    """``(k, batch, data)`` for every batch, batch ``k+1`` read in a thread while the caller handles batch ``k``."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptcore-convert-read") as pool:
        pending = pool.submit(_read_batch, opened, readers, batches[0]) if batches else None
        for k, batch in enumerate(batches):
            assert pending is not None
            data = pending.result()
            pending = pool.submit(_read_batch, opened, readers, batches[k + 1]) if k + 1 < len(batches) else None
            yield k, batch, data
            del data  # the caller is done with it: only the batch being read stays in memory


def _plan(opened: OpenedCheckpoint) -> tuple[list[_Leaf], Node]:
    """The array leaves to convert, and the new tree (a copy whose array records are rewritten)."""
    tree = copy.deepcopy(opened.doc["tree"])
    leaves = []
    originals = dict((tuple(p), r) for p, r in iter_leaves(opened.doc["tree"]))
    seen: set[str] = set()
    for path, new in iter_leaves(tree):
        if new.get("kind") not in ARRAY_KINDS:
            continue
        record = originals[tuple(path)]
        where = f"{format_key_path(path)} of {opened.location.url}"
        try:
            shape = [int(n) for n in record["shape"]]
            dtype_from_name(record["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"the array record of {where} is malformed ({exc}); the source is damaged") from exc
        if opened.layout == "ckptcore" and not is_safe_storage_key(record.get("key")):
            raise CorruptCheckpointError(f"the storage key {record.get('key')!r} of {where} is invalid; the index is corrupt")
        key = storage_key(path)
        if key in seen:
            raise CorruptCheckpointError(f"two leaves of {opened.location.url} map to the storage key {key!r}")
        seen.add(key)
        for name in _SOURCE_FIELDS:
            new.pop(name, None)
        new["shape"] = shape
        leaves.append(_Leaf(tuple(path), record, new, key))
    return leaves, tree


def _readers(opened: OpenedCheckpoint, leaves: list[_Leaf]) -> dict[str, tuple[ArrayFormatRegistration, Any]]:
    """format name -> (its reader, the location it reads from): every format the source uses, checked now."""
    out: dict[str, tuple[ArrayFormatRegistration, Any]] = {}
    for leaf in leaves:
        name = str(leaf.record.get("format", ""))
        if name in out:
            continue
        if name in opened.formats:
            out[name] = (ArrayFormatRegistration(name=name, format=opened.formats[name]), opened.location)
        elif opened.layout == "ckptcore":
            out[name] = (_format_for(name, opened.doc, opened.location.url), opened.location.child(name))
        else:
            raise PluginError(
                f"the {opened.layout!r} layout described {opened.location.url} with array format {name!r} "
                "but gave no reader for it; report this to the plugin's authors"
            )
    return out


def _batches(leaves: list[_Leaf], limit: int) -> list[list[_Piece]]:
    """Pieces (whole leaves, or row blocks of leaves larger than ``limit``) in batches of at most ``limit`` bytes."""
    batches: list[list[_Piece]] = [[]]
    size = 0
    for leaf in leaves:
        for piece in _pieces(leaf, limit):
            n = piece.nbytes
            if batches[-1] and size + n > limit:
                batches.append([])
                size = 0
            batches[-1].append(piece)
            size += n
    return [b for b in batches if b]


def _pieces(leaf: _Leaf, limit: int) -> Iterator[_Piece]:
    whole = tuple(slice(0, int(n)) for n in leaf.record["shape"])
    for region in _row_blocks(whole, dtype_from_name(leaf.record["dtype"]).itemsize, limit):
        yield _Piece(leaf, region)


def _read_batch(opened: OpenedCheckpoint, readers: Mapping[str, tuple[ArrayFormatRegistration, Any]],
                batch: list[_Piece]) -> list[np.ndarray]:
    by_format: dict[str, list[int]] = {}
    for i, piece in enumerate(batch):
        by_format.setdefault(str(piece.leaf.record.get("format", "")), []).append(i)
    out: list[Any] = [None] * len(batch)
    for name, positions in by_format.items():
        reg, base = readers[name]
        requests = []
        for i in positions:
            record = batch[i].leaf.record
            dtype = dtype_from_name(record["dtype"])
            requests.append(ReadRequest(key=str(record.get("key", "")), shape=tuple(int(n) for n in record["shape"]),
                                        saved_dtype=dtype, dtype=dtype, info=record.get("format_info", {}),
                                        regions=(batch[i].region,)))
        where = f"reading the arrays of {opened.location.url} (format {name!r}) failed"
        results = multiwriter.read_or_explain(
            reg.format, base, requests,
            lambda exc, where=where: f"{where}: {type(exc).__name__}: {exc}; the source is damaged or the storage "  # type: ignore[misc]
            "failed. Nothing was written to the destination",
        )
        for i, arrays in zip(positions, results, strict=True):
            out[i] = arrays[0]
    for piece, data in zip(batch, out, strict=True):
        expected = tuple(s.stop - s.start for s in piece.region)
        if tuple(data.shape) != expected:
            raise CorruptCheckpointError(
                f"reading {format_key_path(piece.leaf.path)} of {opened.location.url} returned shape "
                f"{tuple(data.shape)}, not {expected}; the source is damaged"
            )
        whole = all(s.start == 0 and s.stop == n for s, n in zip(piece.region, piece.leaf.record["shape"], strict=True))
        saved = piece.leaf.record.get("checksum")
        if whole and saved and not checksums.matches(data, saved):
            raise ChecksumMismatchError(
                f"{format_key_path(piece.leaf.path)} of {opened.location.url} does not match its checksum; the source is "
                "corrupt. Nothing was written to the destination"
            )
    return out


def _stream(opened: OpenedCheckpoint, readers: Mapping[str, tuple[ArrayFormatRegistration, Any]],
            fmt: ArrayFormatRegistration, directory: Any, batches: list[list[_Piece]],
            progress: ProgressCallback | None, total: int) -> None:
    """Three stages at once: batch k+2 is read, k+1 checksummed and written into ``<format>/process_<k+1>/``, k read back.

    On two cores the conversion is CPU-bound (decoding the source, copying, checksumming),
    so the read-back runs beside the write of the next batch rather than after it.
    """
    done = 0
    if progress:
        progress(0, 2 * total)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptcore-convert-verify") as verifier:
        checking: tuple[Any, int] | None = None  # (the read-back of the last batch written, its bytes)

        def checked() -> None:
            nonlocal done, checking
            if checking is not None:
                job, nbytes = checking
                checking = None
                job.result()  # a mismatch raises here, in the caller's thread
                done += nbytes
                if progress:
                    progress(done, 2 * total)

        for k, batch, data in _read_ahead(opened, readers, batches):
            nbytes = sum(p.nbytes for p in batch)
            written = _write_batch(fmt, directory.child(f"process_{k}"), k, batch, data)
            del data
            done += nbytes
            if progress:
                progress(done, 2 * total)
            checked()
            checking = (verifier.submit(_verify_written, directory, fmt, written), nbytes)
        checked()


_Written = list[tuple[_Leaf, dict[str, Any], list[dict[str, Any]]]]


def _write_batch(fmt: ArrayFormatRegistration, location: Any, k: int, batch: list[_Piece], data: list[np.ndarray]) -> _Written:
    """Write one batch as writer ``k``; the CRC-32C of each piece is computed meanwhile (it releases the GIL)."""
    by_leaf: dict[int, list[int]] = {}
    for i, piece in enumerate(batch):
        by_leaf.setdefault(id(piece.leaf), []).append(i)
    requests, owners = [], []
    for positions in by_leaf.values():
        leaf = batch[positions[0]].leaf
        dtype = dtype_from_name(leaf.record["dtype"])
        shards = tuple(Shard(batch[i].region, data[i]) for i in positions)
        shape = tuple(int(n) for n in leaf.record["shape"])
        hint = None if len(shards) == 1 and shards[0].index == tuple(slice(0, n) for n in shape) else tuple(
            s.stop - s.start for s in shards[0].index)
        requests.append(WriteRequest(key=leaf.key, shape=shape, dtype=dtype, shards=shards, chunk_hint=hint))
        owners.append(leaf)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptcore-convert-checksum") as pool:
        sums_job = pool.submit(lambda: [[checksums.checksum(shard.data) for shard in r.shards] for r in requests])
        infos = fmt.format.write(location, requests, {})
        sums = sums_job.result()
    if len(infos) != len(requests):
        raise PluginError(f"array format {fmt.name!r} ({fmt.distribution}) returned {len(infos)} infos for {len(requests)} writes")
    written: _Written = []
    for leaf, request, info, leaf_sums in zip(owners, requests, infos, sums, strict=True):
        regions = [[[s.start, s.stop] for s in shard.index] for shard in request.shards]
        writer = {"process": k, "info": info, "shards": regions}
        entries = [{"index": r, "checksum": c} for r, c in zip(regions, leaf_sums, strict=True)]
        leaf.writers.append(writer)
        leaf.sums += entries
        written.append((leaf, writer, entries))
    return written


VERIFY_BLOCK_BYTES = 16 << 20
"""The rows of a large piece read back at once: fresh memory is costly to touch, and blocks this small are reused."""
VERIFY_CALL_BYTES = 64 << 20
"""The most read back by one call of the format: small pieces go together (each call has a cost of its own)."""


def _verify_written(directory: Any, fmt: ArrayFormatRegistration, written: _Written) -> None:
    """Read back what one batch wrote, through the format, and compare it with the checksums of the source data.

    The pieces are read in calls of at most :data:`VERIFY_CALL_BYTES`, many small pieces in
    one call, a large one in blocks of rows of :data:`VERIFY_BLOCK_BYTES`, its checksum
    continued from block to block (:class:`checksums.Running`).
    """
    blocks: list[tuple[ReadRequest, int, int]] = []  # in order: request, the position of its entry, bytes
    entries: list[tuple[_Leaf, dict[str, Any], checksums.Running]] = []
    for leaf, writer, leaf_entries in written:
        dtype = dtype_from_name(leaf.record["dtype"])
        shape = tuple(int(x) for x in leaf.record["shape"])
        for entry in leaf_entries:
            entries.append((leaf, entry, checksums.Running(entry["checksum"].partition(":")[0])))
            for block in _row_blocks(tuple(slice(a, b) for a, b in entry["index"]), dtype.itemsize,
                                    VERIFY_BLOCK_BYTES):
                request = ReadRequest(key=leaf.key, shape=shape, saved_dtype=dtype, dtype=dtype,
                                      info={"writers": [writer]}, regions=(block,))
                nbytes = math.prod(s.stop - s.start for s in block) * dtype.itemsize
                blocks.append((request, len(entries) - 1, nbytes))
    call: list[tuple[ReadRequest, int]] = []
    size = 0
    for i, (request, position, nbytes) in enumerate(blocks):
        call.append((request, position))
        size += nbytes
        if i == len(blocks) - 1 or size + blocks[i + 1][2] > VERIFY_CALL_BYTES:
            results = multiwriter.read_or_explain(
                fmt.format, directory, [r for r, _ in call],
                lambda exc: f"converting: reading back what was written to {directory.url} failed "
                f"({type(exc).__name__}: {exc}); nothing was committed",
            )
            for (_, at), arrays in zip(call, results, strict=True):
                entries[at][2].update(arrays[0])
            del results
            call, size = [], 0
    for leaf, entry, running in entries:
        if running.value() != entry["checksum"]:
            raise ChecksumMismatchError(
                f"converting: {format_key_path(leaf.path)} read back from {directory.url} differs from the source; "
                "the destination storage corrupted it. Nothing was committed"
            )


def _row_blocks(region: Index, itemsize: int, limit: int) -> Iterator[Index]:
    """``region`` cut along its first axis into blocks of at most ``limit`` bytes (one row at least), in C order."""
    if not region:
        yield region
        return
    first, rest = region[0], region[1:]
    row_bytes = math.prod(s.stop - s.start for s in rest) * itemsize
    rows = max(1, limit // max(1, row_bytes))
    for start in range(first.start, max(first.start + 1, first.stop), rows):
        yield (slice(start, min(first.stop, start + rows)), *rest)


def _index(opened: OpenedCheckpoint, tree: Node, format_name: str, fmt: ArrayFormatRegistration | None,
           url: str, total: int) -> dict[str, Any]:
    formats = {}
    if fmt is not None:
        formats[format_name] = {"version": fmt.version, "distribution": fmt.distribution, "plugin_version": fmt.plugin_version}
    metadata = opened.doc.get("metadata") if isinstance(opened.doc.get("metadata"), dict) else {}
    plugin_metadata = registry().index_metadata(SaveContext(url=url, formats=tuple(formats), user_metadata=metadata or {}))
    plugin_metadata["ckptcore.convert"] = {
        "source": opened.location.url, "layout": opened.layout, "description": opened.description,
        "source_created": opened.doc.get("created", ""),
    }
    return {
        "format": index.FORMAT, "format_version": index.FORMAT_VERSION, "ckptcore_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(), "array_formats": formats, "total_bytes": total,
        "metadata": metadata or {}, "plugin_metadata": plugin_metadata, "tree": tree,
    }


def _finish_records(leaves: list[_Leaf], format_name: str) -> None:
    for leaf in leaves:
        shape = [int(n) for n in leaf.record["shape"]]
        leaf.new.update({"format": format_name, "key": leaf.key, "format_info": {"writers": leaf.writers}})
        sums = sorted(leaf.sums, key=lambda e: e["index"])
        if len(sums) == 1 and sums[0]["index"] == [[0, n] for n in shape]:
            leaf.new["checksum"] = sums[0]["checksum"]
        else:
            leaf.new["shard_checksums"] = sums


__all__ = ["ConvertReport", "convert"]
