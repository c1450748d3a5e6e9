"""Restore transformations: renamed keys, computed leaves, leaves kept from the target.

A transformed restore is planned by the same :class:`~ckptcore.io.restore_plan.Planner` as
a plain one, so it works for every layout (ckptcore's, and checkpoints of other systems
opened through a checkpoint-layout plugin), every target (NumPy, ``jax.Array`` on any
mesh, JAX pytree nodes) and with the same read waves. What changes is the tree walked:

1. Every saved leaf gets its key path in the ``/``-joined text form
   (:func:`ckptcore.tree.keys.key_path_text`, e.g. ``encoder/layer_0/kernel``), rewritten
   by the first ``rename`` pattern that matches it (``re.search``; ``re.sub`` with
   ``count=1``). Two saved leaves renamed onto one key path is a :class:`TransformError`
   naming both.
2. The target is encoded the way a save encodes a tree; each of its leaves becomes the
   saved record renamed onto its key path (a plain read: shape checked, dtype cast,
   resharded), or a ``TRANSFORMED_KIND`` record: computed by ``value_fn`` (from the saved
   leaf renamed onto it) or ``multi_value_fn`` (from the saved leaves it names), kept from
   the target (``missing="from_target"``), or missing.
3. The planner walks that tree beside the target. A computed leaf asks for its sources,
   read once each (a NumPy array of the saved shape and dtype, its checksum verified) in
   the same waves as the plain reads; saved leaves nothing asks for are never read.
4. After the reads the functions run, their results are checked against the target leaf
   (shape) and put where it says (dtype, sharding, else ``fallback_sharding``), and each
   source is dropped once its last consumer has run.
"""

from __future__ import annotations

import difflib
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ckptcore.errors import CorruptCheckpointError, TargetMismatchError, TransformError
from ckptcore.io import leaves as arrays
from ckptcore.io.restore_plan import TRANSFORMED_KIND, PendingRead, Planner
from ckptcore.tree.keys import KeyPath, is_safe_storage_key, key_path_text
from ckptcore.tree.nodes import ARRAY_KINDS, Node, decode_scalar, encode_tree

ValueFn = Callable[[Any, Any], Any]
MultiValueFn = Callable[[dict[str, Any], Any], Any]


@dataclass(frozen=True)
class Transforms:
    """How a restore maps a checkpoint onto a target that differs from it.

    Key paths are the ``/``-joined text form: ``encoder/layer_0/kernel``, ``opt/0/mu``
    (integer keys in decimal; a ``/`` inside a key written ``\\/``).

    :param rename: ``{pattern: replacement}`` regular expressions applied to every saved
        key path: the first pattern (in order) that matches (``re.search``) rewrites it
        (``re.sub(pattern, replacement, path, count=1)``, so ``\\1`` refers to groups).
    :param value_fn: ``{target key path: fn(saved, target_leaf)}``: the leaf computed from
        the saved leaf renamed onto that key path (a NumPy array in its saved shape and
        dtype, or the saved scalar) and the target's leaf.
    :param multi_value_fn: ``{target key path: (fn(saved, target_leaf), sources)}``: the
        leaf computed from several saved leaves; ``sources`` are saved key paths (as saved,
        before renames) or regular expressions matched against them (``re.fullmatch``), and
        ``saved`` is ``{saved key path: value}``. ``[]`` computes a leaf from nothing.
    :param missing: ``"error"`` (a target leaf no saved leaf maps to is a
        ``TargetMismatchError``) or ``"from_target"`` (keep the target's value; the target
        leaf must then be a value, not a ``ShapeDtypeStruct``).
    :param unused: ``"ignore"`` (saved leaves the target does not use are skipped and
        listed in the report) or ``"error"`` (they, and any pattern or key of these
        transforms that matches nothing, are errors).
    :param fallback_sharding: a ``jax.sharding.Sharding`` for target leaves that give none
        (a ``ShapeDtypeStruct`` without sharding, an ``ArrayMetadata``...): they come back as
        ``jax.Array`` on it. NumPy array targets stay NumPy.
    """

    rename: Mapping[str, str] = field(default_factory=dict)
    value_fn: Mapping[str, ValueFn] = field(default_factory=dict)
    multi_value_fn: Mapping[str, tuple[MultiValueFn, Sequence[str]]] = field(default_factory=dict)
    missing: Literal["error", "from_target"] = "error"
    unused: Literal["error", "ignore"] = "ignore"
    fallback_sharding: Any = None

    def __post_init__(self) -> None:
        if self.missing not in ("error", "from_target"):
            raise TransformError(f"Transforms(missing={self.missing!r}): use 'error' or 'from_target'")
        if self.unused not in ("error", "ignore"):
            raise TransformError(f"Transforms(unused={self.unused!r}): use 'error' or 'ignore'")
        rules = []
        for pattern, replacement in dict(self.rename).items():
            if not isinstance(pattern, str) or not isinstance(replacement, str):
                raise TransformError(f"Transforms(rename=...): {pattern!r}: {replacement!r} must map a str to a str")
            rules.append((pattern, _compile(pattern, "rename"), replacement))
        for key, fn in dict(self.value_fn).items():
            if not isinstance(key, str) or not callable(fn):
                raise TransformError(f"Transforms(value_fn=...): {key!r} must map a key path (str) to a callable")
        for key, entry in dict(self.multi_value_fn).items():
            ok = isinstance(entry, tuple | list) and len(entry) == 2 and callable(entry[0])
            if not isinstance(key, str) or not ok or isinstance(entry[1], str) or not all(
                isinstance(s, str) for s in entry[1]
            ):
                raise TransformError(
                    f"Transforms(multi_value_fn=...): {key!r} must map a key path to (fn, [source key paths or "
                    "regular expressions])"
                )
            for source in entry[1]:
                _compile(source, f"multi_value_fn[{key!r}]")
        both = sorted(set(self.value_fn) & set(self.multi_value_fn))
        if both:
            raise TransformError(f"Transforms: {', '.join(both)} is in both value_fn and multi_value_fn; give one")
        object.__setattr__(self, "_rules", tuple(rules))

    @property
    def rules(self) -> tuple[tuple[str, re.Pattern[str], str], ...]:
        return self._rules  # type: ignore[attr-defined,no-any-return]


def _compile(pattern: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise TransformError(f"Transforms({where}): {pattern!r} is not a valid regular expression: {exc}") from exc


@dataclass
class RestoreReport:
    """What a restore did (``restore(..., report=True)``, :func:`ckptcore.last_restore_report`).

    Key paths are in the ``/``-joined text form.

    :ivar url: the checkpoint restored.
    :ivar renamed: saved key path -> the target key path it was restored to (renamed ones only).
    :ivar from_target: target key paths the checkpoint lacks, kept from the target.
    :ivar computed: target key path -> the saved key paths its ``value_fn``/``multi_value_fn`` used.
    :ivar unused: saved key paths not restored (never read).
    :ivar warnings: e.g. a rename pattern or a ``value_fn`` key that matched nothing.
    :ivar leaves_read: array leaves read from storage (each source of a computation once).
    :ivar bytes_read: array bytes read.
    """

    url: str = ""
    renamed: dict[str, str] = field(default_factory=dict)
    from_target: list[str] = field(default_factory=list)
    computed: dict[str, list[str]] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    leaves_read: int = 0
    bytes_read: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


_LAST = threading.local()


def last_restore_report() -> RestoreReport | None:
    """The report of the last restore that finished in this thread (``None`` before any)."""
    return getattr(_LAST, "report", None)


def set_last_report(report: RestoreReport) -> None:
    _LAST.report = report


def merge_reports(url: str, reports: Mapping[str, RestoreReport]) -> RestoreReport:
    """One report for the items of a manager step: key paths prefixed with ``<item>/``."""
    out = RestoreReport(url=url)
    for item, r in reports.items():
        p = f"{item}/"
        out.renamed.update({p + k: p + v for k, v in r.renamed.items()})
        out.from_target += [p + k for k in r.from_target]
        out.computed.update({p + k: [p + s for s in v] for k, v in r.computed.items()})
        out.unused += [p + k for k in r.unused]
        out.warnings += [f"{item}: {w}" for w in r.warnings]
        out.leaves_read += r.leaves_read
        out.bytes_read += r.bytes_read
    return out


class _HostTarget:
    """A target leaf asking for a NumPy array of the saved shape and dtype (what a transform's function gets)."""

    __slots__ = ("dtype", "shape")

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shape, self.dtype = shape, dtype


def host_target(record: Node) -> Any:
    """A target leaf that reads ``record`` whole, as NumPy, at its saved dtype (checksum verified)."""
    from ckptcore.tree.dtypes import dtype_from_name

    return _HostTarget(tuple(int(n) for n in record["shape"]), dtype_from_name(record["dtype"]))


def saved_leaves(node: Node, path: KeyPath = ()) -> Iterator[tuple[KeyPath, Node]]:
    """Every leaf record and every ``None`` of a stored tree with its key path, in tree order."""
    kind = node.get("type")
    if kind in ("leaf", "none"):
        yield path, node
    elif kind in ("dict", "node"):
        for item in node["items"]:
            yield from saved_leaves(item["value"], (*path, item["key"]))
    elif kind == "namedtuple":
        for name, child in zip(node["fields"], node["items"], strict=True):
            yield from saved_leaves(child, (*path, name))
    elif kind in ("list", "tuple"):
        for i, child in enumerate(node["items"]):
            yield from saved_leaves(child, (*path, i))


@dataclass
class _Computation:
    target_path: str
    path: KeyPath
    fn: Callable[..., Any]
    multi: bool
    sources: list[str]
    target: Any
    slot: list[Any]


class TransformPlan:
    """One transformed restore: the tree the planner walks, the computations, the report."""

    def __init__(self, transforms: Transforms, stored_tree: Node, url: str) -> None:
        self.t = transforms
        self.url = url
        self.report = RestoreReport(url=url)
        self.saved: dict[str, tuple[KeyPath, Node]] = {}
        for path, node in saved_leaves(stored_tree):
            self.saved[key_path_text(path)] = (path, node)
        self.by_target: dict[str, str] = {}  # target key path -> saved key path renamed onto it
        hits = [0] * len(transforms.rules)
        collisions: list[str] = []
        for saved_path in self.saved:
            new = saved_path
            for i, (_, pattern, replacement) in enumerate(transforms.rules):
                if pattern.search(saved_path):
                    hits[i] += 1
                    try:
                        new = pattern.sub(replacement, saved_path, count=1)
                    except (re.error, IndexError) as exc:
                        raise TransformError(
                            f"Transforms(rename=...): {pattern.pattern!r} -> {replacement!r} failed on "
                            f"{saved_path}: {exc}"
                        ) from exc
                    break
            before = self.by_target.get(new)
            if before is not None:
                collisions.append(f"{before} and {saved_path} -> {new}")
            self.by_target[new] = saved_path
            if new != saved_path:
                self.report.renamed[saved_path] = new
        if collisions:
            raise TransformError(
                f"restoring {url}: the renames map several saved keys to one target key:\n"
                + "\n".join(f"  {c}" for c in collisions)
                + "\nmake the patterns tell them apart, or compute that key with multi_value_fn"
            )
        self._unmatched("rename pattern", [p for (p, _, _), n in zip(transforms.rules, hits, strict=True) if n == 0])
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.abstract_kept: list[str] = []
        self.target_paths: set[str] = set()
        self.none_paths: list[str] = []
        self.computations: list[_Computation] = []
        self.sources: dict[str, list[Any]] = {}  # saved key path -> slot of its value (read once)
        self.consumers: dict[str, int] = {}

    def _unmatched(self, what: str, patterns: list[str]) -> None:
        for p in patterns:
            self.report.warnings.append(f"the {what} {p!r} matched nothing in {self.url}")

    # -- the tree the planner walks --------------------------------------------------

    def encode_target(self, target: Any) -> Node:
        tree = encode_tree(target, self._resolve)
        for path, node in saved_leaves(tree):
            if node.get("type") == "none":  # a None in the target skips what is saved there
                self.none_paths.append(key_path_text(path))
        for key in self.t.value_fn:
            if key not in self.target_paths:
                self.report.warnings.append(f"the value_fn key {key!r} is not a key path of the target")
        for key in self.t.multi_value_fn:
            if key not in self.target_paths:
                self.report.warnings.append(f"the multi_value_fn key {key!r} is not a key path of the target")
        return tree

    def _resolve(self, path: KeyPath, target_leaf: Any) -> Node:
        t = key_path_text(path)
        self.target_paths.add(t)
        multi = self.t.multi_value_fn.get(t)
        if multi is not None:
            return {"kind": TRANSFORMED_KIND, "how": "multi", "target": t, "sources": self._sources(t, multi[1])}
        src = self.by_target.get(t)
        if src is None:
            return {"kind": TRANSFORMED_KIND, "how": "missing", "target": t}
        self.used.add(src)
        if t in self.t.value_fn:
            return {"kind": TRANSFORMED_KIND, "how": "value", "target": t, "sources": [src]}
        record = self.saved[src][1]
        if record.get("type") == "none":
            return {"kind": TRANSFORMED_KIND, "how": "none", "target": t}
        return record  # a plain read (encode_tree sets "type": "leaf", which it already is)

    def _sources(self, t: str, specs: Sequence[str]) -> list[str]:
        found: list[str] = []
        for spec in specs:
            if spec in self.saved:
                matched = [spec]
            else:
                pattern = re.compile(spec)
                matched = [p for p in self.saved if pattern.fullmatch(p)]
            if not matched:
                self._unmatched(f"multi_value_fn source of {t}", [spec])
            found += [m for m in matched if m not in found]
        self.used.update(found)
        return found

    # -- the planner's hooks ---------------------------------------------------------

    def target_for(self, target: Any) -> Any:
        fallback = self.t.fallback_sharding
        if fallback is None or target is None or isinstance(target, np.ndarray) or _has_sharding(target):
            return target
        shape_dtype = arrays.target_shape_dtype(target)
        if shape_dtype is None:
            return target
        import jax

        return jax.ShapeDtypeStruct(shape_dtype[0], shape_dtype[1], sharding=fallback)

    def plan_transformed(self, planner: Planner, record: Node, target: Any, path: KeyPath) -> Any:
        how, t = record["how"], record["target"]
        if how == "none":
            return None
        if how == "missing":
            if self.t.missing != "from_target":
                self.missing.append(t)
                return None
            if _is_abstract(target):
                self.abstract_kept.append(t)
                return None
            self.report.from_target.append(t)
            return target
        sources: list[str] = record["sources"]
        for s in sources:
            self._source(planner, s)
            self.consumers[s] = self.consumers.get(s, 0) + 1
        multi = how == "multi"
        fn = self.t.multi_value_fn[t][0] if multi else self.t.value_fn[t]
        slot: list[Any] = [None]
        self.computations.append(_Computation(t, path, fn, multi, sources, target, slot))
        self.report.computed[t] = list(sources)
        return slot

    def _source(self, planner: Planner, s: str) -> None:
        if s in self.sources:
            return
        path, record = self.saved[s]
        slot: list[Any] = [None]
        self.sources[s] = slot
        if record.get("type") == "none":
            return
        if record.get("kind") not in ARRAY_KINDS:
            slot[0] = decode_scalar(path, record)
            return
        if not is_safe_storage_key(record.get("key")):
            raise CorruptCheckpointError(f"the storage key {record.get('key')!r} of {s} is invalid; the index is corrupt")
        request, finish = arrays.plan_read(path, record, host_target(record))
        planner.reads.append(PendingRead(path, record, request, finish, slot))

    # -- after planning, after reading -----------------------------------------------

    def raise_if_invalid(self) -> None:
        """Missing and (with ``unused="error"``) unused keys and unmatched patterns, all at once."""
        skipped = self.none_paths
        unused = [
            s for s in self.saved
            if s not in self.used and self.saved[s][1].get("type") != "none"
            and not any(_under(self._renamed(s), p) for p in skipped)
        ]
        self.report.unused = unused
        problems = []
        if self.missing:
            renamed = list(self.by_target)
            lines = []
            for p in self.missing:
                near = difflib.get_close_matches(p, renamed, n=3)
                lines.append(f"  {p}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
            problems.append(
                "target keys no saved key maps to (rename them, compute them with multi_value_fn, "
                "or pass missing='from_target'):\n" + "\n".join(lines)
            )
        if self.abstract_kept:
            problems.append(
                "target keys the checkpoint lacks whose target leaf is abstract, so missing='from_target' has no "
                "value to keep (give a concrete value, or compute them with multi_value_fn):\n"
                + "\n".join(f"  {p}" for p in self.abstract_kept)
            )
        if self.t.unused == "error":
            if unused:
                problems.append(
                    "saved keys the target does not use (pass unused='ignore' to skip them):\n"
                    + "\n".join(f"  {s}" + (f" (renamed {self._renamed(s)})" if s in self.report.renamed else "")
                                for s in unused)
                )
            if self.report.warnings:
                problems.append("with unused='error' these are errors:\n" + "\n".join(f"  {w}" for w in self.report.warnings))
        if problems:
            error = TransformError if not self.missing and not self.abstract_kept and not unused else TargetMismatchError
            raise error(f"the target does not fit the checkpoint at {self.url} with these transforms:\n" + "\n".join(problems))

    def _renamed(self, s: str) -> str:
        return self.report.renamed.get(s, s)

    def compute(self) -> None:
        """Run every computation (after the reads), placing its result as its target leaf says."""
        for c in self.computations:
            where = f"{'multi_value_fn' if c.multi else 'value_fn'} of {c.target_path}"
            if c.multi:
                args: Any = {s: self.sources[s][0] for s in c.sources}
            else:
                args = self.sources[c.sources[0]][0]
            try:
                value = c.fn(args, c.target)
            except Exception as exc:
                raise TransformError(
                    f"restoring {self.url}: the {where} raised {type(exc).__name__}: {exc}; nothing was changed on storage"
                ) from exc
            del args
            c.slot[0] = self._place(value, c.target, where)
            for s in c.sources:
                self.consumers[s] -= 1
                if self.consumers[s] == 0:
                    self.sources[s][0] = None  # its last consumer ran: let it go

    def slot_ids(self) -> set[int]:
        return {id(c.slot) for c in self.computations}

    def _place(self, value: Any, target: Any, where: str) -> Any:
        target = self.target_for(target)
        wanted = arrays.target_shape_dtype(target) if target is not None else None
        if wanted is None:
            return value  # a scalar (or None) target: the function's value as it is
        shape, dtype = wanted
        got = tuple(int(n) for n in np.shape(value))
        if got != shape:
            raise TransformError(
                f"restoring {self.url}: the {where} returned shape {got}, the target asks for {shape}"
            )
        try:
            if arrays.is_jax_value(target):
                return _on_devices(value, target, dtype)
            host = np.asarray(value)
            return host if host.dtype == dtype else host.astype(dtype)
        except (TypeError, ValueError) as exc:
            raise TransformError(f"restoring {self.url}: the {where} returned a value that cannot become {dtype}: {exc}") from exc


def _on_devices(value: Any, target: Any, dtype: np.dtype) -> Any:
    import jax

    sharding = getattr(target, "sharding", None)
    if not isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if not isinstance(value, jax.Array):
        value = np.asarray(value)
    if value.dtype != dtype:
        value = value.astype(dtype)
    return jax.device_put(value, sharding)


def _has_sharding(target: Any) -> bool:
    sharding = getattr(target, "sharding", None)
    if sharding is None or isinstance(sharding, Mapping):  # ArrayMetadata: the saved sharding as JSON
        return False
    return True


def _is_abstract(target: Any) -> bool:
    """A target leaf that describes an array without holding one (``ShapeDtypeStruct``, ``ArrayMetadata``)."""
    if target is None or isinstance(target, np.ndarray | np.generic | int | float | complex | bool | str | bytes):
        return False
    if arrays.is_jax_value(target):
        return not hasattr(type(target), "addressable_shards")
    return arrays.target_shape_dtype(target) is not None


def _under(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + "/")


__all__ = [
    "RestoreReport", "TransformPlan", "Transforms", "host_target", "last_restore_report", "merge_reports",
    "saved_leaves", "set_last_report",
]
