"""ckptcore vs orbax-checkpoint on local object-store emulators.

Starts fake-gcs-server (GCS) and moto_server (S3) on 127.0.0.1, each behind a counting
proxy (ckptcore_testing.faultproxy, no faults), then saves and restores a state of
``--arrays`` float32 arrays (``--size-mb`` in total, default 8 x 128 MiB = 1 GiB):

* ckptcore -> gs://   (ckptcore.save / ckptcore.restore)
* orbax    -> gs://   (orbax.checkpoint.StandardCheckpointer, same emulator)
* ckptcore -> s3://   (orbax-checkpoint cannot write to S3)

Systems alternate within each repetition; the first repetition is a warm-up and is
dropped when there are more than one. Reported: median save/restore throughput, HTTP
requests per save and restore (counted at the proxy), objects created per checkpoint.

    python benchmarks/bench_cloud.py --size-mb 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from ckptcore_testing import servers
from ckptcore_testing.faultproxy import FaultProxy


def _state(size_mb: int, arrays: int) -> dict[str, Any]:
    import numpy as np

    per = max(1, size_mb * (1 << 20) // arrays // 4)
    rng = np.random.default_rng(0)
    # Random data: incompressible, like trained weights; generated once, reused by all systems.
    return {f"layer{i}": rng.standard_normal(per, dtype=np.float32).reshape(-1, 1024 if per % 1024 == 0 else 1)
            for i in range(arrays)}


def _objects(url: str) -> int:
    from ckptcore import storage

    loc = storage.resolve(url)
    return len(loc.fs.find(loc.path))


def _delete(url: str) -> None:
    from ckptcore import storage

    loc = storage.resolve(url)
    try:
        loc.fs.rm(loc.path, recursive=True)
    except FileNotFoundError:
        pass


def _check(restored: dict[str, Any], state: dict[str, Any]) -> None:
    import numpy as np

    for k, v in state.items():
        if not np.array_equal(np.asarray(restored[k]), v):
            raise AssertionError(f"restored {k} differs")


def _ckptcore_run(url: str) -> tuple[Callable[[dict], None], Callable[[dict], dict]]:
    import ckptcore

    return (lambda s: ckptcore.save(url, s)), (lambda s: ckptcore.restore(url))


def _orbax_run(url: str) -> tuple[Callable[[dict], None], Callable[[dict], dict]]:
    import orbax.checkpoint as ocp

    def save(state: dict) -> None:
        with ocp.StandardCheckpointer() as ck:
            ck.save(url, state)
            ck.wait_until_finished()

    def restore(state: dict) -> dict:
        with ocp.StandardCheckpointer() as ck:
            return ck.restore(url)

    return save, restore


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="total state size in MiB (default 1024)")
    parser.add_argument("--arrays", type=int, default=8, help="number of float32 arrays (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions; the first is a warm-up if > 1")
    parser.add_argument("--no-orbax", action="store_true", help="skip orbax-checkpoint")
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="ckptcore-bench-cloud-")
    gcs = servers.start_fake_gcs()  # in memory: the disk would be what is measured
    s3 = servers.start_moto()
    gcs_proxy, s3_proxy = FaultProxy(gcs.endpoint), FaultProxy(s3.endpoint)
    try:
        # Before any client exists: every client (gcsfs, TensorStore, orbax, s3fs) goes through the proxies.
        os.environ.update(servers.gcs_env(gcs_proxy.endpoint))
        os.environ.update(servers.s3_env(s3_proxy.endpoint))
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        servers.create_gcs_bucket(gcs.endpoint, "bench")
        servers.create_s3_bucket(s3.endpoint, "bench")

        state = _state(args.size_mb, args.arrays)
        nbytes = sum(v.nbytes for v in state.values())
        systems: list[tuple[str, str, Callable[[str], Any], FaultProxy]] = [
            ("ckptcore gs://", "gs://bench/ckptcore", _ckptcore_run, gcs_proxy),
        ]
        if not args.no_orbax:
            systems.append(("orbax gs://", "gs://bench/orbax", _orbax_run, gcs_proxy))
        systems.append(("ckptcore s3://", "s3://bench/ckptcore", _ckptcore_run, s3_proxy))

        results: dict[str, dict[str, list[float]]] = {name: {} for name, *_ in systems}
        for rep in range(args.repeats):
            for name, base, make, proxy in systems:
                url = f"{base}-{rep}"
                save, restore = make(url)
                proxy.reset()
                t0 = time.perf_counter()
                save(state)
                t_save = time.perf_counter() - t0
                save_requests = proxy.stats().requests
                objects = _objects(url)
                proxy.reset()
                t0 = time.perf_counter()
                restored = restore(state)
                t_restore = time.perf_counter() - t0
                restore_requests = proxy.stats().requests
                _check(restored, state)
                del restored
                _delete(url)
                r = results[name]
                for key, value in (("save_s", t_save), ("restore_s", t_restore), ("save_req", save_requests),
                                   ("restore_req", restore_requests), ("objects", objects)):
                    r.setdefault(key, []).append(value)
                print(f"rep {rep} {name:16s} save {t_save:6.2f}s restore {t_restore:6.2f}s "
                      f"requests {save_requests}/{restore_requests} objects {objects}", file=sys.stderr, flush=True)

        skip = 1 if args.repeats > 1 else 0
        gib = nbytes / (1 << 30)
        print(f"\nState: {args.arrays} x float32, {nbytes / (1 << 20):.0f} MiB; medians of {args.repeats - skip} "
              f"repetition(s){' after a warm-up' if skip else ''}; emulators on 127.0.0.1 behind a counting proxy.\n")
        print("| system | save GiB/s | restore GiB/s | save requests | restore requests | objects created |")
        print("|---|---|---|---|---|---|")
        for name, r in results.items():
            med = {k: statistics.median(v[skip:]) for k, v in r.items()}
            print(f"| {name} | {gib / med['save_s']:.3f} | {gib / med['restore_s']:.3f} | {med['save_req']:.0f} | "
                  f"{med['restore_req']:.0f} | {med['objects']:.0f} |")
        if "orbax gs://" in results:
            c, o = results["ckptcore gs://"], results["orbax gs://"]
            ratio_save = statistics.median(o["save_s"][skip:]) / statistics.median(c["save_s"][skip:])
            ratio_restore = statistics.median(o["restore_s"][skip:]) / statistics.median(c["restore_s"][skip:])
            print(f"\nckptcore / orbax on GCS: save {ratio_save:.2f}x, restore {ratio_restore:.2f}x throughput")
    finally:
        gcs_proxy.close()
        s3_proxy.close()
        gcs.stop()
        s3.stop()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
