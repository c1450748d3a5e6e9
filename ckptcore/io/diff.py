"""Comparing two checkpoints: structure, shapes, dtypes and (optionally) values.

Structure comes from the two indexes alone. Values are read leaf by leaf pair in groups
of at most ``max_bytes_in_flight`` bytes per checkpoint (each checksum verified), compared
in chunks in float64 (complex128 for complex dtypes), and dropped: memory stays near two
groups, whatever the size of the checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptcore.io import leaves as arrays
from ckptcore.io.restore import DEFAULT_MAX_BYTES_IN_FLIGHT, OpenedCheckpoint, _execute_reads
from ckptcore.io.restore_plan import PendingRead
from ckptcore.io.transforms import host_target
from ckptcore.tree.dtypes import dtype_from_name
from ckptcore.tree.keys import KeyPath, key_path_text
from ckptcore.tree.nodes import ARRAY_KINDS, Node, children, decode_scalar

_CHUNK = 1 << 22  # elements compared at once (32 MiB of float64 per operand)


@dataclass(frozen=True)
class Entry:
    """One position of a stored tree: a container, an array leaf, a scalar or None."""

    kind: str  # "dict", "list", "node", ..., "array", "scalar", "none"
    text: str  # for display: "float32 (4, 3)", "7", "dict", "node flax...TrainState"
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    value: Any = None
    record: Node | None = None


@dataclass
class LeafDiff:
    """A difference at one key path (``/``-joined); value statistics when values were compared."""

    path: str
    change: str  # "only_in_a", "only_in_b", "kind", "shape", "dtype", "value"
    a: str = ""
    b: str = ""
    max_abs: float | None = None
    max_rel: float | None = None
    within_tolerance: bool | None = None


@dataclass
class DiffReport:
    """What :func:`ckptcore.diff` found. ``same``: no structural difference and values within tolerance."""

    a: str
    b: str
    differences: list[LeafDiff] = field(default_factory=list)
    values: list[LeafDiff] = field(default_factory=list)  # one per array leaf compared (with values=True)
    compared_values: bool = False
    atol: float = 0.0
    rtol: float = 0.0

    @property
    def same(self) -> bool:
        return not self.differences and all(v.within_tolerance for v in self.values)

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a, "b": self.b, "same": self.same, "compared_values": self.compared_values,
            "atol": self.atol, "rtol": self.rtol,
            "differences": [_json(d) for d in self.differences], "values": [_json(v) for v in self.values],
        }


def _json(d: LeafDiff) -> dict[str, Any]:
    out = dict(d.__dict__)
    for k in ("max_abs", "max_rel"):
        if isinstance(out[k], float) and not math.isfinite(out[k]):
            out[k] = str(out[k])  # JSON has no literal for inf and nan
    return out


def entries(node: Node, path: KeyPath = (), out: dict[str, Entry] | None = None) -> dict[str, Entry]:
    """Every position of a stored tree by its ``/``-joined key path (containers included)."""
    out = {} if out is None else out
    where = key_path_text(path)
    kind = node.get("type")
    if kind == "leaf":
        if node.get("kind") in ARRAY_KINDS:
            shape, dtype = tuple(int(n) for n in node["shape"]), str(node["dtype"])
            text = f"{node['kind']} {dtype} {shape}"
            out[where] = Entry("array", text, shape, dtype, record=node)
        else:
            value = decode_scalar(path, node)
            out[where] = Entry("scalar", _short(value), value=value, dtype=type(value).__name__)
        return out
    if kind == "none":
        out[where] = Entry("none", "None")
        return out
    text = str(kind) if kind != "node" else f"node {node.get('node_type', '')}"
    out[where] = Entry(str(kind), text)
    for key, child in children(node):
        entries(child, (*path, key), out)
    return out


def structure_diff(a: dict[str, Entry], b: dict[str, Entry], prefix: str = "") -> list[LeafDiff]:
    out = []
    for p, ea in a.items():
        eb = b.get(p)
        name = prefix + p
        if eb is None:
            out.append(LeafDiff(name, "only_in_a", ea.text))
        elif ea.kind != eb.kind:
            if ea.kind in ("list", "tuple", "dict", "node", "namedtuple") and eb.kind in ("list", "tuple", "dict", "node", "namedtuple"):
                # the same children in another container type (a node saved from a dict...): not a data change
                if ea.kind == "node" or eb.kind == "node":
                    continue
            out.append(LeafDiff(name, "kind", ea.text, eb.text))
        elif ea.kind == "array":
            if ea.shape != eb.shape:
                out.append(LeafDiff(name, "shape", ea.text, eb.text))
            elif ea.dtype != eb.dtype:
                out.append(LeafDiff(name, "dtype", ea.text, eb.text))
        elif ea.kind == "scalar" and not _same_scalar(ea.value, eb.value):
            out.append(LeafDiff(name, "value", ea.text, eb.text))
    out += [LeafDiff(prefix + p, "only_in_b", "", eb.text) for p, eb in b.items() if p not in a]
    return out


def _same_scalar(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        return False
    try:
        if isinstance(x, float | np.floating | complex | np.complexfloating) and np.isnan(x) and np.isnan(y):
            return True
        return bool(x == y)
    except (TypeError, ValueError):
        return repr(x) == repr(y)


def value_diffs(
    a: OpenedCheckpoint, b: OpenedCheckpoint, ea: dict[str, Entry], eb: dict[str, Entry],
    paths: Sequence[str], atol: float, rtol: float, limit: int | None, prefix: str = "",
) -> list[LeafDiff]:
    """Largest absolute and relative difference of each array leaf in ``paths`` (same shape in both)."""
    limit = limit or DEFAULT_MAX_BYTES_IN_FLIGHT
    out: list[LeafDiff] = []
    group: list[str] = []
    size = 0
    for p in [*paths, None]:
        n = 0 if p is None else max(_nbytes(ea[p]), _nbytes(eb[p]))
        if group and (p is None or size + n > limit):
            got_a = _read(a, [ea[q] for q in group], limit)
            got_b = _read(b, [eb[q] for q in group], limit)
            for q, xa, xb in zip(group, got_a, got_b, strict=True):
                max_abs, max_rel, close = compare(xa, xb, atol, rtol)
                out.append(LeafDiff(prefix + q, "value", ea[q].text, eb[q].text, max_abs, max_rel, close))
            del got_a, got_b
            group, size = [], 0
        if p is not None:
            group.append(p)
            size += n
    return out


def _nbytes(e: Entry) -> int:
    assert e.record is not None and e.shape is not None
    return math.prod(e.shape) * dtype_from_name(str(e.dtype)).itemsize


def _read(opened: OpenedCheckpoint, group: list[Entry], limit: int) -> list[np.ndarray]:
    reads = []
    for e in group:
        assert e.record is not None
        request, finish = arrays.plan_read((), e.record, host_target(e.record))
        reads.append(PendingRead((), e.record, request, finish, [None]))
    _execute_reads(opened.location, opened.doc, reads, limit, None, opened.formats)
    return [r.slot[0] for r in reads]


def compare(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> tuple[float, float, bool]:
    """(largest |a - b|, largest |a - b| / |b|, whether |a - b| <= atol + rtol * |b| everywhere); NaNs equal to NaNs."""
    complex_ = a.dtype.kind == "c" or b.dtype.kind == "c"
    wide = np.complex128 if complex_ else np.float64
    fa, fb = a.reshape(-1), b.reshape(-1)
    max_abs = max_rel = 0.0
    close = True
    for start in range(0, fa.size, _CHUNK):
        x = fa[start : start + _CHUNK].astype(wide)
        y = fb[start : start + _CHUNK].astype(wide)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            same = (x == y) | (np.isnan(x) & np.isnan(y))
            d = np.where(same, 0.0, np.abs(x - y))
            d = np.where(np.isnan(d), np.inf, d)
            scale = np.abs(y)
            rel = np.where(d == 0, 0.0, np.where(scale > 0, d / np.where(scale > 0, scale, 1.0), np.inf))
            close = close and bool(np.all((d == 0) | (d <= atol + rtol * scale)))  # equal infinities: d == 0
        if d.size:
            max_abs = max(max_abs, float(d.max()))
            max_rel = max(max_rel, float(rel.max()))

    return max_abs, max_rel, close


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["DiffReport", "Entry", "LeafDiff", "compare", "entries", "structure_diff", "value_diffs"]
