"""Planning a restore: the stored tree walked beside the target, collecting the reads.

The planner never reads array data: it checks the target against the index (every
missing, unexpected and mismatched key at once), and returns a skeleton of the result
whose array leaves are placeholders that the restore fills once the reads are done.

A target that is a JAX pytree node (a Flax ``TrainState``, an NNX ``State``, an Equinox
module...) is flattened one level the way a save flattens it, its children are matched
with the stored ones by key, and the result is rebuilt with the target's own treedef: the
user's classes, aux data and static fields come from the target, never from the file.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ckptcore.errors import CorruptCheckpointError, TargetMismatchError
from ckptcore.io import leaves as arrays
from ckptcore.plugins.registrations import ReadRequest
from ckptcore.tree.keys import KeyPath, format_key_path, is_safe_storage_key
from ckptcore.tree.nodes import ARRAY_KINDS, Node, build_container, children, decode_scalar, is_namedtuple
from ckptcore.tree.pytrees import FlatNode, flatten_node

_CONTAINER_KINDS = ("dict", "list", "tuple", "namedtuple", "node")

TRANSFORMED_KIND = "ckptcore-transformed"
"""The kind of the leaf records a restore transformation puts in the tree it plans (never in an index)."""


@dataclass
class NodeSkeleton:
    """A target's pytree node in a result skeleton: filled, then rebuilt with the target's treedef."""

    flat: FlatNode
    values: list[Any]


@dataclass
class PendingRead:
    path: KeyPath
    record: Node
    request: ReadRequest
    finish: Callable[[list[np.ndarray]], Any]
    slot: list[Any]


class LeafTransformer(Protocol):
    """What the planner asks of a restore transformation (see :mod:`ckptcore.io.transforms`)."""

    def plan_transformed(self, planner: Planner, record: Node, target: Any, path: KeyPath) -> Any:
        """The skeleton entry of a target leaf the transformation computes, fills or skips."""

    def target_for(self, target: Any) -> Any:
        """The target leaf a plain read uses (e.g. with the fallback sharding)."""


class Planner:
    """Walks the stored tree beside the target, collecting reads and every mismatch.

    With a ``transformer`` the tree walked is the one a restore transformation built from
    the target (renamed saved records and ``TRANSFORMED_KIND`` records), see
    :mod:`ckptcore.io.transforms`; without one (the plain restore) nothing else changes.
    """

    def __init__(self, partial: bool, transformer: LeafTransformer | None = None) -> None:
        self.partial = partial
        self.transformer = transformer
        self.reads: list[PendingRead] = []
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.mismatched: list[str] = []
        self.saved_paths: list[str] = []

    def plan(self, node: Node, target: Any, path: KeyPath, has_target: bool) -> Any:
        """A result skeleton: containers with placeholders (one-item lists) for array reads."""
        kind = node["type"]
        if has_target and target is None and kind != "none":
            return None  # a None in the target skips this subtree
        if kind == "none":
            return None
        if kind == "leaf":
            return self._leaf(node, target if has_target else None, path)
        if not has_target:
            return build_container(node, [(k, self.plan(c, None, (*path, k), False)) for k, c in children(node)], path)
        return self._container(node, target, path)

    def _leaf(self, record: Node, target: Any, path: KeyPath) -> Any:
        if self.transformer is not None:
            if record.get("kind") == TRANSFORMED_KIND:
                return self.transformer.plan_transformed(self, record, target, path)
            target = self.transformer.target_for(target)
        if record.get("kind") not in ARRAY_KINDS:
            value = decode_scalar(path, record)
            return self._scalar_onto(value, target, path) if arrays.is_jax_value(target) else value
        if not is_safe_storage_key(record.get("key")):
            raise CorruptCheckpointError(
                f"the storage key {record.get('key')!r} of {format_key_path(path)} is invalid; the index is corrupt"
            )
        try:
            request, finish = arrays.plan_read(path, record, target)
        except TargetMismatchError as exc:
            self.mismatched.append(str(exc))
            return None
        slot: list[Any] = [None]
        self.reads.append(PendingRead(path, record, request, finish, slot))
        return slot

    def _scalar_onto(self, value: Any, target: Any, path: KeyPath) -> Any:
        """A saved scalar (e.g. ``TrainState.step`` saved before the first update) as the JAX array the target asks for."""
        if isinstance(value, (str, bytes)) or not isinstance(value, (bool, int, float, complex, np.generic)):
            self.mismatched.append(
                f"{format_key_path(path)}: the target has an array, the checkpoint a {type(value).__name__}"
            )
            return None
        if tuple(target.shape) != ():
            self.mismatched.append(
                f"shape mismatch at {format_key_path(path)}: the checkpoint holds a scalar, the target asks for "
                f"{tuple(target.shape)}"
            )
            return None
        import jax

        try:
            host = np.asarray(value, dtype=target.dtype)
        except (TypeError, ValueError) as exc:  # e.g. a typed-key target where an int was saved
            self.mismatched.append(f"{format_key_path(path)}: the saved {value!r} cannot become {target.dtype}: {exc}")
            return None
        sharding = getattr(target, "sharding", None)
        return jax.device_put(host, sharding) if sharding is not None else jax.numpy.asarray(host)

    def _container(self, node: Node, target: Any, path: KeyPath) -> Any:
        kind = node["type"]
        if not isinstance(target, (dict, list, tuple)):  # the core's own containers first
            flat = flatten_node(target, path)
            if flat is not None:
                return self._node(node, flat, path)
        saved = dict(children(node))
        if isinstance(target, Mapping):
            if kind not in ("dict", "node"):
                self.mismatched.append(f"{format_key_path(path)}: the target has a dict, the checkpoint a {kind}")
                return None
            out = {}
            for key, sub in target.items():
                if key not in saved:
                    self.missing.append(format_key_path((*path, key)))
                    continue
                out[key] = self.plan(saved[key], sub, (*path, key), True)
            if not self.partial:
                self.unexpected += [format_key_path((*path, k)) for k in saved if k not in target]
            return out if type(target) is dict else type(target)(out)  # type: ignore[call-arg]
        if isinstance(target, (list, tuple)):
            if kind == "node":  # a pytree node saved index-keyed, restored onto a list or tuple
                return self._sequence_from_node(saved, target, path)
            fields: tuple[str, ...] = getattr(type(target), "_fields", ()) if is_namedtuple(target) else ()
            if kind == "dict" and fields and set(saved) == set(fields):
                # A namedtuple saved by field name (orbax-checkpoint stores fields as dict keys).
                return type(target)(*(self.plan(saved[f], t, (*path, f), True) for f, t in zip(fields, target, strict=True)))
            if kind not in ("list", "tuple", "namedtuple") or len(target) != len(saved):
                self.mismatched.append(
                    f"{format_key_path(path)}: the target has a {type(target).__name__} of {len(target)}, "
                    f"the checkpoint a {kind} of {len(saved)}"
                )
                return None
            values = [self.plan(c, t, (*path, k), True) for (k, c), t in zip(children(node), target, strict=True)]
            if is_namedtuple(target):
                return type(target)(*values)
            return type(target)(values)
        if kind != "leaf":
            # A leaf-like target (e.g. an array) where the checkpoint holds a container.
            self.mismatched.append(
                f"{format_key_path(path)}: the target has a {type(target).__name__}, the checkpoint a {kind}"
            )
        return None

    def _node(self, node: Node, flat: FlatNode, path: KeyPath) -> Any:
        kind = node["type"]
        if kind not in _CONTAINER_KINDS:
            self.mismatched.append(f"{format_key_path(path)}: the target has a {flat.type_name}, the checkpoint a {kind}")
            return None
        saved = dict(children(node))
        values: list[Any] = []
        for key, sub in zip(flat.keys, flat.children, strict=True):
            if key not in saved:
                self.missing.append(format_key_path((*path, key)))
                values.append(None)
                continue
            values.append(self.plan(saved[key], sub, (*path, key), True))
        if not self.partial:
            wanted = set(flat.keys)
            self.unexpected += [format_key_path((*path, k)) for k in saved if k not in wanted]
        return NodeSkeleton(flat, values)

    def _sequence_from_node(self, saved: dict[str | int, Node], target: Any, path: KeyPath) -> Any:
        if set(saved) != set(range(len(target))):
            self.mismatched.append(
                f"{format_key_path(path)}: the target has a {type(target).__name__} of {len(target)}, the checkpoint "
                f"a pytree node with keys {sorted(saved, key=str)[:8]}"
            )
            return None
        values = [self.plan(saved[i], t, (*path, i), True) for i, t in enumerate(target)]
        return type(target)(*values) if is_namedtuple(target) else type(target)(values)

    def raise_if_mismatched(self, url: str) -> None:
        problems = []
        if self.missing:
            lines = []
            for p in self.missing:
                near = difflib.get_close_matches(p, self.saved_paths, n=3)
                lines.append(f"  {p}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
            problems.append("keys in the target but not in the checkpoint:\n" + "\n".join(lines))
        if self.unexpected:
            problems.append(
                "keys in the checkpoint but not in the target (pass partial=True to skip them):\n"
                + "\n".join(f"  {p}" for p in self.unexpected)
            )
        if self.mismatched:
            problems.append("structure or shape mismatches:\n" + "\n".join(f"  {p}" for p in self.mismatched))
        if problems:
            raise TargetMismatchError(f"the target does not fit the checkpoint at {url}:\n" + "\n".join(problems))


def fill(skeleton: Any, slots: set[int]) -> Any:
    if isinstance(skeleton, list) and id(skeleton) in slots:
        return skeleton[0]
    if isinstance(skeleton, NodeSkeleton):
        return skeleton.flat.unflatten([fill(v, slots) for v in skeleton.values])
    if isinstance(skeleton, dict):
        filled = {k: fill(v, slots) for k, v in skeleton.items()}
        return filled if type(skeleton) is dict else type(skeleton)(filled)
    if is_namedtuple(skeleton):
        return type(skeleton)(*(fill(v, slots) for v in skeleton))
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(fill(v, slots) for v in skeleton)
    return skeleton
