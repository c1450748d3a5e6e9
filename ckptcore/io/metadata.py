"""What a checkpoint's index says, as Python objects: no array data is read."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptcore.tree.dtypes import dtype_from_name
from ckptcore.tree.keys import KeyPath
from ckptcore.tree.nodes import ARRAY_KINDS, Node, build_container, children, decode_scalar, is_index_keyed


@dataclass(frozen=True)
class ArrayMetadata:
    """What the index says about an array leaf (no array data is read)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int
    format: str
    kind: str = "ndarray"
    sharding: Mapping[str, Any] | None = None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)


class NodeMetadata(dict):  # type: ignore[type-arg]
    """The metadata of a saved JAX pytree node (a Flax ``TrainState``, an Equinox module...).

    A plain ``dict`` keyed by the node's field names or dict keys, like a restore without a
    target returns, plus ``node_type``: the saved class's name, for display only (it is
    never imported).
    """

    node_type: str = ""

    def __init__(self, *args: Any, node_type: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.node_type = node_type


class NodeMetadataList(list):  # type: ignore[type-arg]
    """The metadata of a saved index-keyed JAX pytree node: a plain ``list`` plus ``node_type`` (display only)."""

    node_type: str = ""

    def __init__(self, *args: Any, node_type: str = "") -> None:
        super().__init__(*args)
        self.node_type = node_type


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint as a whole: its tree of metadata plus what the index says about it."""

    url: str
    tree: Any
    created: str
    total_bytes: int
    format_version: int
    ckptcore_version: str
    array_formats: Mapping[str, Any]
    metadata: Mapping[str, Any]
    plugin_metadata: Mapping[str, Any]
    leaves: list[tuple[str, Node]]
    stored_tree: Node  # the tree exactly as the index stores it (plain JSON)
    layout: str = "ckptcore"  # or the name of the checkpoint-layout plugin that read it ("orbax"...)
    layout_description: str = "ckptcore layout"


def metadata_tree(doc: dict[str, Any]) -> Any:
    """The metadata tree of an index already read."""
    return _metadata_tree(doc["tree"], ())


def _metadata_tree(node: Node, path: KeyPath) -> Any:
    if node["type"] == "none":
        return None
    if node["type"] == "leaf":
        if node.get("kind") in ARRAY_KINDS:
            return _array_metadata(node)
        return decode_scalar(path, node)
    if node["type"] == "node":
        values = [(k, _metadata_tree(c, (*path, k))) for k, c in children(node)]
        if is_index_keyed(node):
            return NodeMetadataList((v for _, v in values), node_type=node["node_type"])
        return NodeMetadata(values, node_type=node["node_type"])
    return build_container(node, [(k, _metadata_tree(c, (*path, k))) for k, c in children(node)], path)


def _array_metadata(record: Node) -> ArrayMetadata:
    return ArrayMetadata(
        shape=tuple(record["shape"]), dtype=dtype_from_name(record["dtype"]), nbytes=int(record["nbytes"]),
        format=record.get("format", ""), kind=record["kind"], sharding=record.get("sharding"),
    )
