"""One process of tests/test_evaluator_race.py: the writer, or one reader (never imported by pytest).

    python tests/evaluator_race_worker.py writer ROOT SECONDS OUT
    python tests/evaluator_race_worker.py reader ROOT DONE_FILE OUT

The writer saves steps with ``max_to_keep=1`` as fast as it can for SECONDS, then creates
DONE_FILE's sibling ``done``. A reader follows the run with ``checkpoints_iterator`` and
restores every step it is handed, checking its values, until the writer is done. Each
writes a JSON result to OUT.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import numpy as np

import ckptcore


def state(step: int) -> dict[str, object]:
    return {"x": np.full(4096, step, dtype=np.int64), "y": np.arange(1024, dtype=np.float32) + step, "step": step}


def writer(root: str, seconds: float, out: str) -> None:
    options = ckptcore.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
    saved = 0
    deadline = time.monotonic() + seconds
    with ckptcore.CheckpointManager(root, options) as mgr:
        step = 0
        while time.monotonic() < deadline:
            mgr.save(step, state(step), force=True)
            saved += 1
            step += 1
    with open(os.path.join(root, "..", "done"), "w") as f:
        f.write(str(saved))
    with open(out, "w") as f:
        json.dump({"saved": saved}, f)


def reader(root: str, done: str, out: str) -> None:
    handed: list[int] = []
    failures: list[str] = []
    while not os.path.exists(os.path.join(root, "ckptcore_manager.json")):
        time.sleep(0.01)
    mgr = ckptcore.CheckpointManager(root, ckptcore.CheckpointManagerOptions(read_only=True))
    for step in ckptcore.checkpoints_iterator(
        root, timeout=0.5, timeout_fn=lambda: os.path.exists(done), seconds_to_sleep=0.005
    ):
        handed.append(step)
        try:
            restored = mgr.restore(step)
            assert restored["step"] == step and (restored["x"] == step).all(), restored
            np.testing.assert_array_equal(restored["y"], np.arange(1024, dtype=np.float32) + step)
            time.sleep(0.01)  # an evaluation takes a while: retention runs meanwhile
            restored = mgr.restore(step)  # the step is still there
            assert restored["step"] == step
        except Exception:
            failures.append(f"step {step}: {traceback.format_exc()}")
    with open(out, "w") as f:
        json.dump({"handed": handed, "failures": failures}, f)


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "writer":
        writer(sys.argv[2], float(sys.argv[3]), sys.argv[4])
    else:
        reader(sys.argv[2], sys.argv[3], sys.argv[4])
