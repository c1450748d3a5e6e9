"""Device check: asynchronous save of a 4 GiB jax.Array state on the default device (issue 5, item 8).

Run:  python benchmarks/gpu_async_check.py [--size-gb 4] [--arrays 16] [--repeats 2] [--dir DIR]

Measures, for ckptcore.AsyncCheckpointer and (if importable) orbax-checkpoint's
AsyncCheckpointer, the blocking time of ``save`` (until training may go on) and the total
time until the checkpoint is committed, beside ``jax.device_get`` of the whole state (the
device-to-host floor). Prints a table and one JSON line. Meant to finish within about four
minutes: repetitions stop early when the time budget (``--budget-s``) is spent.
On a CPU-only machine, ``--size-gb 0.25`` is a quick smoke test.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

GiB = 1 << 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_ckptcore() -> Any:
    """ckptcore from the installed distributions, or from this checkout if not installed."""
    try:
        importlib.metadata.distribution("ckptcore-posix")
        importlib.metadata.distribution("ckptcore-zarr3")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    if not installed:
        for path in (ROOT, os.path.join(ROOT, "plugins", "posix", "src"), os.path.join(ROOT, "plugins", "zarr3", "src")):
            sys.path.insert(0, path)
    import ckptcore

    if not installed:
        import ckptcore_posix
        import ckptcore_zarr3

        ckptcore.register_plugin(ckptcore_posix, name="posix")
        ckptcore.register_plugin(ckptcore_zarr3, name="zarr3")
    return ckptcore


def build_state(size_gb: float, arrays: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    n = int(size_gb * GiB) // 4 // arrays
    keys = jax.random.split(jax.random.key(0), arrays)
    state = {f"layer{i:02d}": jax.random.normal(keys[i], (n,), dtype=jnp.float32) for i in range(arrays)}
    jax.block_until_ready(state)
    return state


def timed(save: Any, wait: Any) -> tuple[float, float]:
    t0 = time.perf_counter()
    save()
    t1 = time.perf_counter()
    wait()
    return t1 - t0, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--arrays", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=180.0, help="stop starting repetitions after this")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    started = time.perf_counter()

    import jax

    ckptcore = import_ckptcore()
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        ocp = None

    device = jax.devices()[0]
    state = build_state(args.size_gb, args.arrays)
    nbytes = sum(v.nbytes for v in state.values())
    directory = tempfile.mkdtemp(prefix="gpu-async-", dir=args.dir)
    results: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    ck = ckptcore.AsyncCheckpointer()
    ob = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()) if ocp is not None else None
    try:
        # Warm-up on a small state: plugin loading, TensorStore and orbax start-up.
        small = {k: v[:1024] for k, v in list(state.items())[:2]}
        ck.save(os.path.join(directory, "warm-ck"), small)
        ck.wait_until_finished()
        if ob is not None:
            ob.save(os.path.join(directory, "warm-ob"), args=ocp.args.StandardSave(small))
            ob.wait_until_finished()

        for rep in range(args.repeats):
            if rep and time.perf_counter() - started > args.budget_s:
                print(f"time budget spent: stopping after {rep} repetition(s)", flush=True)
                break
            t0 = time.perf_counter()
            host = jax.device_get(state)
            record("jax.device_get (floor)|blocking", time.perf_counter() - t0)
            del host
            order = ["ckptcore", "orbax"] if rep % 2 == 0 else ["orbax", "ckptcore"]
            for name in order:
                path = os.path.join(directory, f"{name}-{rep}")
                if name == "ckptcore":
                    blocking, total = timed(lambda p=path: ck.save(p, state), ck.wait_until_finished)
                elif ob is not None:
                    blocking, total = timed(
                        lambda p=path: ob.save(p, args=ocp.args.StandardSave(state)), ob.wait_until_finished
                    )
                else:
                    continue
                record(f"{name}|blocking", blocking)
                record(f"{name}|total", total)
                shutil.rmtree(path, ignore_errors=True)
            print(f"repetition {rep} done at {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        ck.close()
        if ob is not None:
            ob.close()
        shutil.rmtree(directory, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\ndevice: {device.platform} {getattr(device, 'device_kind', '')}; state: {args.arrays} arrays, "
          f"{nbytes / GiB:.2f} GiB float32; medians of {len(results.get('ckptcore|total', []))}; "
          f"orbax {'present' if ob is not None else 'not importable'}")
    print(f"{'measure':34} {'seconds':>9} {'GB/s':>7}")
    for key in sorted(med):
        print(f"{key.replace('|', ' '):34} {med[key]:9.3f} {nbytes / med[key] / 1e9:7.2f}")
    if "orbax|total" in med:
        print(f"orbax total / ckptcore total: {med['orbax|total'] / med['ckptcore|total']:.2f}; "
              f"ckptcore blocking / orbax blocking: {med['ckptcore|blocking'] / med['orbax|blocking']:.2f}")
    print(json.dumps({"device": device.platform, "bytes": nbytes, "medians_s": med, "runs_s": results}))
    print(f"finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
