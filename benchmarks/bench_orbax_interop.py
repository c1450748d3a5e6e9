"""ckptcore reading what orbax-checkpoint wrote, side by side with orbax reading its own (issue 13).

Run:  python benchmarks/bench_orbax_interop.py [--size-mb 1024] [--repeats 4] [--dir DIR]

* ``numpy``: ``--size-mb`` MiB of float32 NumPy arrays (8 leaves), saved once by orbax's
  StandardCheckpointer (OCDBT, its defaults); cold restore (page cache dropped) by ckptcore
  and by orbax, alternating, onto the same NumPy targets.
* ``jax``:   the same size as ``jax.Array``s on a (4, 2) mesh of 8 host devices, restored by
  both onto the saved sharding (``ShapeDtypeStruct`` targets), and by ckptcore also onto a
  (2, 4) mesh with the specs swapped (resharding).
* ``convert``: ``ckptcore.convert()`` of the NumPy checkpoint in this process, and the
  ``ckptcore convert`` command in a process of its own (Python's start included), vs ``cp -r``
  of the same directory followed by ``sync``; each cold, alternating.

The first repetition is a warm-up and is discarded; medians and ranges of the rest are shown.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
from pagecache import drop_page_cache  # a sibling module: the scripts run from benchmarks/

MiB = 1 << 20


def timed(fn: Any) -> float:
    drop_page_cache()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def block(tree: Any) -> Any:
    import jax

    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return tree


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=4, help="including the discarded warm-up")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()

    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import ckptcore

    base = tempfile.mkdtemp(prefix="bench-orbax-", dir=args.dir)
    n = 8
    rows = args.size_mb * MiB // n // 4 // 1024
    rng = np.random.default_rng(0)
    arrays = {f"w{i}": rng.standard_normal((rows, 1024), dtype=np.float32) for i in range(n)}
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    sharded = {k: jax.device_put(v, NamedSharding(mesh, P("x", "y"))) for k, v in arrays.items()}
    paths = {"numpy": os.path.join(base, "numpy"), "jax": os.path.join(base, "jax")}
    with ocp.StandardCheckpointer() as ck:
        ck.save(paths["numpy"], arrays)
        ck.save(paths["jax"], sharded)
    del sharded
    np_target = {k: np.empty_like(v) for k, v in arrays.items()}
    jax_target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, P("x", "y")))
                  for k, v in arrays.items()}
    other = jax.make_mesh((2, 4), ("a", "b"))
    reshard_target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(other, P("b", "a")))
                      for k, v in arrays.items()}
    total = sum(v.nbytes for v in arrays.values())

    def orbax_restore(path: str, target: Any) -> Any:
        with ocp.StandardCheckpointer() as ck:
            return block(ck.restore(path, target))

    def check(tree: Any) -> None:
        for k, v in arrays.items():
            assert np.array_equal(np.asarray(tree[k]), v), k

    check(ckptcore.restore(paths["numpy"], np_target))
    check(ckptcore.restore(paths["jax"], reshard_target))

    cases = {
        "numpy: ckptcore restores orbax's": lambda: ckptcore.restore(paths["numpy"], np_target),
        "numpy: orbax restores its own": lambda: orbax_restore(paths["numpy"], np_target),
        "jax (4,2): ckptcore restores orbax's": lambda: block(ckptcore.restore(paths["jax"], jax_target)),
        "jax (4,2): orbax restores its own": lambda: orbax_restore(paths["jax"], jax_target),
        "jax onto (2,4): ckptcore (resharding)": lambda: block(ckptcore.restore(paths["jax"], reshard_target)),
        "jax onto (2,4): orbax (resharding)": lambda: orbax_restore(paths["jax"], reshard_target),
    }
    converted = os.path.join(base, "converted")
    copied = os.path.join(base, "copied")

    def convert() -> None:
        ckptcore.convert(paths["numpy"], converted)  # durable (fsync'd) and verified when it returns

    def convert_command() -> None:
        # The `ckptcore convert` command in a process of its own, Python's start included.
        subprocess.run([sys.executable, "-c", "import sys; from ckptcore.cli.main import main; sys.exit(main())",
                        "convert", paths["numpy"], converted, "--no-progress"], check=True, stdout=subprocess.DEVNULL)

    def copy() -> None:
        subprocess.run(["cp", "-r", paths["numpy"], copied], check=True)
        subprocess.run(["sync"], check=True)

    conversions = [("convert: ckptcore.convert()", convert), ("convert: the ckptcore convert command", convert_command),
                   ("convert: cp -r + sync", copy)]
    results: dict[str, list[float]] = {name: [] for name in [*cases, *(name for name, _ in conversions)]}
    for rep in range(args.repeats):
        order = list(cases.items())
        if rep % 2:
            order.reverse()
        for name, fn in order:
            seconds = timed(fn)
            if rep:
                results[name].append(seconds)
        for name, fn in conversions if rep % 2 == 0 else reversed(conversions):
            shutil.rmtree(converted, ignore_errors=True)
            shutil.rmtree(copied, ignore_errors=True)
            drop_page_cache()  # syncs first: nothing of the previous case is left to flush
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
            if rep:
                results[name].append(seconds)
        print(f"repetition {rep} done", file=sys.stderr)
    check(ckptcore.restore(converted, np_target))
    shutil.rmtree(base, ignore_errors=True)

    print(f"\n{total / MiB:.0f} MiB, {n} leaves, median (min-max) of {args.repeats - 1} runs, cold page cache\n")
    print("| case | seconds | GB/s |")
    print("| --- | --- | --- |")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"| {name} | {med:.2f} ({min(times):.2f}-{max(times):.2f}) | {total / med / 1e9:.2f} |")
    ratio = lambda a, b: statistics.median(results[b]) / statistics.median(results[a])  # noqa: E731
    print()
    for ours, theirs in [("numpy: ckptcore restores orbax's", "numpy: orbax restores its own"),
                         ("jax (4,2): ckptcore restores orbax's", "jax (4,2): orbax restores its own"),
                         ("jax onto (2,4): ckptcore (resharding)", "jax onto (2,4): orbax (resharding)"),
                         ("convert: ckptcore.convert()", "convert: cp -r + sync"),
                         ("convert: the ckptcore convert command", "convert: cp -r + sync")]:
        print(f"- {ours} / {theirs}: speed {ratio(ours, theirs):.2f}x")


if __name__ == "__main__":
    main()
