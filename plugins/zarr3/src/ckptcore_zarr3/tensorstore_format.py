"""The TensorStore-backed array formats (``ocdbt`` and ``zarr3``).

Performance notes (measured with ``benchmarks/bench_local.py``):

* OCDBT writes every value of one commit into one data file per ``target_data_file_size``;
  TensorStore's default (2 GiB) writes a whole checkpoint through one file, sequentially.
  Data files of ``DATA_FILE_BYTES`` are written in parallel: 2-3x faster saves of large
  states, and as fast as ``np.save`` + ``fsync`` on local disk.
* Small leaves are packed into blobs of at most ``PACKED_BLOB_BYTES``: one write and one
  read for thousands of leaves, instead of one array (metadata, B-tree entry) per leaf.
* A restore reads packed leaves by byte range, so a partial restore reads only the span
  of the leaves it asks for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from ckptcore.errors import CorruptCheckpointError, InvalidOptionError
from ckptcore.plugins.registrations import Location, ReadRequest, WriteRequest
from ckptcore_zarr3 import layout
from ckptcore_zarr3.buffers import read_region
from ckptcore_zarr3.kvstore import kvstore_spec

PACKED_PREFIX = ".packed/"  # '.' never appears in an escaped storage key, so no leaf collides
PACKED_ALIGN = 16
PACKED_BLOB_BYTES = 32 << 20
DEFAULT_SMALL_BYTES = 64 << 10
DATA_FILE_BYTES = 64 << 20
OPTIONS = ("chunk_bytes", "small_bytes", "compression", "zstd_level", "data_file_bytes")


def _context() -> ts.Context:
    return ts.Context({
        # TensorStore fsyncs each file it writes, before its write completes: the data is
        # durable when write() returns, and the commit's own fsync of these files is cheap.
        "file_io_sync": True,
        # No chunk cache: a checkpoint's chunks are written once and read once.
        "cache_pool": {"total_bytes_limit": 0},
        # ...but OCDBT's B-tree nodes and manifest are read once per array without one.
        "cache_pool#ocdbt": {"total_bytes_limit": 64 << 20},
    })


class TensorStoreFormat:
    """Zarr3 arrays, either inside one OCDBT database (``ocdbt=True``) or as plain directories."""

    def __init__(self, *, ocdbt: bool) -> None:
        self.ocdbt = ocdbt

    def _kvstore(self, location: Location, data_file_bytes: int = DATA_FILE_BYTES) -> dict[str, Any]:
        base = kvstore_spec(location.address)
        if not self.ocdbt:
            return base
        spec = {
            "driver": "ocdbt", "base": base, "cache_pool": "cache_pool#ocdbt",
            "target_data_file_size": data_file_bytes,
        }
        if base.get("driver") != "file":
            # On object stores, reads of neighbouring chunks in one data file are merged
            # into one request (far fewer requests). On local disk parallel reads are faster.
            spec |= {
                "experimental_read_coalescing_threshold_bytes": 1 << 20,
                "experimental_read_coalescing_merged_bytes": 256 << 20,
                "experimental_read_coalescing_interval": "1ms",
            }
        return spec

    def _array_kvstore(self, kvstore: dict[str, Any], key: str) -> dict[str, Any]:
        if self.ocdbt:
            return {**kvstore, "path": f"{key}/"}
        return {**kvstore, "path": f"{kvstore.get('path', '')}{key}/"}

    # -- write -----------------------------------------------------------------------

    def write(
        self, location: Location, requests: Sequence[WriteRequest], options: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidOptionError(
                f"unknown format option(s) {unknown} for the array formats of ckptcore-zarr3; known: {list(OPTIONS)}"
            )
        chunk_bytes = int(options.get("chunk_bytes", layout.DEFAULT_CHUNK_BYTES))
        small_bytes = int(options.get("small_bytes", DEFAULT_SMALL_BYTES))
        data_file_bytes = int(options.get("data_file_bytes", DATA_FILE_BYTES))
        compression = options.get("compression", "auto")
        level = int(options.get("zstd_level", 1))
        if compression not in ("auto", "zstd", "none"):
            raise InvalidOptionError(f"format option compression must be 'auto', 'zstd' or 'none', not {compression!r}")
        ctx = _context()
        kvstore = self._kvstore(location, data_file_bytes)
        infos: list[dict[str, Any]] = [{} for _ in requests]

        small = [i for i, r in enumerate(requests) if _is_small(r, small_bytes)]
        small_set = set(small)
        pending = []
        if small:
            pending += self._write_packed(kvstore, [requests[i] for i in small], [infos[i] for i in small], ctx)

        # Every open is started before any write: their metadata writes overlap.
        opened = []
        for i, r in enumerate(requests):
            if i in small_set:
                continue
            sdtype, byte_view = layout.storage_dtype(r.dtype)
            shape = layout.stored_shape(r.shape, r.dtype, byte_view)
            hint = layout.stored_shape(r.chunk_hint, r.dtype, byte_view) if r.chunk_hint else None
            chunks = layout.chunk_shape(shape, sdtype.itemsize, chunk_bytes, hint)
            compress = compression == "zstd" or (
                compression == "auto" and layout.worth_compressing(_view(r.shards[0].data, byte_view))
            )
            spec = {
                "driver": "zarr3",
                "kvstore": self._array_kvstore(kvstore, r.key),
                "metadata": {
                    "shape": list(shape),
                    "data_type": sdtype.name,
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
                    "codecs": layout.codecs(compress, level),
                },
                "create": True,
                "delete_existing": not self.ocdbt,
            }
            infos[i] = {"chunks": chunks, "compression": "zstd" if compress else "none"}
            if byte_view:
                infos[i]["byte_view"] = True
            opened.append((r, byte_view, ts.open(spec, context=ctx)))

        for r, byte_view, future in opened:
            store = future.result()
            for shard in r.shards:
                if math.prod(shard.data.shape) == 0:
                    continue
                # The caller keeps its arrays unchanged until write() returns (saves snapshot
                # first when they must not), so TensorStore may encode straight from them:
                # no copy into chunk buffers (half the CPU time of a large save).
                data = _view(shard.data, byte_view)
                pending.append(store[shard.index].write(data, can_reference_source_data_indefinitely=True))
        for p in pending:
            p.result()
        return infos

    def _write_packed(
        self, kvstore: dict[str, Any], requests: list[WriteRequest], infos: list[dict[str, Any]], ctx: ts.Context
    ) -> list[Any]:
        """Small leaves concatenated (aligned) into blobs; each leaf's info says where it is."""
        kv = ts.KvStore.open(kvstore, context=ctx).result()
        sizes: list[int] = [0]
        places = []
        for r, info in zip(requests, infos, strict=True):
            length = math.prod(r.shape) * r.dtype.itemsize
            offset = sizes[-1] + (-sizes[-1] % PACKED_ALIGN)
            if sizes[-1] and offset + length > PACKED_BLOB_BYTES:
                sizes.append(0)
                offset = 0
            sizes[-1] = offset + length
            places.append((len(sizes) - 1, offset, length))
            info.update(packed=f"{PACKED_PREFIX}{len(sizes) - 1}", offset=offset, length=length)
        blobs = [bytearray(size) for size in sizes]  # zero-filled: the alignment padding
        views = [np.frombuffer(blob, dtype=np.uint8) for blob in blobs]
        for r, (b, offset, length) in zip(requests, places, strict=True):
            views[b][offset : offset + length] = np.ascontiguousarray(r.shards[0].data).reshape(-1).view(np.uint8)
        del views  # a bytearray with exported buffers cannot be handed over
        # TensorStore takes any buffer; the stubs only name bytes.
        return [kv.write(f"{PACKED_PREFIX}{b}", blob) for b, blob in enumerate(blobs)]  # type: ignore[arg-type]

    # -- read ------------------------------------------------------------------------

    def read(
        self, location: Location, requests: Sequence[ReadRequest], options: Mapping[str, Any]
    ) -> list[list[np.ndarray]]:
        ctx = _context()
        kvstore = self._kvstore(location)
        results: list[list[np.ndarray]] = [[] for _ in requests]
        packed = [i for i, r in enumerate(requests) if "packed" in r.info]
        blobs = self._read_packed(kvstore, requests, packed, ctx) if packed else {}

        opened = []
        for i, r in enumerate(requests):
            if "packed" in r.info:
                continue
            spec = {"driver": "zarr3", "kvstore": self._array_kvstore(kvstore, r.key), "open": True}
            opened.append((i, r, ts.open(spec, context=ctx, read=True)))
        reads = []
        for i, r, future in opened:
            store = future.result()
            byte_view = bool(r.info.get("byte_view"))
            if tuple(store.shape) != layout.stored_shape(r.shape, r.saved_dtype, byte_view):
                raise CorruptCheckpointError(
                    f"stored array {r.key!r} has shape {tuple(store.shape)}, the index says {r.shape}"
                )
            cast_in_store = not byte_view and r.dtype != r.saved_dtype and _ts_can_cast(r.dtype)
            source = ts.cast(store, ts.dtype(r.dtype.name)) if cast_in_store else store
            for region in r.regions:
                reads.append((i, r, byte_view, cast_in_store, read_region(source[region])))

        # Packed leaves are cut out of their blobs while the array reads run.
        for i in packed:
            self._unpack(requests[i], blobs, results[i])
        for i, r, byte_view, cast_in_store, (future, out) in reads:
            data = future.result() if out is None else (future.result(), out)[1]
            if byte_view:
                data = data.view(r.saved_dtype).reshape(data.shape[: len(r.shape)])
            if not cast_in_store and data.dtype != r.dtype:
                data = data.astype(r.dtype)
            results[i].append(data)
        return results

    def _read_packed(
        self, kvstore: dict[str, Any], requests: Sequence[ReadRequest], indices: list[int], ctx: ts.Context
    ) -> dict[str, tuple[int, Any]]:
        """Start reading, per blob, the byte span that holds the requested leaves: {key: (start, future)}."""
        spans: dict[str, list[int]] = {}
        for i in indices:
            info = requests[i].info
            start, length = int(info["offset"]), int(info["length"])
            if start < 0 or length < 0:
                raise CorruptCheckpointError(f"packed array {requests[i].key!r} has an invalid offset or length")
            span = spans.setdefault(str(info["packed"]), [start, start + length])
            span[0], span[1] = min(span[0], start), max(span[1], start + length)
        kv = ts.KvStore.open(kvstore, context=ctx).result()
        return {key: (lo, kv.read(key, byte_range=slice(lo, hi))) for key, (lo, hi) in spans.items()}

    @staticmethod
    def _unpack(r: ReadRequest, blobs: dict[str, tuple[int, Any]], out: list[np.ndarray]) -> None:
        key = str(r.info["packed"])
        base, blob = blobs[key]
        if not isinstance(blob, np.ndarray):  # the first leaf of this blob waits for its read
            try:
                found = blob.result()
            except Exception as exc:  # a byte range past the end: the blob is truncated
                raise CorruptCheckpointError(f"packed array data {key!r} is truncated: {exc}") from exc
            if found.state != "value":
                raise CorruptCheckpointError(f"packed array data {key!r} is missing")
            blob = np.frombuffer(found.value, dtype=np.uint8)
            blobs[key] = (base, blob)
        start, length = int(r.info["offset"]) - base, int(r.info["length"])
        if length != math.prod(r.shape) * r.saved_dtype.itemsize or start + length > len(blob):
            raise CorruptCheckpointError(f"packed array {r.key!r} is truncated or inconsistent with the index")
        whole = blob[start : start + length].view(r.saved_dtype).reshape(r.shape)
        for region in r.regions:
            # np.array, not .copy(): indexing a 0-d array with () gives a NumPy scalar.
            out.append(np.array(whole[region], dtype=r.dtype, copy=True))


def _is_small(request: WriteRequest, small_bytes: int) -> bool:
    nbytes = math.prod(request.shape) * request.dtype.itemsize
    whole = len(request.shards) == 1 and tuple(request.shards[0].data.shape) == tuple(request.shape)
    return whole and (nbytes <= small_bytes or len(request.shape) == 0)


def _view(data: np.ndarray, byte_view: bool) -> np.ndarray:
    if not byte_view:
        return data
    data = np.ascontiguousarray(data)
    return data.view(np.uint8).reshape(*data.shape, data.dtype.itemsize) if data.dtype.itemsize > 1 else data.view(np.uint8)


def _ts_can_cast(dtype: np.dtype) -> bool:
    return dtype.name in layout._NATIVE
