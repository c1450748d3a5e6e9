"""Emergency checkpointing on 4 jax.distributed CPU processes (issue 16).

Per run: train ``--steps`` steps saving the local tier every step (persistent every 2),
then SIGKILL the job; resume (a) after deleting process 1's local directory (replica hand-over)
and (b) from the persistent tier only (every local directory deleted). Reports medians over
``--runs`` of: local-tier blocking time per save, AsyncCheckpointer's snapshot (blocking) time
for the same state, total local save time (snapshot to commit, as seen by wait), restore times.

    python benchmarks/bench_emergency.py --total-mib 1024 --runs 3      # the issue's size
    python benchmarks/bench_emergency.py --total-mib 64 --runs 3        # a 2-core machine
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

import test_emergency as t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--total-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    # w (rows x cols float32) holds nearly all the bytes; cols fixed, rows scaled (divisible by 4 processes)
    cols = 1024
    rows = max(8, (args.total_mib << 20) // (4 * cols) // 8 * 8)
    cfg = {"rows": rows, "cols": cols, "local_every": 1, "persistent_every": 2}
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
            blocking = statistics.median(x for r in train for x in r["save_blocking_s"][1:])
            async_snap = statistics.median(r["async_snapshot_s"] for r in train)
            local_total = statistics.median(r["local_total_s"] for r in train)
            shutil.rmtree(tmp / "local1")
            res = t.run_job(tmp, "resume", persistent, **cfg)
            replica = max(r["restore_s"] for r in res)
            assert all(r["info"]["tier"] == "local" and r["identical"] for r in res)
            for i in range(4):
                shutil.rmtree(tmp / f"local{i}", ignore_errors=True)
            res = t.run_job(tmp, "resume", persistent, **cfg)
            assert all(r["info"]["tier"] == "persistent" and r["identical"] for r in res)
            persistent_s = max(r["restore_s"] for r in res)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        row = {"local_blocking_s": blocking, "async_snapshot_s": async_snap, "local_total_s": local_total,
               "resume_lost_one_local_s": replica, "resume_persistent_only_s": persistent_s}
        print(json.dumps({"run": run, **row}), flush=True)
        rows_out.append(row)
    print(f"\n4 processes x 2 CPU devices, {rows * cols * 4 / 2**20:.0f} MiB in all, medians of {args.runs} runs")
    print("| figure | seconds |\n|---|---|")
    for key in rows_out[0]:
        print(f"| {key} | {statistics.median(r[key] for r in rows_out):.3f} |")
    print("GPU: no GPU was available for this run; the 4 GiB GPU figure was not measured.")


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"(took {time.monotonic() - started:.0f} s)")
