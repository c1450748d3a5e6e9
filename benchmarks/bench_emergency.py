"""Emergency checkpointing on 4 jax.distributed CPU processes (issue 16).

Per run: train ``--steps`` steps saving the local tier every step and the persistent tier
every ``--persistent-every``, with ``--compute-s`` seconds of (simulated) training between
saves, as a real job has; then SIGKILL the job; resume (a) after deleting process 1's local
directory (replica hand-over) and (b) from the persistent tier only (every local directory
deleted), each with the page cache dropped first. Reports medians over ``--runs`` of: the
blocking time of saves that write the local tier only, and of saves that also start a
persistent save (the first save is left out of both); AsyncCheckpointer's blocking time (its snapshot) for the same state
at the same cadence (its first save left out too); the total local save time (snapshot to
commit, as seen by wait); restore times.

    python benchmarks/bench_emergency.py --total-mib 1024 --runs 3      # the issue's size
    python benchmarks/bench_emergency.py --total-mib 64 --runs 3        # quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_emergency as t
from pagecache import drop_page_cache  # a sibling module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--total-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--persistent-every", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=1, help="peers keeping a copy of each process's local shards")
    ap.add_argument("--compute-s", type=float, default=None,
                    help="seconds between saves (default: 6 s per GiB, at least 1 s)")
    args = ap.parse_args()
    # w (rows x cols float32) holds nearly all the bytes; cols fixed, rows scaled (divisible by 4 processes)
    cols = 1024
    rows = max(8, (args.total_mib << 20) // (4 * cols) // 8 * 8)
    compute_s = args.compute_s if args.compute_s is not None else max(1.0, 6.0 * args.total_mib / 1024)
    cfg = {"rows": rows, "cols": cols, "local_every": 1, "persistent_every": args.persistent_every,
           "compute_s": compute_s, "replicas": args.replicas}
    every = args.persistent_every
    rows_out = []
    for run in range(args.runs):
        tmp = Path(tempfile.mkdtemp(prefix="bench-emergency-"))
        try:
            persistent = str(tmp / "persistent")
            procs, outs = t.start_job(tmp, "train", persistent, steps=args.steps, wait_killed=True, **cfg)
            try:
                t.wait_files(outs, timeout=1200)
            finally:
                t.kill_all(procs)
            train = [json.loads(o.read_text()) for o in outs]
            assert all("error" not in r for r in train), train
            # save_blocking_s[i] is step i + 1; a step that is a multiple of `every` also starts a persistent save
            local_only = statistics.median(x for r in train for i, x in enumerate(r["save_blocking_s"])
                                           if i > 0 and (i + 1) % every)
            both = [x for r in train for i, x in enumerate(r["save_blocking_s"]) if i > 0 and (i + 1) % every == 0]
            async_snap = statistics.median(x for r in train for x in r["async_snapshot_s"][1:])
            local_total = statistics.median(r["local_total_s"] for r in train)
            shutil.rmtree(tmp / "local1")
            drop_page_cache()  # both resumes read from disk, as after a restart
            res = t.run_job(tmp, "resume", persistent, **cfg)
            replica = max(r["restore_s"] for r in res)
            lost_one_tier = "local" if args.replicas else "persistent"  # without a replica the lost shards are gone
            assert all(r["info"]["tier"] == lost_one_tier and r["identical"] for r in res)
            for i in range(4):
                shutil.rmtree(tmp / f"local{i}", ignore_errors=True)
            drop_page_cache()  # both resumes read from disk, as after a restart
            res = t.run_job(tmp, "resume", persistent, **cfg)
            assert all(r["info"]["tier"] == "persistent" and r["identical"] for r in res)
            persistent_s = max(r["restore_s"] for r in res)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        row = {"local_blocking_s": local_only,
               "local_and_persistent_blocking_s": statistics.median(both) if both else float("nan"),
               "async_snapshot_s": async_snap, "local_total_s": local_total,
               "resume_lost_one_local_s": replica, "resume_persistent_only_s": persistent_s}
        print(json.dumps({"run": run, **row}), flush=True)
        rows_out.append(row)
    print(f"\n4 processes x 2 CPU devices, {rows * cols * 4 / 2**20:.0f} MiB in all, {compute_s:g} s between saves, "
          f"{args.replicas} replica(s); "
          f"medians of {args.runs} runs (range)")
    print("| figure | seconds |\n|---|---|")
    for key in rows_out[0]:
        values = [r[key] for r in rows_out]
        print(f"| {key} | {_ms(statistics.median(values))} ({_ms(min(values))}-{_ms(max(values))}) |")
    print("GPU: no GPU was available for this run; the 4 GiB GPU figure was not measured.")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.3f} s"


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"(took {time.monotonic() - started:.0f} s)")
