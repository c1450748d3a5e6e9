"""Pytree nodes registered with JAX (Flax, NNX, Equinox, Optax, dataclasses...), one level at a time.

Used only when JAX is already imported (``import ckptcore`` never imports it): a value that
is not one of the core's own containers is flattened one level with ``jax.tree_util``'s
key-path API, and each child is keyed by what its key entry names: ``GetAttrKey`` -> the
field name (``"attr"``), ``DictKey`` -> the key (``"dict"``), ``SequenceKey`` and
``FlattenedIndexKey`` -> the index (``"index"``). Nodes registered without keys (and any
other key entry) are keyed by their position. Static fields live in the node's aux data
and are not children: they are never saved, and come back from a restore's target.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptcore.errors import UnsupportedLeafError
from ckptcore.tree.keys import KeyPath, format_key_path

KEY_KINDS = ("attr", "dict", "index")

# Values that are never JAX nodes: skipping the flatten call for them keeps large trees fast.
_LEAF_TYPES: frozenset[type] = frozenset({np.ndarray, bool, int, float, complex, str, bytes, bytearray})


@dataclass(frozen=True)
class FlatNode:
    """One level of a JAX pytree node: its children with their keys, and how to rebuild it."""

    type_name: str
    keys: list[str | int]
    key_kinds: list[str]
    children: list[Any]
    treedef: Any  # one level: its leaves are the children

    def unflatten(self, children: list[Any]) -> Any:
        """The node rebuilt with ``children`` in place of its own (aux data and static fields kept)."""
        return self.treedef.unflatten(children)


def type_name(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def flatten_node(value: Any, path: KeyPath = ()) -> FlatNode | None:
    """``value`` flattened one level if it is a JAX pytree node; ``None`` if it is a leaf or JAX is not imported.

    :raises UnsupportedLeafError: the node's flatten function raised, or a ``DictKey`` is
        neither ``str`` nor ``int``.
    """
    if type(value) in _LEAF_TYPES or isinstance(value, np.generic):
        return None
    jax = sys.modules.get("jax")  # None when blocked (sys.modules["jax"] = None)
    tree_util = getattr(jax, "tree_util", None) if jax is not None else None
    if tree_util is None:
        return None
    try:
        pairs, treedef = tree_util.tree_flatten_with_path(value, is_leaf=lambda x: x is not value)
    except Exception as exc:
        raise UnsupportedLeafError(
            f"the pytree node at {format_key_path(path)} ({type_name(value)}) could not be flattened: "
            f"{type(exc).__name__}: {exc}; fix its flatten function (jax.tree_util.register_pytree_node)"
        ) from exc
    if len(pairs) == 1 and not pairs[0][0] and pairs[0][1] is value:
        return None  # a leaf for JAX too: the caller encodes it (or says it is unsupported)
    keys: list[str | int] = []
    kinds: list[str] = []
    for position, (entries, _) in enumerate(pairs):
        key, kind = _key_of(entries[0] if len(entries) == 1 else None, position, value, path)
        keys.append(key)
        kinds.append(kind)
    if len(set(keys)) != len(keys):  # ambiguous keys: positions are unique
        keys, kinds = list(range(len(pairs))), ["index"] * len(pairs)
    return FlatNode(type_name(value), keys, kinds, [child for _, child in pairs], treedef)


def _key_of(entry: Any, position: int, node: Any, path: KeyPath) -> tuple[str | int, str]:
    from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

    if isinstance(entry, GetAttrKey) and isinstance(entry.name, str):
        return entry.name, "attr"
    if isinstance(entry, DictKey):
        key = entry.key
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise UnsupportedLeafError(
                f"key {key!r} of type {type(key).__name__} of the pytree node {type_name(node)} at "
                f"{format_key_path(path)} is not supported; use str or int keys"
            )
        return key, "dict"
    if isinstance(entry, SequenceKey):
        return int(entry.idx), "index"
    if isinstance(entry, FlattenedIndexKey):
        return int(entry.key), "index"
    return position, "index"  # registered without keys, or a key class of its own
