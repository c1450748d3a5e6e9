"""Recognising orbax-checkpoint items and steps, and describing them as ckptcore indexes.

An orbax item (what ``PyTreeCheckpointer`` / ``StandardCheckpointer`` write, and each item
directory of a ``CheckpointManager`` step)::

    _METADATA              the tree: key paths, key types, value types (JSON)
    _sharding              param name (base64) -> the sharding it was saved with (JSON)
    _strings.json          param name -> string leaves
    array_metadatas/       per process: write shapes, typed PRNG key implementations
    manifest.ocdbt         the OCDBT database (merged over ocdbt.process_<i>/), or
    <param>/.zarray ...    one zarr (or zarr3: zarr.json) array per leaf without OCDBT
    checkpoint             older releases: the tree as msgpack, small leaves inline
    commit_success.txt     the commit marker on object stores
    _CHECKPOINT_METADATA   commit time, metrics, custom metadata (also per step)

A step of an orbax ``CheckpointManager`` root is ``<root>/<step>/`` with
``_CHECKPOINT_METADATA``, one subdirectory per item and, with ``best_fn``, ``metrics/metrics``.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ckptcore.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NotCommittedError,
    StorageError,
    UnsupportedLeafError,
)
from ckptcore.plugins.registrations import ForeignCheckpoint, ForeignStep, Location, ReadRequest
from ckptcore.tree.dtypes import dtype_name
from ckptcore.tree.keys import storage_key
from ckptcore_orbax import legacy, tree_metadata
from ckptcore_orbax.tree_metadata import ARRAY_TYPES, EMPTY_TYPES, SCALAR, STRING, Leaf

METADATA = "_METADATA"
SHARDING = "_sharding"
STRINGS = "_strings.json"
ARRAY_METADATAS = "array_metadatas"
MANIFEST = "manifest.ocdbt"
COMMIT = "commit_success.txt"
STEP_METADATA = "_CHECKPOINT_METADATA"
METRICS_DIR = "metrics"
JSON_ITEM_FILE = "metadata"  # what orbax's JsonCheckpointHandler writes
TMP_MARK = ".orbax-checkpoint-tmp"
MSGPACK_FORMAT = "orbax_msgpack"
DESCRIPTION = "orbax-checkpoint layout"
# Trailing key-data dimensions of each typed PRNG key implementation.
KEY_DATA_DIMS = {"threefry2x32": 1, "rbg": 1, "unsafe_rbg": 1}


def _names(location: Location) -> list[str] | None:
    """The entry names in ``location``, or ``None`` when it is not a directory."""
    fs = location.fs
    try:
        fs.invalidate_cache(location.path)
        entries = fs.ls(location.path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise StorageError(f"could not list {location.url}: {exc}") from exc
    names = [str(e).rstrip("/").rpartition("/")[2] for e in entries]
    if names == [location.name] and fs.isfile(location.path):
        return None
    return names


def _read(location: Location, name: str) -> bytes | None:
    try:
        return location.fs.cat_file(f"{location.path.rstrip('/')}/{name}")  # type: ignore[no-any-return]
    except (FileNotFoundError, IsADirectoryError):
        return None
    except OSError as exc:
        raise StorageError(f"could not read {location.url}/{name}: {exc}") from exc


def _is_item(names: Sequence[str]) -> bool:
    return METADATA in names or legacy.FILE in names or MANIFEST in names


def _on_object_store(location: Location) -> bool:
    return location.address.scheme != "file"


class OrbaxLayout:
    """The ``orbax`` checkpoint layout: items (``open``) and manager steps (``open_step``)."""

    def recognize(self, location: Location) -> bool:
        names = _names(location)
        if not names:
            return False
        return _is_item(names) or (STEP_METADATA in names and METADATA not in names)

    # -- one item ----------------------------------------------------------------------

    def open(self, location: Location) -> ForeignCheckpoint:
        names = _names(location) or []
        url = location.url
        if TMP_MARK in location.name or TMP_MARK in location.parent().name:
            raise NotCommittedError(
                f"{url} is an orbax-checkpoint save that never finished (its directory's name has {TMP_MARK}); "
                "restore a committed checkpoint instead, or remove this directory if no save is running"
            )
        if not _is_item(names):
            items = sorted(n for n in names if not n.startswith((".", "_")) and n != METRICS_DIR)
            raise CheckpointNotFoundError(
                f"{url} is a step of an orbax-checkpoint CheckpointManager, not one item; restore one of its items "
                f"({', '.join(f'{url}/{n}' for n in items) or 'none found'}), or open the root with "
                f"ckptcore.CheckpointManager({location.parent().url!r})"
            )
        if _on_object_store(location) and COMMIT not in names and not self._parent_committed(location):
            raise NotCommittedError(
                f"{url} has no {COMMIT}: this orbax-checkpoint save never finished (on object stores orbax writes "
                "that marker last). Restore a committed checkpoint, or delete this one"
            )
        ocdbt = MANIFEST in names or any(n.startswith("ocdbt.process_") for n in names)
        if ocdbt and MANIFEST not in names:
            raise CorruptCheckpointError(
                f"the orbax-checkpoint item at {url} is damaged: its OCDBT database has no {MANIFEST} (only "
                "per-process ocdbt.process_* parts: the save was interrupted before the merge). Restore another step"
            )
        raw = _read(location, METADATA)
        if raw is None:
            return self._open_legacy(location, names, ocdbt)
        doc, leaves = tree_metadata.parse(raw, url)
        ocdbt = ocdbt or bool(doc.get("use_ocdbt", False))
        zarr3 = bool(doc.get("use_zarr3", False))
        if ocdbt and MANIFEST not in names:
            raise CorruptCheckpointError(
                f"the orbax-checkpoint item at {url} is damaged: _METADATA says OCDBT, but {MANIFEST} is missing. "
                "Restore another step"
            )
        builder = _Builder(location, ocdbt=ocdbt, zarr3=zarr3)
        builder.load(leaves, names)
        tree = tree_metadata.build_tree(leaves, builder.node, url)
        custom = doc.get("custom_metadata")
        return self._checkpoint(location, tree, builder, custom if isinstance(custom, dict) else {})

    def _parent_committed(self, location: Location) -> bool:
        parent = location.parent()
        return _read(parent, COMMIT) is not None

    def _checkpoint(self, location: Location, tree: dict[str, Any], builder: _Builder, custom: dict[str, Any]) -> ForeignCheckpoint:
        index: dict[str, Any] = {"tree": tree, "total_bytes": builder.total_bytes, "metadata": custom,
                                 "array_formats": {name: {"version": 1, "distribution": "ckptcore-orbax", "plugin_version": _version()}
                                                  for name in builder.formats}}
        step_meta = _step_metadata(location) or _step_metadata(location.parent())
        when = _commit_time(step_meta)
        if when is not None:
            index["created"] = datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat()
        from ckptcore_orbax.arrays import FORMAT, OrbaxArrays

        formats: dict[str, Any] = {FORMAT: OrbaxArrays(), MSGPACK_FORMAT: MsgpackArrays()}
        return ForeignCheckpoint(index=index, formats={k: v for k, v in formats.items() if k in builder.formats},
                                 description=DESCRIPTION)

    def _open_legacy(self, location: Location, names: list[str], ocdbt: bool) -> ForeignCheckpoint:
        url = location.url
        raw = _read(location, legacy.FILE)
        if raw is None:
            raise CorruptCheckpointError(
                f"the orbax-checkpoint item at {url} is damaged: it has neither {METADATA} nor the msgpack "
                f"'{legacy.FILE}' file that describe its tree. Restore another step"
            )
        data = legacy.decode(raw, url)
        if not isinstance(data, dict):
            raise CorruptCheckpointError(f"the msgpack '{legacy.FILE}' file at {url} does not hold a tree (a mapping)")
        builder = _Builder(location, ocdbt=ocdbt, zarr3=False)
        leaves: list[Leaf] = []
        values: dict[tuple[str, ...], Any] = {}

        def walk(node: Any, path: tuple[str, ...]) -> None:
            if isinstance(node, dict) and node:
                for k, v in node.items():
                    walk(v, (*path, str(k)))
                return
            param = legacy.placeholder_param(node)
            if param is not None:
                leaves.append(Leaf(path, param, "np.ndarray"))
            elif isinstance(node, dict):
                leaves.append(Leaf(path, ".".join(path), "Dict"))
            elif node is None:
                leaves.append(Leaf(path, ".".join(path), "None"))
            else:
                leaves.append(Leaf(path, ".".join(path), "inline"))
                values[path] = node

        walk(data, ())
        builder.load(leaves, names, inline=values)
        tree = tree_metadata.build_tree(leaves, builder.node, url)
        return self._checkpoint(location, tree, builder, {})

    # -- one step of a manager root ----------------------------------------------------

    def open_step(self, location: Location) -> ForeignStep | None:
        names = _names(location)
        if not names or _is_item(names):
            return None
        committed = TMP_MARK not in location.name and (not _on_object_store(location) or COMMIT in names)
        items: dict[str, dict[str, Any]] = {}
        for name in names:
            if name.startswith((".", "_")) or name == METRICS_DIR or name == COMMIT or TMP_MARK in name:
                continue
            inside = _names(location.child(name))
            if inside is None:
                continue
            if _is_item(inside):
                items[name] = {"kind": "pytree", "layout": "orbax"}
            elif JSON_ITEM_FILE in inside:
                items[name] = {"kind": "json", "file": JSON_ITEM_FILE}
        meta = _step_metadata(location) if STEP_METADATA in names else None
        if meta is None and not items:
            return None
        metrics: Any = None
        if METRICS_DIR in names:
            raw = _read(location.child(METRICS_DIR), "metrics")
            if raw is not None:
                try:
                    metrics = json.loads(raw)
                except ValueError:
                    metrics = None
        if metrics is None and meta is not None and isinstance(meta.get("metrics"), dict) and meta["metrics"]:
            metrics = meta["metrics"]
        return ForeignStep(items=items, metrics=metrics if isinstance(metrics, dict) else None,
                           commit_time=_commit_time(meta), committed=committed, description=DESCRIPTION)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ckptcore-orbax")
    except PackageNotFoundError:
        return ""


def _step_metadata(location: Location) -> dict[str, Any] | None:
    raw = _read(location, STEP_METADATA)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _commit_time(meta: Mapping[str, Any] | None) -> float | None:
    if not meta:
        return None
    nsecs = meta.get("commit_timestamp_nsecs") or meta.get("init_timestamp_nsecs")
    return int(nsecs) / 1e9 if isinstance(nsecs, (int, float)) and not isinstance(nsecs, bool) else None


def _inline(value: Any, where: str) -> dict[str, Any]:
    """A scalar or string as ckptcore's inline leaf record (what orbax restores: a Python scalar)."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return {"type": "leaf", "kind": "bool", "value": value}
    if isinstance(value, int):
        return {"type": "leaf", "kind": "int", "value": value}
    if isinstance(value, float):
        return {"type": "leaf", "kind": "float", "value": value.hex()}
    if isinstance(value, complex):
        return {"type": "leaf", "kind": "complex", "value": [value.real.hex(), value.imag.hex()]}
    if isinstance(value, str):
        return {"type": "leaf", "kind": "str", "value": value}
    if isinstance(value, bytes):
        return {"type": "leaf", "kind": "bytes", "value": base64.b64encode(value).decode("ascii")}
    raise UnsupportedLeafError(
        f"the orbax-checkpoint leaf {where} holds a {type(value).__name__}, which ckptcore cannot represent; "
        "restore it with orbax-checkpoint and re-save it as arrays, scalars or strings"
    )


class _Builder:
    """Turns the leaves of an orbax item into ckptcore leaf records (array metadata read in one batch)."""

    def __init__(self, location: Location, *, ocdbt: bool, zarr3: bool) -> None:
        self.location, self.ocdbt, self.zarr3 = location, ocdbt, zarr3
        self.records: dict[str, dict[str, Any]] = {}
        self.formats: set[str] = set()
        self.total_bytes = 0

    def load(self, leaves: list[Leaf], names: Sequence[str], inline: Mapping[tuple[str, ...], Any] | None = None) -> None:
        from ckptcore_orbax import arrays

        url = self.location.url
        inline = inline or {}
        unknown = [lf for lf in leaves if lf.value_type not in (*ARRAY_TYPES, *EMPTY_TYPES, SCALAR, STRING, "inline")]
        if unknown:
            shown = ", ".join(f"{'.'.join(lf.path)!r} ({lf.value_type})" for lf in unknown[:5])
            raise UnsupportedLeafError(
                f"the orbax-checkpoint item at {url} holds leaves of types ckptcore cannot represent: {shown}"
                f"{' ...' if len(unknown) > 5 else ''}. They were written by a custom orbax TypeHandler; restore "
                "them with orbax-checkpoint and re-save them as arrays, scalars or strings"
            )
        stored = [lf for lf in leaves if lf.value_type in (*ARRAY_TYPES, SCALAR) and not lf.skip]
        try:
            meta = arrays.read_array_metadata(self.location, [lf.param for lf in stored], ocdbt=self.ocdbt, zarr3=self.zarr3)
        except CorruptCheckpointError:
            raise
        except Exception as exc:
            raise CorruptCheckpointError(
                f"the orbax-checkpoint item at {url} is damaged: reading its array metadata failed "
                f"({type(exc).__name__}: {exc}). Restore another step"
            ) from exc
        shardings = tree_metadata.sharding_records(_read(self.location, SHARDING), url) if any(
            lf.value_type == "jax.Array" for lf in stored) else {}
        key_impls = self._key_impls(names)
        strings: dict[str, Any] = {}
        if any(lf.value_type == STRING for lf in leaves):
            raw = _read(self.location, STRINGS)
            try:
                strings = json.loads(raw) if raw is not None else {}
            except ValueError as exc:
                raise CorruptCheckpointError(f"the orbax-checkpoint item at {url} is damaged: {STRINGS} is not JSON") from exc
        scalars = [lf.param for lf in stored if lf.value_type == SCALAR]
        values = arrays.read_whole(self.location, {p: self._info(p) for p in scalars}) if scalars else {}
        for lf in leaves:
            where = f"{'.'.join(lf.path)!r} of {url}"
            if lf.value_type in EMPTY_TYPES or (lf.skip and lf.value_type not in (STRING,)):
                empty: dict[str, Any] = EMPTY_TYPES.get(lf.value_type, {"type": "none"})
                self.records[lf.param] = dict(empty)
            elif lf.value_type == "inline":
                value = inline[lf.path]
                if isinstance(value, np.ndarray) and value.shape != ():
                    self.records[lf.param] = self._msgpack_record(lf, value)
                else:
                    self.records[lf.param] = _inline(value, where)
            elif lf.value_type == STRING:
                if lf.param not in strings:
                    raise CorruptCheckpointError(f"the orbax-checkpoint string leaf {where} is missing from {STRINGS}")
                self.records[lf.param] = _inline(str(strings[lf.param]), where)
            elif lf.value_type == SCALAR:
                self.records[lf.param] = _inline(values[lf.param], where)
            else:
                shape, dtype = meta[lf.param]
                self.records[lf.param] = self._array_record(lf, shape, dtype, shardings.get(lf.param), key_impls.get(lf.param))

    def _info(self, param: str) -> dict[str, Any]:
        return {"param": param, "ocdbt": self.ocdbt, "zarr3": self.zarr3}

    def _key_impls(self, names: Sequence[str]) -> dict[str, str]:
        """param -> PRNG key implementation, from ``array_metadatas/process_*`` (typed keys only)."""
        if ARRAY_METADATAS not in names:
            return {}
        folder = self.location.child(ARRAY_METADATAS)
        out: dict[str, str] = {}
        for name in _names(folder) or []:
            raw = _read(folder, name)
            try:
                doc = json.loads(raw or b"{}")
                for entry in doc.get("array_metadatas", []):
                    meta = entry.get("array_metadata", {})
                    impl = (meta.get("ext_metadata") or {}).get("random_key_impl")
                    if impl:
                        out[str(meta["param_name"])] = str(impl)
            except (ValueError, AttributeError, KeyError, TypeError) as exc:
                raise CorruptCheckpointError(
                    f"the orbax-checkpoint item at {self.location.url} is damaged: {ARRAY_METADATAS}/{name} is not valid"
                ) from exc
        return out

    def _array_record(self, lf: Leaf, shape: tuple[int, ...], dtype: np.dtype, sharding: Any, impl: str | None) -> dict[str, Any]:
        from ckptcore_orbax.arrays import FORMAT

        nbytes = math.prod(shape) * dtype.itemsize
        self.total_bytes += nbytes
        self.formats.add(FORMAT)
        record: dict[str, Any] = {
            "type": "leaf", "kind": ARRAY_TYPES[lf.value_type], "shape": list(shape), "dtype": dtype_name(dtype),
            "nbytes": nbytes, "format": FORMAT, "key": storage_key(lf.path), "format_info": self._info(lf.param),
        }
        if lf.value_type == "jax.Array":
            record["sharding"] = sharding or {"type": "single_device"}
        if impl is not None:
            dims = KEY_DATA_DIMS.get(impl, 1)
            record |= {"kind": "jax_prng_key", "prng_impl": impl, "key_shape": list(shape[: len(shape) - dims])}
        return record

    def _msgpack_record(self, lf: Leaf, value: np.ndarray) -> dict[str, Any]:
        self.total_bytes += int(value.nbytes)
        self.formats.add(MSGPACK_FORMAT)
        return {"type": "leaf", "kind": "ndarray", "shape": list(value.shape), "dtype": dtype_name(value.dtype),
                "nbytes": int(value.nbytes), "format": MSGPACK_FORMAT, "key": storage_key(lf.path),
                "format_info": {"path": list(lf.path)}}

    def node(self, lf: Leaf) -> dict[str, Any]:
        return self.records[lf.param]


class MsgpackArrays:
    """Reads arrays kept inline in the msgpack ``checkpoint`` file (older orbax releases)."""

    def read(self, location: Location, requests: Sequence[ReadRequest], options: Mapping[str, Any]) -> list[list[np.ndarray]]:
        raw = _read(location, legacy.FILE)
        if raw is None:
            raise CorruptCheckpointError(f"the msgpack '{legacy.FILE}' file of {location.url} disappeared")
        tree = legacy.decode(raw, location.url)
        out = []
        for r in requests:
            whole = np.asarray(legacy.leaf_at(tree, list(r.info["path"])))
            out.append([np.array(whole[region], dtype=r.dtype, order="C") for region in r.regions])
        return out
