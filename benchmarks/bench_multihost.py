"""Multi-process save and restore: ckptcore vs orbax-checkpoint with 1, 2 and 4 JAX processes.

Run:  python benchmarks/bench_multihost.py [--size-mb 1024] [--repeats 3] [--processes 1,2,4] [--dir DIR]

Every configuration is a real ``jax.distributed`` job on 127.0.0.1 with 8 CPU devices in
all (8/N per process). The state is ``--size-mb`` MiB of float32: 7/8 of it sharded over
every device, 1/8 replicated on every device (so each process holds a replica of it, and a
correct multi-process save writes it once). Per configuration and implementation:

* save: time until the checkpoint is committed and durable, the slowest process's;
* restore: onto the same sharding, page cache dropped first when permitted (root);
* bytes written per process (ckptcore: ``<format>/process_<i>/``; orbax: ``ocdbt.process_<i>/``,
  the rest counted as process 0's);
* coordination: the median save time of a 16-byte state, and the time the primary spent in
  the key-value store (puts and waits) during it.

Implementations alternate within each repetition, the first repetition is a discarded
warm-up, medians are shown. The machine is shared and its disk swings: compare within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from pagecache import drop_page_cache  # a sibling module: the scripts run from benchmarks/

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)




# -- one process of a job ----------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    os.environ.pop("XLA_FLAGS", None)
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_num_cpu_devices", 8 // args.n)
    if args.n > 1:
        jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.n, process_id=args.id)
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import ckptcore
    from ckptcore.parallel import jax_coordinator as distributed
    from ckptcore.parallel.jax_state import distributed_state

    me = jax.process_index()
    client = distributed_state().client if args.n > 1 else None
    counter = [0]

    def barrier() -> None:
        if client is not None:
            counter[0] += 1
            client.wait_at_barrier(f"bench-{counter[0]}", 600_000)

    mesh = jax.make_mesh((8,), ("x",), devices=jax.devices())
    sharded_bytes = args.size_mb * MiB * 7 // 8
    arrays = 8
    rows = sharded_bytes // arrays // 4 // 1024 // 8 * 8
    rng = np.random.default_rng(0)

    def make(shape: tuple[int, ...], spec: Any, seed: int) -> Any:
        def piece(index: Any) -> Any:
            sub = np.random.default_rng(seed + (index[0].start or 0))
            n = [len(range(*s.indices(d))) for s, d in zip(index, shape, strict=True)]
            return sub.standard_normal(n, dtype=np.float32)

        return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), piece)

    state = {f"w{k}": make((rows, 1024), P("x"), 1000 * k) for k in range(arrays)}
    state["replicated"] = make((max(8, args.size_mb * MiB // 8 // 4 // 1024), 1024), P(), 99)
    del rng
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in state.items()}
    tiny = {"x": jax.device_put(np.arange(4, dtype=np.float32), NamedSharding(mesh, P()))}

    import orbax.checkpoint as ocp

    orbax = ocp.StandardCheckpointer()

    def ck_save(path: str, tree: Any) -> None:
        ckptcore.save(path, tree)

    def ck_restore(path: str) -> Any:
        return ckptcore.restore(path, abstract)

    def ob_save(path: str, tree: Any) -> None:
        orbax.save(path, tree)
        orbax.wait_until_finished()

    def ob_restore(path: str) -> Any:
        return orbax.restore(path, abstract)

    impls = {"ckptcore": (ck_save, ck_restore), "orbax": (ob_save, ob_restore)}
    results: dict[str, Any] = {name: {"save": [], "restore": []} for name in impls}
    root = args.dir
    for rep in range(args.repeats + 1):
        order = list(impls) if rep % 2 == 0 else list(impls)[::-1]
        for name in order:
            save, restore = impls[name]
            path = f"{root}/{name}-{rep}"
            barrier()
            start = time.perf_counter()
            save(path, state)
            barrier()
            save_s = time.perf_counter() - start
            if me == 0:
                drop_page_cache()
            barrier()
            start = time.perf_counter()
            restored = restore(path)
            jax.block_until_ready(restored)
            barrier()
            restore_s = time.perf_counter() - start
            del restored
            if rep > 0:  # repetition 0 is the warm-up
                results[name]["save"].append(save_s)
                results[name]["restore"].append(restore_s)
            if rep == args.repeats and me == 0:
                results[name]["bytes_by_process"] = bytes_by_process(name, path, args.n)
                results[name]["total_bytes"] = dir_bytes(path)
            barrier()
            if rep < args.repeats and me == 0:
                shutil.rmtree(path, ignore_errors=True)
    # Coordination: a tiny state's save (and, for ckptcore, the primary's time in the KV store).
    kv_time = [0.0]
    if args.n > 1:
        original_put, original_wait = distributed._put, distributed.Scope._wait

        def timed_put(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return original_put(*a, **k)
            finally:
                kv_time[0] += time.perf_counter() - start

        def timed_wait(self: Any, *a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return original_wait(self, *a, **k)
            finally:
                kv_time[0] += time.perf_counter() - start

        distributed._put = timed_put
        distributed.Scope._wait = timed_wait  # type: ignore[method-assign]
    for name, (save, _) in impls.items():
        times, kv = [], []
        for k in range(args.tiny_repeats):
            barrier()
            kv_time[0] = 0.0
            start = time.perf_counter()
            save(f"{root}/tiny-{name}-{k}", tiny)
            times.append(time.perf_counter() - start)
            kv.append(kv_time[0])
        results[name]["tiny_save_s"] = statistics.median(times[1:])
        if name == "ckptcore":
            results[name]["tiny_kv_s"] = statistics.median(kv[1:])
    orbax.close()
    with open(args.out, "w") as f:
        json.dump({"process": me, "results": results}, f)
    sys.stdout.flush()
    os._exit(0)  # jax.distributed's shutdown barrier adds seconds and nothing to measure


def bytes_by_process(name: str, path: str, n: int) -> list[int]:
    if name == "ckptcore":
        base = f"{path}/ocdbt"
        if n == 1:
            return [dir_bytes(path)]
        counts = [dir_bytes(f"{base}/process_{i}") for i in range(n)]
    else:
        counts = [dir_bytes(f"{path}/ocdbt.process_{i}") for i in range(n)]
    counts[0] += dir_bytes(path) - sum(counts)  # index, metadata: the primary's
    return counts


# -- the parent: one job per configuration -------------------------------------------------


def run(n: int, args: argparse.Namespace, root: str) -> dict[str, Any]:
    port = free_port()
    directory = tempfile.mkdtemp(prefix=f"p{n}-", dir=root)
    procs, outs = [], []
    for i in range(n):
        out = os.path.join(directory, f"result-{i}.json")
        argv = [
            sys.executable, __file__, "--worker", "--port", str(port), "--n", str(n), "--id", str(i),
            "--size-mb", str(args.size_mb), "--repeats", str(args.repeats), "--tiny-repeats", str(args.tiny_repeats),
            "--dir", directory, "--out", out,
        ]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL if i else None))
        outs.append(out)
    for p in procs:
        if p.wait(timeout=3600) != 0:
            raise SystemExit(f"a worker of the {n}-process job failed (exit {p.returncode})")
    per_process = [json.load(open(o))["results"] for o in outs]
    shutil.rmtree(directory, ignore_errors=True)
    merged: dict[str, Any] = {}
    for name in per_process[0]:
        # The job's time is its slowest process's (they end at a barrier, so they agree closely).
        merged[name] = {
            "save": statistics.median(max(p[name]["save"][k] for p in per_process) for k in range(args.repeats)),
            "restore": statistics.median(max(p[name]["restore"][k] for p in per_process) for k in range(args.repeats)),
            "bytes_by_process": per_process[0][name]["bytes_by_process"],
            "total_bytes": per_process[0][name]["total_bytes"],
            "tiny_save_s": max(p[name]["tiny_save_s"] for p in per_process),
            "tiny_kv_s": per_process[0][name].get("tiny_kv_s"),
        }
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny-repeats", type=int, default=11)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    root = tempfile.mkdtemp(prefix="ckptcore-bench-mh-", dir=args.dir)
    size = args.size_mb * MiB
    print(f"state: {args.size_mb} MiB (7/8 sharded over 8 CPU devices, 1/8 replicated); "
          f"medians of {args.repeats} after a warm-up; page cache dropped before restores: {drop_page_cache()}")
    header = (f"{'procs':>5} {'impl':<9} {'save s':>7} {'save GB/s':>9} {'restore s':>9} {'rest GB/s':>9} "
              f"{'MiB written per process':<28} {'tiny save ms':>12} {'KV ms':>6}")
    print(header)
    try:
        for n in (int(x) for x in args.processes.split(",")):
            for name, r in run(n, args, root).items():
                total = r["total_bytes"] / MiB
                per = "/".join(f"{b / MiB:.0f}" for b in r["bytes_by_process"]) + f" (total {total:.0f})"
                kv = f"{r['tiny_kv_s'] * 1e3:6.1f}" if r.get("tiny_kv_s") is not None else f"{'-':>6}"
                print(f"{n:>5} {name:<9} {r['save']:7.2f} {size / r['save'] / 1e9:9.2f} {r['restore']:9.2f} "
                      f"{size / r['restore'] / 1e9:9.2f} {per:<28} "
                      f"{r['tiny_save_s'] * 1e3:12.1f} {kv}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
