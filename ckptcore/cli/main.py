"""The ``ckptcore`` command: ``plugins``, ``inspect``, ``clean``, ``ls``, ``verify``, ``diff`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from ckptcore.cli import checks, convert
from ckptcore.errors import CheckpointError, CheckpointNotFoundError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ckptcore", description="Inspect and manage ckptcore checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list plugins: name, distribution, version, hooks, status")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("inspect", help="show a checkpoint's tree, shapes, dtypes, bytes and formats")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("clean", help="remove leftovers of interrupted saves in a directory")
    p.add_argument("directory")

    checks.register(sub)  # ls, verify, diff
    convert.register(sub)

    p = sub.add_parser("demo", help="train a small model with a CheckpointManager, interrupt, resume, verify")
    p.add_argument("--directory", default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--size-mb", type=int, default=1, help="size of the training state in MiB (default 1)")
    p.add_argument(
        "--bulk-mb", type=int, default=256,
        help="then save and restore a state this large with progress bars (default 256; 0 skips it)",
    )

    args = parser.parse_args(argv)
    try:
        if args.command == "plugins":
            return _plugins(args.json)
        if args.command == "inspect":
            return _inspect(args.path, args.json)
        if args.command == "clean":
            from ckptcore import storage
            from ckptcore.storage.cleanup import clean

            where = storage.resolve(args.directory)
            if where.scheme == "file" and not where.fs.isdir(where.path):
                what = "a file" if where.fs.exists(where.path) else "missing"
                raise CheckpointNotFoundError(f"cannot clean {where.url}: it is {what}, not a directory; check the path")
            for url in clean(args.directory):
                print(f"removed {url}")
            return 0
        if args.command in checks.COMMANDS:
            return checks.run(args)
        if args.command == convert.COMMAND:
            # argv None: run from the command line, in a process of its own (not called from a program)
            return convert.run(args, own_process=argv is None)
        if args.command == "demo":
            from ckptcore.cli.demo import run_demo

            return run_demo(directory=args.directory, size_mb=args.size_mb, bulk_mb=args.bulk_mb)
    except CheckpointError as exc:
        print(f"ckptcore: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 1


def _plugins(as_json: bool) -> int:
    from ckptcore.plugins.manager import list_plugins

    infos = list_plugins()
    if as_json:
        print(json.dumps([info.__dict__ | {"hooks": list(info.hooks)} for info in infos], indent=2))
        return 0
    from rich.table import Table

    table = Table(title="ckptcore plugins")
    for column in ("name", "distribution", "version", "hooks", "status"):
        table.add_column(column)
    for info in infos:
        table.add_row(info.name, info.distribution, info.version, ", ".join(info.hooks), info.status)
    _console().print(table)
    return 0


def _inspect(path: str, as_json: bool) -> int:
    import numpy as np

    from ckptcore.api import info
    from ckptcore.tree.nodes import decode_scalar

    try:
        ck = info(path)
    except CheckpointNotFoundError as exc:
        hint = _manager_hint(path)
        if hint:
            raise CheckpointNotFoundError(f"{exc}. {hint}") from exc
        raise
    leaves = []
    for key_path, record in ck.leaves:
        entry: dict[str, Any] = {"path": key_path, "kind": record.get("kind")}
        if "shape" in record:
            entry.update(shape=record["shape"], dtype=record["dtype"], bytes=record["nbytes"], format=record.get("format"))
            if record.get("sharding"):
                entry["sharding"] = record["sharding"]
        else:
            value = decode_scalar((), record)
            entry["value"] = _json_value(value)
            if isinstance(value, np.generic):
                entry["dtype"] = str(value.dtype)
            entry["repr"] = _short(value)
        leaves.append(entry)
    summary = {
        "url": ck.url, "created": ck.created, "total_bytes": ck.total_bytes, "format_version": ck.format_version,
        "ckptcore_version": ck.ckptcore_version, "array_formats": ck.array_formats, "metadata": ck.metadata,
        "leaves": leaves, "tree": ck.stored_tree,
        "nodes": [{"path": p, "node_type": note} for p, _, note in _structure_rows(ck.stored_tree) if note],
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    from rich.table import Table

    console = _console()
    console.print(f"[bold]{ck.url}[/bold]  created {ck.created}  {_human(ck.total_bytes)} in arrays")
    formats = ", ".join(f"{n} v{f.get('version')} ({f.get('distribution')} {f.get('plugin_version')})" for n, f in ck.array_formats.items())
    console.print(f"array formats: {formats or 'none'}; ckptcore {ck.ckptcore_version}")
    if ck.metadata:
        console.print(f"metadata: {json.dumps(ck.metadata)}")
    table = Table()
    for column in ("key path", "kind", "shape", "dtype", "bytes", "format / value"):
        table.add_column(column)
    by_path = {leaf["path"]: leaf for leaf in leaves}
    for key_path, kind, note in _structure_rows(ck.stored_tree):
        leaf = None if note else by_path.get(key_path)
        if leaf is None:  # None, an empty container or a pytree node's header: part of the tree, holds no data
            table.add_row(key_path, kind, "", "", "", note)
        elif "shape" in leaf:
            table.add_row(key_path, leaf["kind"], str(tuple(leaf["shape"])), leaf["dtype"], _human(leaf["bytes"]), leaf["format"])
        else:
            table.add_row(key_path, leaf["kind"], "", leaf.get("dtype", ""), "", leaf["repr"])
    console.print(table)
    return 0


def _structure_rows(node: dict[str, Any], path: tuple[str | int, ...] = ()) -> list[tuple[str, str, str]]:
    """(key path, kind, note) of every leaf, None and empty container, in tree order.

    A JAX pytree node (a Flax ``TrainState``...) gets a row of its own before its children,
    with its saved type name as the note (display only: it is never imported).
    """
    from ckptcore.tree.keys import format_key_path
    from ckptcore.tree.nodes import children

    kind = node["type"]
    if kind == "leaf":
        return [(format_key_path(path), str(node.get("kind")), "")]
    if kind == "none":
        return [(format_key_path(path), "None", "")]
    kids = children(node)
    if kind == "node":
        note = str(node.get("node_type", ""))
        if not kids:
            return [(format_key_path(path), "empty node", note)]
        header = (format_key_path(path), "node", note)
        return [header, *(row for key, child in kids for row in _structure_rows(child, (*path, key)))]
    if not kids:
        return [(format_key_path(path), f"empty {kind}", "")]
    return [row for key, child in kids for row in _structure_rows(child, (*path, key))]


def _manager_hint(path: str) -> str:
    """What to inspect instead when ``path`` is a manager's root or step directory."""
    from ckptcore import storage

    try:
        location = storage.resolve(path)
        fs, base = location.fs, location.path.rstrip("/")
        if fs.exists(f"{base}/ckptcore_step.json"):
            items = sorted(p.rstrip("/").rpartition("/")[2] for p in fs.ls(base, detail=False) if fs.isdir(p))
            return f"It is a CheckpointManager step: inspect one of its items: {', '.join(f'{path}/{i}' for i in items)}"
        if fs.exists(f"{base}/ckptcore_manager.json"):
            return "It is a CheckpointManager root: inspect an item of a step, e.g. ROOT/<step>/default"
    except Exception:  # a hint is best effort; the original error stands
        return ""
    return ""


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _json_value(value: Any) -> Any:
    """A decoded scalar as JSON: numbers, bools and strings as they are, anything else as its repr."""
    if hasattr(value, "item") and hasattr(value, "dtype"):  # NumPy scalar
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return repr(value)  # nan, inf, complex, bytes: JSON has no literal for them


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _console() -> Any:
    """A rich console; wide when printing to a pipe or file, so key paths are not cut."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)
