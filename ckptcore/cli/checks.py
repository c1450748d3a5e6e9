"""``ckptcore ls``, ``ckptcore verify`` and ``ckptcore diff``: thin front ends of :mod:`ckptcore.manager.inspection`.

Exit status: 0 when all is well (``verify``: every checksum matched; ``diff``: no difference,
values within ``--atol``/``--rtol``), 1 when something differs or is damaged (each bad leaf
or difference named), 2 for an error that stops the command (no checkpoint there...).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

COMMANDS = ("ls", "verify", "diff")


def register(sub: Any) -> None:
    """Add the subcommands to ``ckptcore``'s argparse subparsers."""
    p = sub.add_parser("ls", help="a manager root's steps: commit times, sizes, metrics, latest/best, leases, leftovers")
    p.add_argument("root")
    p.add_argument("--best", metavar="METRIC", default=None, help="mark the best step by this metric")
    p.add_argument("--mode", choices=("min", "max"), default="min", help="whether --best is minimized (default) or maximized")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("verify", help="read every byte of a checkpoint, step or root and check every checksum")
    p.add_argument("path")
    p.add_argument("--max-mb-in-flight", type=int, default=None, help="bytes read at once, in MiB (default 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("diff", help="compare two checkpoints or steps: structure, shapes, dtypes (--values: values)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--values", action="store_true", help="read the arrays: largest absolute and relative difference per leaf")
    p.add_argument("--atol", type=float, default=0.0, help="with --values: absolute tolerance (default 0)")
    p.add_argument("--rtol", type=float, default=0.0, help="with --values: relative tolerance (default 0)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    if args.command == "ls":
        return _ls(args)
    if args.command == "verify":
        return _verify(args)
    return _diff(args)


def _ls(args: argparse.Namespace) -> int:
    from ckptcore.manager.inspection import list_run

    run = list_run(args.root, best_metric=args.best, best_mode=args.mode)
    if args.json:
        print(json.dumps(run.to_json(), indent=2))
        return 0
    from rich.table import Table

    console = _console()
    console.print(f"[bold]{run.url}[/bold]  {len(run.steps)} steps")
    table = Table()
    for column in ("step", "committed", "size", "items", "metrics", "flags"):
        table.add_column(column)
    for s in run.steps:
        flags = [f for f, on in (("latest", s.latest), ("best", s.best), ("protected", s.protected)) if on]
        if s.error:
            flags.append(f"damaged: {s.error[:80]}")
        metrics = json.dumps(s.metrics) if s.metrics is not None else ""
        table.add_row(str(s.step), s.commit_time or "", _human(s.bytes), ", ".join(s.items), metrics, ", ".join(flags))
    console.print(table)
    if args.best is None and any(s.metrics for s in run.steps):
        console.print("best: pass --best METRIC [--mode max] to mark the best step")
    for url in run.leftovers:
        console.print(f"leftover of an interrupted or running save: {url} (ckptcore clean {run.url} removes it)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ckptcore.manager.inspection import verify

    limit = args.max_mb_in_flight << 20 if args.max_mb_in_flight else None
    show = not args.no_progress and not args.json and sys.stderr.isatty()
    report = verify(args.path, progress=show or None, max_bytes_in_flight=limit)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0 if report.ok else 1
    for bad in report.bad:
        print(f"BAD {bad.path} (storage key {bad.key!r} in {bad.checkpoint}): {bad.error}")
    for error in report.errors:
        print(f"BAD {error}")
    for path in report.unchecked:
        print(f"unchecked (saved without a checksum, read fully): {path}")
    rate = report.bytes / report.seconds / (1 << 20) if report.seconds > 0 else 0.0
    status = "ok" if report.ok else f"{len(report.bad) + len(report.errors)} bad"
    print(
        f"{status}: {report.leaves} array leaves, {_human(report.bytes)} read in {report.seconds:.2f} s "
        f"({rate:.0f} MiB/s), {len(report.checkpoints)} checkpoint(s) under {report.url}"
    )
    return 0 if report.ok else 1


def _diff(args: argparse.Namespace) -> int:
    from ckptcore.manager.inspection import diff

    report = diff(args.a, args.b, values=args.values, atol=args.atol, rtol=args.rtol)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0 if report.same else 1
    labels = {"only_in_a": "only in A", "only_in_b": "only in B", "kind": "kind", "shape": "shape",
              "dtype": "dtype", "value": "value"}
    for d in report.differences:
        if d.change == "only_in_a":
            print(f"- {d.path}: {d.a} (only in A)")
        elif d.change == "only_in_b":
            print(f"+ {d.path}: {d.b} (only in B)")
        else:
            print(f"~ {d.path}: {labels[d.change]} {d.a} -> {d.b}")
    for v in report.values:
        mark = "=" if v.max_abs == 0 else ("~" if v.within_tolerance else "!")
        print(f"{mark} {v.path}: max |a-b| {v.max_abs:.6g}, max |a-b|/|b| {v.max_rel:.6g}"
              + ("" if v.within_tolerance else f" (beyond atol={report.atol:g} rtol={report.rtol:g})"))
    changed = sum(1 for v in report.values if not v.within_tolerance)
    what = f"{len(report.differences)} structural difference(s)"
    if report.compared_values:
        what += f", {changed} of {len(report.values)} array leaves beyond tolerance"
    print(("same: " if report.same else "different: ") + what + f" ({report.a} vs {report.b})")
    return 0 if report.same else 1


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _console() -> Any:
    """A rich console; wide when printing to a pipe or file, so key paths are not cut."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)
