"""``ckptcore convert SRC DST [--to LAYOUT]``: any readable checkpoint (orbax-checkpoint's too) into ckptcore's layout, or another (``--to safetensors``)."""

from __future__ import annotations

import argparse
from typing import Any

COMMAND = "convert"


def register(sub: Any) -> None:
    p = sub.add_parser(
        COMMAND, help="convert a checkpoint of any readable layout (e.g. orbax-checkpoint's) into ckptcore's",
        description="Streams the arrays in bounded memory, verifies everything written against the source, and "
        "only then commits DST. A damaged source fails before DST exists.",
        epilog="On Linux with glibc, this command has the allocator keep and reuse freed buffers for its own "
        "process (mallopt: one arena, no unmapping on free), instead of touching fresh memory for every batch "
        "(the README's 'Coming from orbax-checkpoint' has figures); ckptcore.convert() in your own process "
        "leaves your allocator alone.",
    )
    p.add_argument("src", help="the checkpoint to read (e.g. an orbax item: /ckpt/run/1000/state)")
    p.add_argument("dst", help="where the ckptcore checkpoint goes")
    p.add_argument("--to", default="ckptcore", metavar="LAYOUT",
                   help="the layout to write: ckptcore (default), or a plugin's exporter, e.g. safetensors "
                   "(a Hugging Face directory: model.safetensors, or shards + model.safetensors.index.json)")
    p.add_argument("--max-shard-bytes", type=_size, default=None, metavar="SIZE",
                   help="with --to: split the output into files of at most SIZE (e.g. 5GB, 500MB, 2GiB; "
                   "the exporter's option max_shard_bytes)")
    p.add_argument("--format", default=None, help="the array format to write (default: ocdbt)")
    p.add_argument("--max-mb-in-flight", type=int, default=512, help="the most MiB of array data held at once (default 512)")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint at DST")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def _size(text: str) -> int:
    """``5GB`` (decimal, as Hugging Face counts), ``2GiB``, or plain bytes."""
    number = text.strip().lower().rstrip("bitkmg")
    unit = text.strip().lower()[len(number):]
    try:
        value = int(float(number) * _UNITS[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB, 1000000)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return value


def run(args: argparse.Namespace, own_process: bool = False) -> int:
    """``own_process``: the process is this command's, so its allocator may be set for the conversion."""
    if own_process:
        from ckptcore.io.memory import keep_freed_memory

        keep_freed_memory()  # before TensorStore's threads make arenas of their own

    from ckptcore.errors import InvalidOptionError
    from ckptcore.io.convert import convert

    export_options = {}
    if args.max_shard_bytes is not None:
        if args.to == "ckptcore":
            raise InvalidOptionError("--max-shard-bytes goes with --to <layout>; ckptcore's layout takes --format")
        export_options["max_shard_bytes"] = args.max_shard_bytes
    report = convert(
        args.src, args.dst, format=args.format, max_bytes_in_flight=args.max_mb_in_flight << 20,
        progress=not args.no_progress, force=args.force, to=args.to, export_options=export_options,
    )
    print(
        f"converted {report.src} ({report.layout} layout) -> {report.dst}: {report.leaves} arrays, "
        f"{report.total_bytes} bytes in {report.batches} batches, "
        + (f"format {report.format}" if args.to == "ckptcore" else f"layout {report.format}") + "; verified"
    )
    return 0
