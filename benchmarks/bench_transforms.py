"""Transformed restores and ``ckptcore verify`` vs a plain restore of the same checkpoint, side by side in one process.

Run:  python benchmarks/bench_transforms.py [--size-mb 1024] [--leaves 40] [--repeats 5] [--dir DIR] [--warm]

One checkpoint of ``--size-mb`` MiB of float32 in ``--leaves`` leaves
(``encoder/layer_<i>/kernel``) is saved once, then each repetition runs, in a rotating order:

* ``plain``:       ``ckptcore.restore(path, target)`` onto NumPy targets of the saved shapes.
* ``transformed``: the same onto a target whose every key is renamed
                   (``encoder/blocks/<i>/kernel``, via ``rename={r"^encoder/layer_(\\d+)/": ...}``)
                   with a ``value_fn`` on 10 % of the leaves (``saved * 0.5``, a new array).
* ``verify``:      ``ckptcore.verify(path)``: every byte read, every checksum checked, nothing kept.

The page cache is dropped before each measurement when permitted (root), else reads are
warm (``--warm`` forces warm reads). The first repetition is a discarded warm-up; the
table shows medians and ranges, and the speed of each relative to ``plain``.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
from pagecache import drop_page_cache  # a sibling module: the scripts run from benchmarks/

MiB = 1 << 20


def make_state(size_mb: int, leaves: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    n = size_mb * MiB // 4 // leaves
    return {"encoder": {f"layer_{i}": {"kernel": rng.standard_normal(n, dtype=np.float32)} for i in range(leaves)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the state (MiB)")
    parser.add_argument("--leaves", type=int, default=40, help="number of array leaves")
    parser.add_argument("--repeats", type=int, default=5, help="measured repetitions (after one warm-up)")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache")
    args = parser.parse_args()

    import ckptcore

    root = tempfile.mkdtemp(prefix="ckptcore-bench-transforms-", dir=args.dir)
    try:
        state = make_state(args.size_mb, args.leaves)
        nbytes = sum(leaf["kernel"].nbytes for leaf in state["encoder"].values())
        path = os.path.join(root, "ck")
        ckptcore.save(path, state)
        tiny = os.path.join(root, "tiny")
        ckptcore.save(tiny, {"a": np.zeros(16, np.float32)})
        n = next(iter(state["encoder"].values()))["kernel"].shape
        plain_target = {"encoder": {k: {"kernel": np.empty(n, np.float32)} for k in state["encoder"]}}
        renamed_target = {"encoder": {"blocks": {str(i): {"kernel": np.empty(n, np.float32)} for i in range(args.leaves)}}}
        every = max(1, round(args.leaves / (args.leaves * 0.1)))  # every 10th leaf: 10 %
        computed = [f"encoder/blocks/{i}/kernel" for i in range(0, args.leaves, every)]
        transforms = ckptcore.Transforms(
            rename={r"^encoder/layer_(\d+)/": r"encoder/blocks/\1/"},
            value_fn=dict.fromkeys(computed, lambda saved, target: saved * 0.5),
        )
        del state

        def plain() -> Any:
            return ckptcore.restore(path, plain_target)

        def transformed() -> Any:
            return ckptcore.restore(path, renamed_target, transforms=transforms)

        def verify() -> Any:
            report = ckptcore.verify(path)
            if not report.ok:
                raise SystemExit(f"verify found damage: {report.bad}")
            return report

        cases = {"plain": plain, "transformed": transformed, "verify": verify}
        cold = not args.warm and drop_page_cache()
        times: dict[str, list[float]] = {name: [] for name in cases}
        names = list(cases)
        for rep in range(args.repeats + 1):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                if cold:
                    drop_page_cache()
                    ckptcore.restore(tiny)  # reload the libraries' code pages: measure the data
                gc.collect()
                t = time.perf_counter()
                out = cases[name]()
                elapsed = time.perf_counter() - t
                if rep == 0 and name == "transformed":
                    report = ckptcore.last_restore_report()
                    assert report is not None and len(report.renamed) == args.leaves
                    assert len(report.computed) == len(computed)
                del out
                if rep:
                    times[name].append(elapsed)
            if rep:
                print(f"  repetition {rep}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()),
                      file=sys.stderr, flush=True)

        base = statistics.median(times["plain"])
        print(f"\n{args.size_mb} MiB in {args.leaves} leaves, {'cold (page cache dropped)' if cold else 'warm page cache'}; "
              f"median of {args.repeats} (range); value_fn on {len(computed)} of {args.leaves} leaves")
        print(f"{'case':<14}{'median s':>10}{'range s':>18}{'GB/s':>8}{'speed vs plain':>16}")
        for name, t in times.items():
            m = statistics.median(t)
            print(f"{name:<14}{m:>10.3f}{f'{min(t):.3f}-{max(t):.3f}':>18}{nbytes / m / 1e9:>8.2f}{base / m:>15.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
