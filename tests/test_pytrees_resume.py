"""Kill a training run (SIGKILL) mid-run and resume it from the manager's latest step (issue 11, item 7).

For Flax linen (a TrainState with a dropout key) and NNX (a module with a dropout stream
and its nnx.Optimizer): the run resumed from ``latest_step()`` onto an abstract target
ends bit-identical to an uninterrupted run. The training code is tests/pytrees_train_worker.py.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("optax")

WORKER = Path(__file__).with_name("pytrees_train_worker.py")
STEPS = 16
KILL_AFTER = 5  # saved steps seen before the kill


def _worker():
    spec = importlib.util.spec_from_file_location("pytrees_train_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_killed_run_resumes_bit_identical(tmp_path, kind):
    worker = _worker()
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), kind, str(tmp_path / "killed"), str(STEPS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        reference, _ = worker.run(kind, str(tmp_path / "reference"), STEPS)  # while the child starts
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        for _ in range(KILL_AFTER):
            if not proc.stdout.readline():
                raise AssertionError(f"the training process ended early: {proc.stderr.read()}")
        proc.send_signal(signal.SIGKILL)  # mid-run: training and a background save are under way
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()

    resumed, start = worker.run(kind, str(tmp_path / "killed"), STEPS, resume=True)
    assert KILL_AFTER - 1 <= start < STEPS  # resumed from a step the killed process committed
    assert resumed == reference
