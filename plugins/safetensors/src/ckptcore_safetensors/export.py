"""Writing a checkpoint as a Hugging Face safetensors directory (``ckptcore convert SRC DST --to safetensors``).

The output is what ``transformers`` and every safetensors reader load:

* ``model.safetensors``, or, when the arrays are over ``max_shard_bytes`` (default 5 GB,
  as Hugging Face counts: 5 * 10**9), ``model-0000i-of-0000n.safetensors`` plus
  ``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map":
  {tensor: file}}``). Tensors are assigned to shards in tree order; a tensor larger than
  the limit gets a shard of its own.
* Tensor names are the key paths joined by ``.`` (``params/encoder/layers/0/kernel`` ->
  ``params.encoder.layers.0.kernel``; list positions and integer keys in decimal). Two
  leaves whose names coincide (``{"a.b": x, "a": {"b": y}}``), a tree that is a single
  array (no name) and the name ``__metadata__`` are refused before anything is written.
* Only dtypes safetensors defines are written (bool, int8-64, uint8-64, float16/32/64,
  bfloat16, complex64, the float8 variants it knows); any other (complex128, int4,
  float8_e4m3b11fnuz, float4/float6...) is refused, naming the leaf: Hugging Face files
  must load with any safetensors reader. Typed PRNG keys are refused too.
* Non-array leaves go into every file's ``__metadata__`` (a map of strings) under their
  dotted name: strings as they are, ints, floats and bools as JSON (``"10"``, ``"0.0003"``,
  ``"true"``); bytes, complex numbers and other values are refused. ``None`` and empty
  containers have no entry. Reading the directory back gives the arrays as the tree and
  these entries (with ``"format": "pt"``) as the checkpoint's metadata.

The data streams: each piece the core reads is written (sequentially, file after file;
``pwritev`` on local disk, a streamed upload on object stores) before the next is taken,
so memory stays at the core's batch bound. Every file is fsynced, then everything
written is read back and compared with the CRC-32C of the source data.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from ckptcore.errors import CorruptCheckpointError, InvalidOptionError, PluginError, UnsupportedLeafError
from ckptcore.io import checksums
from ckptcore.plugins.registrations import ExportLeaf, ExportPiece, Location, ReadRequest
from ckptcore.tree.keys import format_key_path
from ckptcore_safetensors import fileio, header
from ckptcore_safetensors.huggingface import INDEX, SINGLE
from ckptcore_safetensors.safetensors_format import (
    DEFAULT_THREADS,
    SafetensorsFormat,
    _contiguous_bytes,
    _local_directory,
)

OPTIONS = ("max_shard_bytes", "threads")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default max_shard_size, "5GB"
VERIFY_BATCH_BYTES = 256 << 20
ARRAY_KINDS = ("ndarray", "jax_array")
BASE_METADATA = {"format": "pt"}  # what transformers' loaders expect


def shard_name(i: int, n: int) -> str:
    return SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


@dataclass
class _Tensor:
    leaf: int
    name: str
    st_dtype: str
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int
    file: int = 0
    offset: int = 0  # absolute, in its file


def _where(leaf: ExportLeaf) -> str:
    return format_key_path(leaf.path)


def plan(leaves: Sequence[ExportLeaf]) -> tuple[list[_Tensor], dict[str, str]]:
    """The tensors (in leaf order) and the ``__metadata__`` entries; refuses what a Hugging Face file cannot hold."""
    tensors: list[_Tensor] = []
    metadata: dict[str, str] = dict(BASE_METADATA)
    owner: dict[str, str] = {k: "ckptcore's own metadata" for k in metadata}
    for i, leaf in enumerate(leaves):
        name = ".".join(str(k) for k in leaf.path)
        if not leaf.path:
            raise UnsupportedLeafError("the tree is a single leaf, which has no name in a safetensors file; "
                                       "wrap it in a dict ({'weight': x}) before converting")
        if name == header.METADATA_KEY:
            raise UnsupportedLeafError(f"{_where(leaf)}: the name {name!r} is reserved by the safetensors header")
        if name in owner:
            raise UnsupportedLeafError(
                f"{_where(leaf)} and {owner[name]} both become the safetensors name {name!r} (key paths are "
                "joined by '.'); rename one of them before converting"
            )
        owner[name] = _where(leaf)
        if leaf.kind == "jax_prng_key":
            raise UnsupportedLeafError(f"{_where(leaf)} is a typed PRNG key, which safetensors cannot hold; "
                                       "store jax.random.key_data(key) instead")
        if leaf.kind in ARRAY_KINDS:
            assert leaf.shape is not None and leaf.dtype is not None
            dtype = np.dtype(leaf.dtype)
            st_dtype, _, raw = header.stored_as(dtype, tuple(leaf.shape))
            if raw:
                raise UnsupportedLeafError(
                    f"{_where(leaf)} has dtype {dtype.name}, which safetensors has no dtype for; Hugging Face files "
                    "must load with any safetensors reader. Cast it first, or keep it in ckptcore's layout "
                    "(ckptcore convert --format safetensors stores it as raw bytes)"
                )
            nbytes = math.prod(leaf.shape) * dtype.itemsize
            tensors.append(_Tensor(i, name, st_dtype, tuple(leaf.shape), dtype, nbytes))
            continue
        metadata[name] = _metadata_text(leaf)
    return tensors, metadata


def _metadata_text(leaf: ExportLeaf) -> str:
    value = leaf.value
    if leaf.kind == "str" and isinstance(value, str):
        return value
    if leaf.kind in ("int", "float", "bool") and isinstance(value, (int, float)):
        return json.dumps(value)
    if leaf.kind == "numpy_scalar" and isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return json.dumps(value.item())
    raise UnsupportedLeafError(
        f"{_where(leaf)} is a {leaf.kind} value; a safetensors file keeps only tensors and a map of strings "
        "(strings, ints, floats and bools go there): drop or convert it before converting"
    )


def assign(tensors: list[_Tensor], max_shard_bytes: int) -> int:
    """Tensors in order into shards of at most ``max_shard_bytes``; the number of shards."""
    file, size = 0, 0
    for t in tensors:
        if size and size + t.nbytes > max_shard_bytes:
            file, size = file + 1, 0
        t.file = file
        size += t.nbytes
    return file + 1


def _options(options: Mapping[str, Any]) -> tuple[int, int]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InvalidOptionError(f"unknown export option(s) {unknown} for --to safetensors; known: {list(OPTIONS)}")
    try:
        max_shard = int(options.get("max_shard_bytes", DEFAULT_MAX_SHARD_BYTES))
        threads = int(options.get("threads", DEFAULT_THREADS))
    except (TypeError, ValueError) as exc:
        raise InvalidOptionError(f"safetensors export options must be integers: {exc}") from exc
    if max_shard < 1 or threads < 1:
        raise InvalidOptionError(f"max_shard_bytes and threads must be >= 1, got {max_shard} and {threads}")
    return max_shard, threads


class _SequentialWriter:
    """Writes the shards one after the other, each from its header to its last tensor."""

    def __init__(self, location: Location, names: list[str], headers: list[bytes], threads: int) -> None:
        self.location, self.names, self.headers, self.threads = location, names, headers, threads
        self.local = _local_directory(location)
        self.current = -1
        self.fd: int | None = None
        self.stream: Any = None
        self.pos = 0
        if self.local is not None:
            os.makedirs(self.local, exist_ok=True)
        else:
            try:
                location.fs.makedirs(location.path, exist_ok=True)
            except Exception:  # object stores have no directories; some clients refuse to make one
                pass

    def _open(self, i: int) -> None:
        while self.current < i:
            self._close()
            self.current += 1
            name = self.names[self.current]
            if self.local is not None:
                self.fd = os.open(os.path.join(self.local, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            else:
                self.stream = self.location.fs.open(f"{self.location.path.rstrip('/')}/{name}", "wb")
            self.pos = 0
            self.write(memoryview(self.headers[self.current]))

    def write(self, data: memoryview) -> None:
        if not len(data):
            return
        if self.fd is not None:
            fd = self.fd
            jobs = fileio._jobs([(self.pos, data)], fileio.LOCAL_JOB_BYTES, 0, None)
            tasks: list[Callable[[], None]] = [partial(fileio._write_job, fd, job, True) for job in jobs]
            fileio._run(self.threads, tasks)
        else:
            self.stream.write(data)
        self.pos += len(data)

    def at(self, file: int, offset: int, where: str) -> None:
        self._open(file)
        if offset != self.pos:
            raise PluginError(f"converting to safetensors: the data of {where} arrived out of order "
                              f"(at byte {offset}, expected {self.pos}); report this to ckptcore's authors")

    def _close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if self.stream is not None:
            stream, self.stream = self.stream, None
            stream.close()

    def finish(self) -> None:
        self._open(len(self.names) - 1)  # shards of empty tensors only still get their header
        self._close()

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.stream is not None:
            try:  # an fsspec upload left unfinished is never completed (no partial object appears)
                getattr(self.stream, "discard", self.stream.close)()
            except Exception:
                pass
            self.stream = None


class HuggingFaceExporter:
    """The ``safetensors`` checkpoint exporter: a Hugging Face directory any safetensors reader loads."""

    def export(self, location: Location, leaves: Sequence[ExportLeaf], pieces: Iterable[ExportPiece],
               options: Mapping[str, Any]) -> dict[str, Any]:
        max_shard, threads = _options(options)
        tensors, metadata = plan(leaves)
        n = assign(tensors, max_shard)
        names = [shard_name(i, n) for i in range(n)]
        heads = []
        for i in range(n):
            members = [t for t in tensors if t.file == i]
            head, offsets = header.encode([(t.name, t.st_dtype, t.shape, t.nbytes) for t in members], metadata, 8)
            for t, off in zip(members, offsets, strict=True):
                t.offset = len(head) + off
            heads.append(head)
        by_leaf = {t.leaf: t for t in tensors}
        written: list[tuple[_Tensor, tuple[slice, ...], str]] = []  # what to verify: tensor, region, checksum
        writer = _SequentialWriter(location, names, heads, threads)
        try:
            for piece in pieces:
                found = by_leaf.get(piece.leaf)
                if found is None:
                    raise PluginError(f"converting to safetensors: data arrived for leaf {piece.leaf}, which is not an array")
                t = found
                region = tuple(slice(*s.indices(d)[:2]) for s, d in zip(piece.region, t.shape, strict=True))
                if any(s.start != 0 or s.stop != d for s, d in zip(region[1:], t.shape[1:], strict=True)):
                    raise PluginError(f"converting to safetensors: {t.name!r} arrived in a region that is not whole rows")
                row_bytes = math.prod(t.shape[1:]) * t.dtype.itemsize
                start = region[0].start * row_bytes if t.shape else 0
                writer.at(t.file, t.offset + start, repr(t.name))
                data = np.asarray(piece.data)
                if data.shape != tuple(s.stop - s.start for s in region):
                    raise PluginError(f"converting to safetensors: {t.name!r}: a piece of shape {data.shape} for region {region}")
                writer.write(_contiguous_bytes(data, t.dtype))
                written.append((t, region, checksums.checksum(data)))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        total = sum(t.nbytes for t in tensors)
        if n > 1:
            doc = {"metadata": {"total_size": total}, "weight_map": {t.name: names[t.file] for t in tensors}}
            location.fs.pipe_file(f"{location.path.rstrip('/')}/{INDEX}", json.dumps(doc, indent=2).encode())
        _verify(location, names, written)
        return {"files": names + ([INDEX] if n > 1 else []), "tensors": len(tensors), "bytes": total,
                "metadata_entries": len(metadata) - len(BASE_METADATA)}


def _verify(location: Location, names: list[str], written: list[tuple[_Tensor, tuple[slice, ...], str]]) -> None:
    """Read back every piece written (its header validated again) and compare it with the source data's checksum."""
    fmt = SafetensorsFormat()
    batch: list[tuple[_Tensor, tuple[slice, ...], str]] = []
    size = 0

    def check(batch: list[tuple[_Tensor, tuple[slice, ...], str]]) -> None:
        requests = [ReadRequest(key=t.name, shape=t.shape, saved_dtype=t.dtype, dtype=t.dtype,
                                info={"file": names[t.file], "tensor": t.name}, regions=(region,))
                    for t, region, _ in batch]
        for (t, _, crc), arrays in zip(batch, fmt.read(location, requests, {}), strict=True):
            if not checksums.matches(arrays[0], crc):
                raise CorruptCheckpointError(
                    f"converting to safetensors: {t.name!r} read back from {location.url}/{names[t.file]} differs "
                    "from the source; the destination storage corrupted it. Nothing was committed"
                )

    for item in written:
        nbytes = math.prod(s.stop - s.start for s in item[1]) * item[0].dtype.itemsize
        if batch and size + nbytes > VERIFY_BATCH_BYTES:
            check(batch)
            batch, size = [], 0
        batch.append(item)
        size += nbytes
    if batch:
        check(batch)
