"""Reading Hugging Face safetensors files and directories as checkpoints (the ``huggingface`` layout).

What is recognised (``ckptcore.restore(path)``, ``metadata``, ``info``, ``inspect``, ``convert``):

* a file whose name ends in ``.safetensors``;
* a directory that is not a ckptcore checkpoint, holding ``model.safetensors`` (read alone,
  as transformers does), else ``model.safetensors.index.json`` (or exactly one other
  ``*.safetensors.index.json``): the ``weight_map`` names each tensor's shard, else every
  ``*.safetensors`` file in it (a tensor name in two of them is refused as ambiguous).

The tree is a flat dict keyed by tensor name (``"model.layers.0.self_attn.q_proj.weight"``),
in the files' order; :func:`nest` restores it onto a nested target, :func:`nested` nests a
restored flat dict. Only the headers are read when a checkpoint is opened: every header is
parsed and validated (length, JSON, dtypes, shapes, offsets inside the file, no overlaps),
the index's file names must be plain names inside the directory, and each tensor the index
names must be in its shard, so damaged files fail before any array is returned. The files'
``__metadata__`` (and the index's ``metadata``) become the checkpoint's metadata.
Hugging Face files carry no checksums: a flipped bit in the data cannot be detected.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ckptcore.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StorageError,
    TransformError,
    UnsupportedLeafError,
)
from ckptcore.plugins.registrations import ForeignCheckpoint, Location, ReadRequest
from ckptcore.tree.keys import storage_key
from ckptcore_safetensors import fileio, header, tensorstore_io
from ckptcore_safetensors.safetensors_format import (
    DEFAULT_READ_THREADS,
    SafetensorsFormat,
    _read_headers,
    is_safe_file_name,
)

FORMAT = "safetensors-hf"
DESCRIPTION = "Hugging Face safetensors"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
INDEX_SUFFIX = ".safetensors.index.json"
SUFFIX = ".safetensors"
CKPTCORE_INDEX = "ckptcore_index.json"
MAX_INDEX_BYTES = 64 << 20  # a weight_map of a million tensors is ~100 MB of names; real ones are < 5 MB

# safetensors dtype -> NumPy / ml_dtypes name (F4 and F6 are bit-packed: no NumPy equivalent).
DTYPES = {st: np_name for np_name, st in header.NATIVE.items()}


def _names(location: Location) -> list[str] | None:
    try:
        entries = location.fs.ls(location.path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise StorageError(f"could not list {location.url}: {exc}") from exc
    names = [str(e).rstrip("/").rpartition("/")[2] for e in entries]
    if names == [location.name] and location.fs.isfile(location.path):
        return None
    return names


def _is_file(location: Location) -> bool:
    try:
        return bool(location.fs.isfile(location.path))
    except OSError:
        return False


def _reader(location: Location) -> Any:
    from ckptcore_safetensors.safetensors_format import _local_directory

    local = _local_directory(location)
    if local is not None:
        return fileio.LocalReader(local)
    return tensorstore_io.remote_reader(location)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ckptcore-safetensors")
    except PackageNotFoundError:
        return ""


class HuggingFaceLayout:
    """The ``huggingface`` checkpoint layout: safetensors files and model directories."""

    def recognize(self, location: Location) -> bool:
        if location.path.rstrip("/").endswith(SUFFIX):
            return _is_file(location)
        names = _names(location)
        if not names or CKPTCORE_INDEX in names:
            return False
        return any(n.endswith((SUFFIX, INDEX_SUFFIX)) for n in names)

    def open(self, location: Location) -> ForeignCheckpoint:
        if location.path.rstrip("/").endswith(SUFFIX) and _is_file(location):
            base, files, index_name = location.parent(), [location.name], ""
            weight_map: dict[str, str] | None = None
            index_meta: dict[str, Any] = {}
            if not is_safe_file_name(location.name):
                raise CheckpointNotFoundError(f"{location.url}: ckptcore reads safetensors files with plain names; rename it")
        else:
            base = location
            files, weight_map, index_meta, index_name = self._plan(location, _names(location) or [])
        reader = _reader(base)
        try:
            self._check_present(reader, files, weight_map, index_name)
            headers = _read_headers(reader, files, DEFAULT_READ_THREADS)
        finally:
            reader.close()
        tensors = self._tensors(base, files, headers, weight_map, index_name)
        items, total = [], 0
        for name, (file, entry) in tensors.items():
            where = f"{reader.path(file)}: tensor {name!r}"
            np_name = DTYPES.get(entry.dtype)
            if np_name is None:
                raise UnsupportedLeafError(
                    f"{where} has dtype {entry.dtype}, which is bit-packed and has no NumPy equivalent; "
                    "ckptcore cannot read it (convert it with the safetensors library first)"
                )
            nbytes = header.BITS[entry.dtype] // 8 * math.prod(entry.shape)
            total += nbytes
            record = {"type": "leaf", "kind": "ndarray", "shape": list(entry.shape), "dtype": np_name,
                      "nbytes": nbytes, "format": FORMAT, "key": storage_key((name,)),
                      "format_info": {"file": file, "tensor": name}}
            items.append({"key": name, "key_type": "str", "value": record})
        metadata: dict[str, Any] = {}
        for file in files:
            for k, v in headers[file].metadata.items():
                metadata.setdefault(k, v)
        for k, v in index_meta.items():
            metadata.setdefault(k, v)
        index = {"tree": {"type": "dict", "items": items}, "total_bytes": total, "metadata": metadata,
                 "array_formats": {FORMAT: {"version": 1, "distribution": "ckptcore-safetensors",
                                            "plugin_version": _version()}}}
        single = base is not location
        return ForeignCheckpoint(index=index, formats={FORMAT: HuggingFaceReader(single_file=single)},
                                 description=DESCRIPTION + (" file" if single else " directory"))

    # -- which files -------------------------------------------------------------------

    def _plan(self, location: Location, names: list[str]) -> tuple[list[str], dict[str, str] | None, dict[str, Any], str]:
        """(files, weight_map or None, the index's metadata, the index's name) of a directory."""
        if SINGLE in names:
            return [SINGLE], None, {}, ""
        indexes = sorted(n for n in names if n.endswith(INDEX_SUFFIX))
        if INDEX in indexes:
            indexes = [INDEX]
        if len(indexes) > 1:
            raise CheckpointNotFoundError(
                f"{location.url} holds several safetensors indexes ({', '.join(indexes)}); restore one of its "
                "files, or a directory with one index"
            )
        if indexes:
            weight_map, meta = self._read_index(location, indexes[0])
            return sorted(set(weight_map.values())), weight_map, meta, indexes[0]
        files = sorted(n for n in names if n.endswith(SUFFIX) and is_safe_file_name(n))
        if not files:
            raise CheckpointNotFoundError(f"{location.url} holds no safetensors file with a plain name")
        return files, None, {}, ""

    def _read_index(self, location: Location, name: str) -> tuple[dict[str, str], dict[str, Any]]:
        path = f"{location.path.rstrip('/')}/{name}"
        url = f"{location.url.rstrip('/')}/{name}"
        try:
            size = int(location.fs.info(path)["size"])
            if size > MAX_INDEX_BYTES:
                raise CorruptCheckpointError(f"{url}: {size} bytes, over the {MAX_INDEX_BYTES}-byte limit for an index; it is corrupt")
            raw = location.fs.cat_file(path)
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(f"{url} disappeared while it was read") from exc
        except OSError as exc:
            raise StorageError(f"could not read {url}: {exc}") from exc
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CorruptCheckpointError(f"{url} is not valid JSON ({exc}); the index is corrupt") from exc
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptCheckpointError(f"{url} has no weight_map (tensor name -> file); the index is corrupt")
        for tensor, file in weight_map.items():
            if not is_safe_file_name(file):
                raise CorruptCheckpointError(
                    f"{url}: the weight_map names file {file!r} for tensor {tensor!r}, which is not a safetensors file "
                    f"directly inside {location.url}; the index is corrupt (or tries to escape the directory)"
                )
        meta = doc.get("metadata", {})
        if not isinstance(meta, dict):
            raise CorruptCheckpointError(f"{url}: metadata is not a JSON object; the index is corrupt")
        return weight_map, meta

    @staticmethod
    def _check_present(reader: Any, files: list[str], weight_map: dict[str, str] | None, index_name: str) -> None:
        for file in files:
            try:
                reader.open(file)
            except CorruptCheckpointError as exc:
                if weight_map is None:
                    raise
                tensor = next(t for t, f in weight_map.items() if f == file)
                raise CorruptCheckpointError(
                    f"{reader.path(file)}: missing, but {index_name} maps tensor {tensor!r} (and "
                    f"{sum(f == file for f in weight_map.values()) - 1} more) to it; the download is incomplete"
                ) from exc

    @staticmethod
    def _tensors(base: Location, files: list[str], headers: Mapping[str, header.Header], weight_map: dict[str, str] | None,
                 index_name: str) -> dict[str, tuple[str, header.TensorEntry]]:
        """tensor name -> (file, header entry), in the index's order (else file by file, in data order)."""
        out: dict[str, tuple[str, header.TensorEntry]] = {}
        if weight_map is not None:
            for tensor, file in weight_map.items():
                entry = headers[file].tensors.get(tensor)
                if entry is None:
                    raise CorruptCheckpointError(
                        f"{headers[file].file}: no tensor {tensor!r}, which {index_name} maps to this file; "
                        "the shard or the index is corrupt"
                    )
                out[tensor] = (file, entry)
            return out
        for file in files:
            for tensor, entry in sorted(headers[file].tensors.items(), key=lambda t: (t[1].start, t[1].stop)):
                if tensor in out:
                    raise CorruptCheckpointError(
                        f"{base.url}: tensor {tensor!r} is in both {out[tensor][0]} and {file}; restore one file, "
                        f"or add a {INDEX} naming each tensor's file"
                    )
                out[tensor] = (file, entry)
        return out


class HuggingFaceReader:
    """Reads the tensors of a Hugging Face layout: the safetensors format's reader, from the files' directory."""

    def __init__(self, single_file: bool = False) -> None:
        self.single_file = single_file
        self._format = SafetensorsFormat()

    def read(self, location: Location, requests: Sequence[ReadRequest], options: Mapping[str, Any]) -> list[list[np.ndarray]]:
        if self.single_file:  # the checkpoint's location is the file; its tensors are read from its directory
            location = location.parent()
        return self._format.read(location, requests, {k: v for k, v in options.items() if k == "threads"})


# -- nesting ---------------------------------------------------------------------------


def nest(source: Any, *, sep: str = ".", storage_options: Mapping[str, Any] | None = None, **transforms: Any) -> Any:
    """``ckptcore.Transforms`` that restore the flat tensor names of ``source`` onto a nested target.

    ``source`` is the checkpoint's path (its headers are read) or its flat tree (e.g.
    ``ckptcore.metadata(path)``). Each name is split at ``sep``: ``model.layers.0.weight``
    restores onto the target's ``["model"]["layers"][0]["weight"]`` (a list or a dict with key
    ``"0"``, whatever the target holds), with its dtype and sharding::

        params = ckptcore.restore("hf-model/", target=abstract, transforms=ckptcore_safetensors.nest("hf-model/"))

    Other keyword arguments go to ``ckptcore.Transforms`` (``missing``, ``value_fn`` on the
    nested key paths, ``fallback_sharding``...); ``rename`` patterns you pass are tried first,
    on the saved (dotted) names, and a name they match is not split.
    """
    import ckptcore

    if not isinstance(sep, str) or not sep or "/" in sep or "\\" in sep:
        raise TransformError(f"nest: sep must be a non-empty string without '/' or '\\', got {sep!r}")
    names = _flat_names(ckptcore.metadata(source, storage_options=storage_options) if not isinstance(source, Mapping)
                        else source)
    counts = sorted({n.count(sep) for n in names} - {0})
    part, esc = f"((?:(?!{re.escape(sep)}).)*)", re.escape(sep)
    rules = {f"^{esc.join([part] * (c + 1))}$": "/".join(f"\\g<{i + 1}>" for i in range(c + 1)) for c in counts}
    user = dict(transforms.pop("rename", {}) or {})
    return ckptcore.Transforms(rename={**user, **rules}, **transforms)


def _flat_names(tree: Any) -> list[str]:
    if not isinstance(tree, Mapping) or not all(isinstance(k, str) for k in tree):
        raise TransformError("nest: expected a flat dict of tensor names (what ckptcore.metadata of a safetensors file gives)")
    return list(tree)


def nested(tree: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """A flat dict of tensor names as nested dicts: ``{"a.b": x, "a.c": y}`` -> ``{"a": {"b": x, "c": y}}``.

    For restores without a target (``nested(ckptcore.restore(path))``) and for metadata.
    Keys stay strings (``"0"`` too). A name that is both a tensor and a prefix of another
    (``"a"`` and ``"a.b"``) is a ``TransformError``.
    """
    out: dict[str, Any] = {}
    containers = {id(out)}  # the dicts made here, told apart from dict-valued leaves
    for name, value in tree.items():
        parts = str(name).split(sep)
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not child:
                containers.add(id(child))
            if id(child) not in containers:
                raise TransformError(f"nested: {sep.join(parts[:depth + 1])!r} is a tensor and a prefix of {name!r}")
            node = child
        if parts[-1] in node:
            raise TransformError(f"nested: {name!r} is a prefix of another tensor name (or a duplicate)")
        node[parts[-1]] = value
    return out


__all__ = ["HuggingFaceLayout", "HuggingFaceReader", "nest", "nested"]
