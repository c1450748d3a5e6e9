"""``ckptcore convert SRC DST``: any readable checkpoint (orbax-checkpoint's too) into ckptcore's layout."""

from __future__ import annotations

import argparse
from typing import Any

COMMAND = "convert"


def register(sub: Any) -> None:
    p = sub.add_parser(
        COMMAND, help="convert a checkpoint of any readable layout (e.g. orbax-checkpoint's) into ckptcore's",
        description="Streams the arrays in bounded memory, verifies everything written against the source, and "
        "only then commits DST. A damaged source fails before DST exists.",
    )
    p.add_argument("src", help="the checkpoint to read (e.g. an orbax item: /ckpt/run/1000/state)")
    p.add_argument("dst", help="where the ckptcore checkpoint goes")
    p.add_argument("--format", default=None, help="the array format to write (default: ocdbt)")
    p.add_argument("--max-mb-in-flight", type=int, default=512, help="the most MiB of array data held at once (default 512)")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint at DST")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ckptcore.io.convert import convert

    report = convert(
        args.src, args.dst, format=args.format, max_bytes_in_flight=args.max_mb_in_flight << 20,
        progress=not args.no_progress, force=args.force,
    )
    print(
        f"converted {report.src} ({report.layout} layout) -> {report.dst}: {report.leaves} arrays, "
        f"{report.total_bytes} bytes in {report.batches} batches, format {report.format}; verified"
    )
    return 0
