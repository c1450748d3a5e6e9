"""orbax-checkpoint's tree metadata (``_METADATA``) and sharding file, as ckptcore tree nodes.

``_METADATA`` is JSON: ``{"tree_metadata": {"('a', '0')": {"key_metadata": [{"key": "a",
"key_type": 2}, {"key": "0", "key_type": 1}], "value_metadata": {"value_type": "np.ndarray",
...}}, ...}, "use_zarr3": false, ...}``. ``key_type`` 1 is a sequence index, 2 a dict key (or a
dataclass / namedtuple field: orbax stores those as dict keys too). An array leaf is stored
under its *param name*, the keys joined with ``.``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from ckptcore.errors import CorruptCheckpointError

SEQUENCE, DICT = 1, 2
ARRAY_TYPES = {"np.ndarray": "ndarray", "jax.Array": "jax_array"}
EMPTY_TYPES: dict[str, dict[str, Any]] = {"None": {"type": "none"}, "Dict": {"type": "dict", "items": []}, "List": {"type": "list", "items": []},
               "Tuple": {"type": "tuple", "items": []}, "NamedTuple": {"type": "tuple", "items": []}}
SCALAR, STRING = "scalar", "string"


@dataclass
class Leaf:
    """One leaf of the orbax tree: its key path, its param name (the storage name) and its value type."""

    path: tuple[str, ...]
    param: str
    value_type: str
    skip: bool = False
    kinds: tuple[int, ...] = ()  # SEQUENCE or DICT per key; all DICT when empty


@dataclass
class _Node:
    kind: str  # "dict" | "list"
    children: dict[str, Any] = field(default_factory=dict)


def parse(raw: bytes, url: str) -> tuple[dict[str, Any], list[Leaf]]:
    """The whole ``_METADATA`` document and its leaves, in the order they are listed."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _damaged(url, f"_METADATA is not valid JSON ({exc})") from exc
    tree = doc.get("tree_metadata") if isinstance(doc, dict) else None
    if not isinstance(tree, dict):
        raise _damaged(url, "_METADATA has no 'tree_metadata' mapping")
    leaves = []
    for name, entry in tree.items():
        try:
            keys = entry["key_metadata"]
            value = entry["value_metadata"]
            path = tuple(str(k["key"]) for k in keys)
            kinds = tuple(int(k["key_type"]) for k in keys)
            value_type = str(value["value_type"])
            skip = bool(value.get("skip_deserialize", False))
        except (KeyError, TypeError, ValueError) as exc:
            raise _damaged(url, f"_METADATA entry {name!r} is malformed ({type(exc).__name__}: {exc})") from exc
        if not path or any(k not in (SEQUENCE, DICT) for k in kinds):
            raise _damaged(url, f"_METADATA entry {name!r} has unknown key types {kinds}")
        leaves.append(Leaf(path, ".".join(path), value_type, skip, kinds))
    return doc, leaves


def build_tree(leaves: list[Leaf], leaf_node: Any, url: str) -> dict[str, Any]:
    """The ckptcore tree of ``leaves``; ``leaf_node(leaf)`` gives each leaf's node."""
    root = _Node("dict")
    for leaf in leaves:
        node = root
        kinds = leaf.kinds or (DICT,) * len(leaf.path)
        for depth, (key, kind) in enumerate(zip(leaf.path, kinds, strict=True)):
            wanted = "list" if kind == SEQUENCE else "dict"
            if node.kind != wanted:
                if node.children:
                    raise _damaged(url, f"_METADATA mixes sequence and dict keys under {'.'.join(leaf.path[:depth])!r}")
                node.kind = wanted
            if depth == len(leaf.path) - 1:
                if key in node.children:
                    raise _damaged(url, f"_METADATA lists {leaf.param!r} twice")
                node.children[key] = leaf_node(leaf)
            else:
                child = node.children.setdefault(key, _Node("dict"))
                if not isinstance(child, _Node):
                    raise _damaged(url, f"_METADATA has both a leaf and a subtree at {'.'.join(leaf.path[:depth + 1])!r}")
                node = child
    return _to_ckptcore(root, url)


def _to_ckptcore(node: Any, url: str) -> dict[str, Any]:
    if not isinstance(node, _Node):
        return node  # type: ignore[no-any-return]
    if node.kind == "list":
        try:
            indexed = sorted((int(k), v) for k, v in node.children.items())
        except ValueError as exc:
            raise _damaged(url, f"a sequence index is not an integer ({exc})") from exc
        if [i for i, _ in indexed] != list(range(len(indexed))):
            raise _damaged(url, f"sequence indices {[i for i, _ in indexed]} are not 0..n-1")
        return {"type": "list", "items": [_to_ckptcore(v, url) for _, v in indexed]}
    return {"type": "dict", "items": [
        {"key": k, "key_type": "str", "value": _to_ckptcore(v, url)} for k, v in node.children.items()
    ]}


def sharding_records(raw: bytes | None, url: str) -> dict[str, dict[str, Any]]:
    """param name -> ckptcore's logical sharding record, from orbax's ``_sharding`` file (device ids dropped)."""
    if raw is None:
        return {}
    try:
        doc = json.loads(raw)
        entries = {base64.b64decode(k).decode("utf-8"): json.loads(v) for k, v in doc.items()}
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise _damaged(url, f"_sharding is not valid ({type(exc).__name__}: {exc})") from exc
    return {param: _sharding(entry) for param, entry in entries.items() if isinstance(entry, dict)}


def _sharding(entry: dict[str, Any]) -> dict[str, Any]:
    kind = entry.get("sharding_type")
    if kind == "NamedSharding":
        names = [str(n) for n in entry.get("axis_names", [])]
        sizes = [int(n) for n in entry.get("shape", [])]
        types = [str(t).rpartition(".")[2] for t in entry.get("axis_types", [])]
        spec = [e if e is None or isinstance(e, str) else [str(x) for x in e] for e in entry.get("partition_spec", [])]
        if len(names) == len(sizes):
            return {"type": "named", "mesh": {"axis_names": names, "axis_sizes": sizes,
                                              "axis_types": types if len(types) == len(names) else []},
                    "spec": spec}
    if kind == "SingleDeviceSharding":
        return {"type": "single_device"}
    return {"type": "other"}


def _damaged(url: str, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"the orbax-checkpoint item at {url} is damaged: {why}. Restore another step, or re-save it with orbax-checkpoint"
    )
