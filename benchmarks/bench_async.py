"""Asynchronous save: ckptcore.AsyncCheckpointer vs orbax-checkpoint's AsyncCheckpointer.

Run:  python benchmarks/bench_async.py [--size-mb 1024] [--arrays 8] [--repeats 3] [--dir DIR]

Same data for both (``--arrays`` float32 arrays totalling ``--size-mb`` MiB), both
asynchronous, to local disk:

* blocking time of ``save`` (until the caller may go on) for the state as NumPy arrays and
  as ``jax.Array``\\ s sharded over 8 host devices, beside a plain ``np.copy`` of the state
  (the floor for a copying snapshot: fresh memory, so page faults included), a single-thread
  ``np.copyto`` into memory already touched (memcpy alone), and ckptcore's ``donate=True``;
* total time until the checkpoint is committed (``wait_until_finished``);
* host memory held by snapshots (tracemalloc peak) for three back-to-back saves, with
  ckptcore's default (one save at a time), a byte budget of two snapshots, and donate.

Implementations alternate within each repetition, the first repetition is a discarded
warm-up, the table shows medians. The disk's throughput swings between runs: only ratios
within one run mean much.
"""

from __future__ import annotations

import os

# Before JAX is imported anywhere: 8 host devices to shard the jax.Array state over.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import gc
import shutil
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

MiB = 1 << 20


def numpy_state(size_mb: int, arrays: int) -> dict[str, np.ndarray]:
    n = size_mb * MiB // 4 // arrays
    rng = np.random.default_rng(0)
    return {f"layer{i}": rng.standard_normal(n, dtype=np.float32) for i in range(arrays)}


def jax_state(state: dict[str, np.ndarray]) -> dict[str, Any]:
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((8,), ("x",), devices=jax.devices()[:8])
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    out = {k: jax.device_put(v, sharding) for k, v in state.items()}
    jax.block_until_ready(out)
    return out


class Run:
    """One timed save: blocking seconds and seconds until committed."""

    def __init__(self, blocking: float, total: float) -> None:
        self.blocking, self.total = blocking, total


def timed(save: Callable[[], None], wait: Callable[[], None]) -> Run:
    gc.collect()
    t0 = time.perf_counter()
    save()
    t1 = time.perf_counter()
    wait()
    t2 = time.perf_counter()
    return Run(t1 - t0, t2 - t0)


class Ckptcore:
    name = "ckptcore"

    def __init__(self) -> None:
        import ckptcore

        self.ck = ckptcore.AsyncCheckpointer()

    def run(self, path: str, state: Any, donate: bool = False) -> Run:
        return timed(lambda: self.ck.save(path, state, donate=donate), self.ck.wait_until_finished)


class Orbax:
    name = "orbax"

    def __init__(self) -> None:
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.ck = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())

    def run(self, path: str, state: Any, donate: bool = False) -> Run:
        args = self.ocp.args.StandardSave(state)
        return timed(lambda: self.ck.save(path, args=args), self.ck.wait_until_finished)


def copy_floor(state: dict[str, np.ndarray]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    copies = {k: np.copy(v) for k, v in state.items()}
    elapsed = time.perf_counter() - t0
    del copies
    return elapsed


def copyto_floor(state: dict[str, np.ndarray], buffers: dict[str, np.ndarray]) -> float:
    """A single-threaded memcpy into memory already touched: what a copy costs without page faults."""
    t0 = time.perf_counter()
    for k, v in state.items():
        np.copyto(buffers[k], v)
    return time.perf_counter() - t0


def snapshot_memory(directory: str, state: dict[str, np.ndarray], nbytes: int) -> dict[str, float]:
    """tracemalloc peak (MiB) over three back-to-back saves and their writes."""
    import ckptcore

    out = {}
    for label, kwargs, donate in (
        ("default (one save at a time)", {}, False),
        ("max_bytes_in_flight = 2 snapshots", {"max_bytes_in_flight": 2 * nbytes}, False),
        ("donate=True", {}, True),
    ):
        gc.collect()
        tracemalloc.start()
        with ckptcore.AsyncCheckpointer(**kwargs) as ck:
            for i in range(3):
                ck.save(os.path.join(directory, f"mem-{i}"), state, donate=donate)
        out[label] = tracemalloc.get_traced_memory()[1] / MiB
        tracemalloc.stop()
        for i in range(3):
            shutil.rmtree(os.path.join(directory, f"mem-{i}"), ignore_errors=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--arrays", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="measured repetitions (after one warm-up)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()

    directory = tempfile.mkdtemp(prefix="bench-async-", dir=args.dir)
    state = numpy_state(args.size_mb, args.arrays)
    nbytes = sum(v.nbytes for v in state.values())
    jstate = jax_state(state)
    impls = [Ckptcore(), Orbax()]
    buffers = {k: np.ones_like(v) for k, v in state.items()}
    results: dict[str, list[float]] = {}

    def record(key: str, value: float, rep: int) -> None:
        if rep > 0:  # repetition 0 is the warm-up
            results.setdefault(key, []).append(value)

    try:
        for rep in range(args.repeats + 1):
            record("np.copy (floor)|blocking", copy_floor(state), rep)
            record("np.copyto, preallocated (memcpy)|blocking", copyto_floor(state, buffers), rep)
            order = impls if rep % 2 == 0 else impls[::-1]
            for kind, data in (("numpy", state), ("jax", jstate)):
                for impl in order:
                    path = os.path.join(directory, f"{impl.name}-{kind}-{rep}")
                    run = impl.run(path, data)
                    record(f"{impl.name} {kind}|blocking", run.blocking, rep)
                    record(f"{impl.name} {kind}|total", run.total, rep)
                    shutil.rmtree(path, ignore_errors=True)
            path = os.path.join(directory, f"donate-{rep}")
            run = impls[0].run(path, state, donate=True)
            record("ckptcore numpy donate=True|blocking", run.blocking, rep)
            record("ckptcore numpy donate=True|total", run.total, rep)
            shutil.rmtree(path, ignore_errors=True)
            print(f"repetition {rep} done{' (warm-up, discarded)' if rep == 0 else ''}", flush=True)
        memory = {} if args.skip_memory else snapshot_memory(directory, state, nbytes)
    finally:
        for impl in impls:
            impl.ck.close()
        shutil.rmtree(directory, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    gib = nbytes / (1 << 30)
    print(f"\nstate: {args.arrays} x {nbytes // args.arrays // MiB} MiB float32 = {gib:.2f} GiB; "
          f"medians of {args.repeats} (after 1 warm-up); {os.cpu_count()} CPUs")
    print(f"{'measure':44} {'seconds':>9} {'GB/s':>7}")
    for key in sorted(med):
        print(f"{key.replace('|', ' '):44} {med[key]:9.3f} {nbytes / med[key] / 1e9:7.2f}")
    floor = med["np.copy (floor)|blocking"]

    def ratio(a: str, b: str) -> str:
        return f"{med[a] / med[b]:.2f}"

    print("\nratios")
    print(f"  ckptcore numpy blocking / np.copy            {ratio('ckptcore numpy|blocking', 'np.copy (floor)|blocking')}"
          "   (target <= 1.2)")
    print(f"  ckptcore numpy blocking / orbax numpy        {ratio('ckptcore numpy|blocking', 'orbax numpy|blocking')}"
          "   (target <= 1)")
    print(f"  ckptcore numpy blocking / np.copyto memcpy   "
          f"{ratio('ckptcore numpy|blocking', 'np.copyto, preallocated (memcpy)|blocking')}")
    print(f"  ckptcore donate blocking / np.copy           "
          f"{med['ckptcore numpy donate=True|blocking'] / floor:.3f}  (target: near 0)")
    print(f"  ckptcore jax blocking / orbax jax            {ratio('ckptcore jax|blocking', 'orbax jax|blocking')}"
          "   (target <= 1)")
    for kind in ("numpy", "jax"):
        print(f"  orbax {kind} total / ckptcore {kind} total{' ' * (13 - len(kind) * 2)}"
              f"{ratio(f'orbax {kind}|total', f'ckptcore {kind}|total')}   (target >= 1.5)")
    if memory:
        print("\nhost memory held by snapshots over 3 back-to-back saves (tracemalloc peak, MiB)")
        for label, peak in memory.items():
            print(f"  {label:40} {peak:8.0f}   ({peak * MiB / nbytes:.2f} x state)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
