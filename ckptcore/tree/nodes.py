"""Pytrees <-> the JSON tree stored in the index.

The stored tree keeps the exact structure: dicts with their key types and order, lists,
tuples, namedtuples (by name and fields), ``None`` and empty containers. Scalars and
strings are stored inline; arrays are stored by the array formats and appear in the
tree as records that point at them.

When JAX is imported, any other pytree node it can flatten (a Flax ``TrainState``, an NNX
``State``, an Equinox module, a registered dataclass...) is stored as a ``"node"``: its
children keyed by field name, dict key or index (see :mod:`ckptcore.tree.pytrees`), and
its type name for display only. Nothing named in a checkpoint is ever imported.
"""

from __future__ import annotations

import base64
import collections
import keyword
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ckptcore.errors import CorruptCheckpointError, UnsupportedLeafError
from ckptcore.tree.keys import KeyPath, format_key_path
from ckptcore.tree.pytrees import KEY_KINDS, flatten_node

Node = dict[str, Any]
ARRAY_KINDS = ("ndarray", "jax_array", "jax_prng_key")


def is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def encode_tree(tree: Any, encode_leaf: Callable[[KeyPath, Any], Node], path: KeyPath = ()) -> Node:
    """The JSON node of ``tree``; ``encode_leaf`` turns each non-container into a record."""
    if tree is None:
        return {"type": "none"}
    if isinstance(tree, dict):
        items = []
        for key, value in tree.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise UnsupportedLeafError(
                    f"dict key {key!r} of type {type(key).__name__} at {format_key_path(path)} is not "
                    "supported; use str or int keys"
                )
            items.append(
                {"key": key, "key_type": "int" if isinstance(key, int) else "str",
                 "value": encode_tree(value, encode_leaf, (*path, key))}
            )
        return {"type": "dict", "items": items}
    if is_namedtuple(tree):
        return {
            "type": "namedtuple",
            "name": type(tree).__name__,
            "fields": list(type(tree)._fields),
            "items": [encode_tree(v, encode_leaf, (*path, f)) for f, v in zip(type(tree)._fields, tree, strict=True)],
        }
    if type(tree) in (list, tuple):
        kind = "list" if isinstance(tree, list) else "tuple"
        return {"type": kind, "items": [encode_tree(v, encode_leaf, (*path, i)) for i, v in enumerate(tree)]}
    flat = flatten_node(tree, path)
    if flat is not None:
        return {
            "type": "node",
            "node_type": flat.type_name,
            "items": [
                {"key": key, "key_kind": kind, "value": encode_tree(child, encode_leaf, (*path, key))}
                for key, kind, child in zip(flat.keys, flat.key_kinds, flat.children, strict=True)
            ],
        }
    record = encode_leaf(path, tree)  # kept by identity: array records are completed after writing
    record["type"] = "leaf"
    return record


def iter_leaves(node: Node, path: KeyPath = ()) -> Iterator[tuple[KeyPath, Node]]:
    """Every leaf record of a stored tree with its key path, in tree order."""
    kind = node.get("type")
    if kind == "leaf":
        yield path, node
    elif kind in ("dict", "node"):
        for item in node["items"]:
            yield from iter_leaves(item["value"], (*path, item["key"]))
    elif kind == "namedtuple":
        for name, child in zip(node["fields"], node["items"], strict=True):
            yield from iter_leaves(child, (*path, name))
    elif kind in ("list", "tuple"):
        for i, child in enumerate(node["items"]):
            yield from iter_leaves(child, (*path, i))


def children(node: Node) -> list[tuple[str | int, Node]]:
    """The (key, child) pairs of a container node."""
    kind = node["type"]
    if kind in ("dict", "node"):
        return [(item["key"], item["value"]) for item in node["items"]]
    if kind == "namedtuple":
        return list(zip(node["fields"], node["items"], strict=True))
    if kind in ("list", "tuple"):
        return list(enumerate(node["items"]))
    return []


def build_container(node: Node, values: list[tuple[str | int, Any]], path: KeyPath) -> Any:
    """The Python container a stored node describes, filled with ``values``.

    A pytree ``"node"`` (whose class is never imported) becomes a list when all its
    children are index-keyed, else a dict keyed by its field names or dict keys.
    """
    kind = node["type"]
    if kind == "dict":
        return {k: v for k, v in values}
    if kind == "node":
        return [v for _, v in values] if is_index_keyed(node) else {k: v for k, v in values}
    if kind == "list":
        return [v for _, v in values]
    if kind == "tuple":
        return tuple(v for _, v in values)
    if kind == "namedtuple":
        return _namedtuple_class(node, path)(*(v for _, v in values))
    raise CorruptCheckpointError(f"unknown node type {kind!r} at {format_key_path(path)} in checkpoint index")


def is_index_keyed(node: Node) -> bool:
    """Whether a stored pytree node's children are all keyed by index (it restores as a list)."""
    items = node["items"]
    return bool(items) and all(item["key_kind"] == "index" for item in items)


def _namedtuple_class(node: Node, path: KeyPath) -> type:
    # Rebuilt from plain identifiers only (never imported), so nothing from the file runs.
    name, fields = node.get("name", "NamedTuple"), node.get("fields", [])
    ok = isinstance(fields, list) and all(
        isinstance(f, str) and f.isidentifier() and not keyword.iskeyword(f) for f in fields
    )
    if not ok or not isinstance(name, str):
        raise CorruptCheckpointError(f"invalid namedtuple description at {format_key_path(path)}")
    safe_name = name if name.isidentifier() and not keyword.iskeyword(name) else "NamedTuple"
    try:
        return collections.namedtuple(safe_name, fields)  # type: ignore[misc]
    except (TypeError, ValueError) as exc:  # duplicate or underscore-prefixed fields
        raise CorruptCheckpointError(f"invalid namedtuple description at {format_key_path(path)}: {exc}") from exc


# -- inline leaves --------------------------------------------------------------------


def encode_scalar(path: KeyPath, value: Any) -> Node | None:
    """The inline record of a Python or NumPy scalar, string or bytes; ``None`` if not one."""
    if isinstance(value, bool) and not isinstance(value, np.generic):
        return {"kind": "bool", "value": value}
    if isinstance(value, int):
        return {"kind": "int", "value": int(value)}
    if isinstance(value, float) and not isinstance(value, np.generic):
        return {"kind": "float", "value": float(value).hex()}
    if isinstance(value, complex) and not isinstance(value, np.generic):
        return {"kind": "complex", "value": [value.real.hex(), value.imag.hex()]}
    if isinstance(value, str):
        return {"kind": "str", "value": value}
    if isinstance(value, (bytes, bytearray)):
        return {"kind": "bytes", "value": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, np.generic):
        from ckptcore.tree.dtypes import dtype_name, is_supported_array_dtype

        if not is_supported_array_dtype(value.dtype):
            raise UnsupportedLeafError(
                f"NumPy scalar of dtype {value.dtype} at {format_key_path(path)} is not supported"
            )
        data = np.asarray(value).astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
        return {"kind": "numpy_scalar", "dtype": dtype_name(value.dtype), "value": base64.b64encode(data).decode()}
    from ckptcore.tree.numpy_random import encode_generator

    return encode_generator(path, value)


def decode_scalar(path: KeyPath, record: Node) -> Any:
    """The value of an inline record."""
    kind = record.get("kind")
    value: Any = record.get("value")
    if kind == "numpy_generator":
        from ckptcore.tree.numpy_random import decode_generator

        return decode_generator(path, record)
    try:
        if kind in ("bool", "int", "str"):
            expected = {"bool": bool, "int": int, "str": str}[kind]
            if not isinstance(value, expected):
                raise TypeError(f"expected {kind}")
            return value
        if kind == "float":
            return float.fromhex(value)
        if kind == "complex":
            return complex(float.fromhex(value[0]), float.fromhex(value[1]))
        if kind == "bytes":
            return base64.b64decode(value, validate=True)
        if kind == "numpy_scalar":
            from ckptcore.tree.dtypes import dtype_from_name

            dtype = dtype_from_name(record["dtype"])
            return np.frombuffer(base64.b64decode(value, validate=True), dtype=dtype.newbyteorder("<"))[0].astype(dtype)
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise CorruptCheckpointError(
            f"the {kind} value stored at {format_key_path(path)} is malformed ({exc}); the index is corrupt"
        ) from exc
    raise CorruptCheckpointError(f"unknown leaf kind {kind!r} at {format_key_path(path)} in the checkpoint index")


# -- validation of a tree read from an index ------------------------------------------------


def validate_tree(node: Any, path: KeyPath = ()) -> None:
    """Check the structure of a stored tree, so later walks meet only well-formed nodes.

    Called on every index read: a tampered or corrupt index fails here with its key path
    instead of with a ``KeyError`` somewhere in a restore.
    """
    stack: list[tuple[Any, KeyPath]] = [(node, path)]
    while stack:
        node, path = stack.pop()
        kind = node.get("type") if isinstance(node, dict) else None
        if kind in ("none", "leaf"):
            if kind == "leaf" and node.get("kind") in ARRAY_KINDS:
                _validate_array_record(node, path)
            continue
        items = node.get("items") if isinstance(node, dict) else None
        if kind not in ("dict", "list", "tuple", "namedtuple", "node") or not isinstance(items, list):
            raise CorruptCheckpointError(
                f"malformed tree node (type {kind!r}) at {format_key_path(path)} in the checkpoint index; "
                "the index is corrupt or was written by a newer ckptcore (pip install -U ckptcore)"
            )
        if kind == "dict":
            for item in items:
                entry: dict[str, Any] = item if isinstance(item, dict) else {}
                key, key_type = entry.get("key"), entry.get("key_type")
                ok = (key_type == "int" and isinstance(key, int) and not isinstance(key, bool)) or (
                    key_type == "str" and isinstance(key, str)
                )
                if not ok or "value" not in entry:
                    raise CorruptCheckpointError(f"malformed dict entry at {format_key_path(path)} in the checkpoint index")
                stack.append((entry["value"], (*path, key)))  # type: ignore[arg-type]  # key checked above
            continue
        if kind == "node":
            _validate_node(node, items, path)
            stack.extend((item["value"], (*path, item["key"])) for item in items)
            continue
        if kind == "namedtuple":
            _namedtuple_class(node, path)  # raises on fields that are not plain identifiers
            if len(node["fields"]) != len(items):
                raise CorruptCheckpointError(f"invalid namedtuple description at {format_key_path(path)}")
            stack.extend((child, (*path, name)) for name, child in zip(node["fields"], items, strict=True))
            continue
        stack.extend((child, (*path, i)) for i, child in enumerate(items))


def _validate_node(node: Node, items: list[Any], path: KeyPath) -> None:
    where = format_key_path(path)
    if not isinstance(node.get("node_type"), str):
        raise CorruptCheckpointError(f"the pytree node at {where} in the checkpoint index has no node_type; the index is corrupt")
    keys = set()
    for item in items:
        entry: dict[str, Any] = item if isinstance(item, dict) else {}
        key, kind = entry.get("key"), entry.get("key_kind")
        ok = kind in KEY_KINDS and "value" in entry and not isinstance(key, bool) and (
            (kind == "attr" and isinstance(key, str))
            or (kind == "index" and isinstance(key, int))
            or (kind == "dict" and isinstance(key, (str, int)))
        )
        if not ok:
            raise CorruptCheckpointError(
                f"malformed child {key!r} (key_kind {kind!r}) of the pytree node at {where} in the checkpoint index; "
                "the index is corrupt or was written by a newer ckptcore (pip install -U ckptcore)"
            )
        if key in keys:
            raise CorruptCheckpointError(f"the pytree node at {where} has the key {key!r} twice; the index is corrupt")
        keys.add(key)


def _validate_array_record(record: Node, path: KeyPath) -> None:
    shape, dtype, nbytes = record.get("shape"), record.get("dtype"), record.get("nbytes")
    ok = (
        isinstance(shape, list)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        and isinstance(dtype, str)
        and isinstance(nbytes, int)
    )
    if not ok:
        raise CorruptCheckpointError(
            f"the array record of {format_key_path(path)} in the checkpoint index is malformed "
            "(shape, dtype or nbytes); the index is corrupt"
        )
