"""The ``ckptcore`` command: ``plugins``, ``inspect``, ``clean`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from ckptcore.errors import CheckpointError


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
            from ckptcore.cleanup import clean

            for url in clean(args.directory):
                print(f"removed {url}")
            return 0
        if args.command == "demo":
            from ckptcore.demo import run_demo

            return run_demo(directory=args.directory, size_mb=args.size_mb, bulk_mb=args.bulk_mb)
    except CheckpointError as exc:
        print(f"ckptcore: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 1


def _plugins(as_json: bool) -> int:
    from ckptcore.plugins import list_plugins

    infos = list_plugins()
    if as_json:
        print(json.dumps([info.__dict__ | {"hooks": list(info.hooks)} for info in infos], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ckptcore plugins")
    for column in ("name", "distribution", "version", "hooks", "status"):
        table.add_column(column)
    for info in infos:
        table.add_row(info.name, info.distribution, info.version, ", ".join(info.hooks), info.status)
    Console().print(table)
    return 0


def _inspect(path: str, as_json: bool) -> int:
    import numpy as np

    from ckptcore.restoring import info
    from ckptcore.tree import decode_scalar

    ck = info(path)
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
        "leaves": leaves,
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{ck.url}[/bold]  created {ck.created}  {_human(ck.total_bytes)} in arrays")
    formats = ", ".join(f"{n} v{f.get('version')} ({f.get('distribution')} {f.get('plugin_version')})" for n, f in ck.array_formats.items())
    console.print(f"array formats: {formats or 'none'}; ckptcore {ck.ckptcore_version}")
    if ck.metadata:
        console.print(f"metadata: {json.dumps(ck.metadata)}")
    table = Table()
    for column in ("key path", "kind", "shape", "dtype", "bytes", "format / value"):
        table.add_column(column)
    for leaf in leaves:
        if "shape" in leaf:
            table.add_row(leaf["path"], leaf["kind"], str(tuple(leaf["shape"])), leaf["dtype"], _human(leaf["bytes"]), leaf["format"])
        else:
            table.add_row(leaf["path"], leaf["kind"], "", leaf.get("dtype", ""), "", leaf["repr"])
    console.print(table)
    return 0


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
