"""The TensorStore-backed array formats (``ocdbt`` and ``zarr3``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorstore as ts
from ckptcore.errors import CorruptCheckpointError
from ckptcore.registrations import Location, ReadRequest, WriteRequest

from ckptcore_zarr3 import layout

PACKED_KEY = ".packed/0"  # '.' never appears in an escaped storage key, so no leaf collides
PACKED_ALIGN = 16
DEFAULT_SMALL_BYTES = 64 << 10


def _context() -> ts.Context:
    # file_io_sync: TensorStore fsyncs what it writes; no cache: checkpoints are read once.
    return ts.Context({"file_io_sync": True, "cache_pool": {"total_bytes_limit": 0}})


class TensorStoreFormat:
    """Zarr3 arrays, either inside one OCDBT database (``ocdbt=True``) or as plain directories."""

    def __init__(self, *, ocdbt: bool) -> None:
        self.ocdbt = ocdbt

    def _kvstore(self, location: Location) -> dict[str, Any]:
        base = dict(location.kvstore)
        return {"driver": "ocdbt", "base": base} if self.ocdbt else base

    def _array_kvstore(self, kvstore: dict[str, Any], key: str) -> dict[str, Any]:
        if self.ocdbt:
            return {**kvstore, "path": f"{key}/"}
        return {**kvstore, "path": f"{kvstore.get('path', '')}{key}/"}

    # -- write -----------------------------------------------------------------------

    def write(
        self, location: Location, requests: Sequence[WriteRequest], options: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        chunk_bytes = int(options.get("chunk_bytes", layout.DEFAULT_CHUNK_BYTES))
        small_bytes = int(options.get("small_bytes", DEFAULT_SMALL_BYTES))
        compression = options.get("compression", "auto")
        level = int(options.get("zstd_level", 1))
        if compression not in ("auto", "zstd", "none"):
            raise ValueError(f"compression must be 'auto', 'zstd' or 'none', not {compression!r}")
        ctx = _context()
        kvstore = self._kvstore(location)
        infos: list[dict[str, Any]] = [{} for _ in requests]

        small = [i for i, r in enumerate(requests) if _is_small(r, small_bytes)]
        small_set = set(small)
        pending = []
        if small:
            pending.append(self._write_packed(kvstore, [requests[i] for i in small], [infos[i] for i in small], ctx))

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
                pending.append(store[shard.index].write(_view(shard.data, byte_view)))
        for p in pending:
            p.result()
        return infos

    def _write_packed(
        self, kvstore: dict[str, Any], requests: list[WriteRequest], infos: list[dict[str, Any]], ctx: ts.Context
    ) -> Any:
        parts, offset = [], 0
        for r, info in zip(requests, infos):
            raw = np.ascontiguousarray(r.shards[0].data).reshape(-1).view(np.uint8).tobytes()
            pad = -offset % PACKED_ALIGN
            if pad:
                parts.append(b"\0" * pad)
                offset += pad
            info.update(packed=PACKED_KEY, offset=offset, length=len(raw))
            parts.append(raw)
            offset += len(raw)
        kv = ts.KvStore.open(kvstore, context=ctx).result()
        return kv.write(PACKED_KEY, b"".join(parts))

    # -- read ------------------------------------------------------------------------

    def read(
        self, location: Location, requests: Sequence[ReadRequest], options: Mapping[str, Any]
    ) -> list[list[np.ndarray]]:
        ctx = _context()
        kvstore = self._kvstore(location)
        results: list[list[np.ndarray]] = [[] for _ in requests]
        packed = [i for i, r in enumerate(requests) if "packed" in r.info]
        if packed:
            self._read_packed(kvstore, requests, packed, results, ctx)

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
                reads.append((i, r, byte_view, cast_in_store, source[region].read()))
        for i, r, byte_view, cast_in_store, future in reads:
            data = future.result()
            if byte_view:
                data = data.view(r.saved_dtype).reshape(data.shape[: len(r.shape)])
            if not cast_in_store and data.dtype != r.dtype:
                data = data.astype(r.dtype)
            results[i].append(data)
        return results

    def _read_packed(
        self,
        kvstore: dict[str, Any],
        requests: Sequence[ReadRequest],
        indices: list[int],
        results: list[list[np.ndarray]],
        ctx: ts.Context,
    ) -> None:
        kv = ts.KvStore.open(kvstore, context=ctx).result()
        blobs: dict[str, bytes] = {}
        for key in {str(requests[i].info["packed"]) for i in indices}:
            found = kv.read(key).result()
            if found.state != "value":
                raise CorruptCheckpointError(f"packed array data {key!r} is missing from {kvstore}")
            blobs[key] = bytes(found.value)
        for i in indices:
            r = requests[i]
            blob = blobs[str(r.info["packed"])]
            start, length = int(r.info["offset"]), int(r.info["length"])
            expected = math.prod(r.shape) * r.saved_dtype.itemsize
            if length != expected or start + length > len(blob):
                raise CorruptCheckpointError(f"packed array {r.key!r} is truncated or inconsistent with the index")
            whole = np.frombuffer(blob, dtype=r.saved_dtype, count=math.prod(r.shape), offset=start).reshape(r.shape)
            for region in r.regions:
                results[i].append(np.array(whole[region], dtype=r.dtype, copy=True))


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
