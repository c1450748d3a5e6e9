"""Evaluators following a training run in another process: every step once, in order, protected while read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import ckptcore
from ckptcore import CheckpointManager, CheckpointManagerOptions

PY = sys.executable

# A training run in its own process: saves steps 0..N-1 keeping only the newest one, and
# before saving step s+1 waits until the evaluator said it is reading step s ("go_<s>").
TRAINER = """
import os, sys, time, numpy as np
from ckptcore import CheckpointManager, CheckpointManagerOptions
root, signals, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
opts = CheckpointManagerOptions(max_to_keep=1, step_prefix="step", enable_async_checkpointing=True)
with CheckpointManager(root, opts) as mgr:
    for s in range(n):
        if s > 0:
            while not os.path.exists(os.path.join(signals, f"go_{s - 1}")):
                time.sleep(0.01)
        mgr.save(s, {"w": np.full(256, float(s)), "s": s}, metrics={"loss": 1.0 / (s + 1)})
print("done", flush=True)
"""


def start_trainer(root, signals, n) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "-c", textwrap.dedent(TRAINER), str(root), str(signals), str(n)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_iterator_yields_every_step_once_in_order_and_protects_it(tmp_path):
    root, signals = tmp_path / "run", tmp_path / "signals"
    signals.mkdir()
    n = 5
    trainer = start_trainer(root, signals, n)
    seen = []
    try:
        reader = None
        for step in ckptcore.checkpoints_iterator(
            root, timeout=1.0, timeout_fn=lambda: trainer.poll() is not None, seconds_to_sleep=0.05
        ):
            seen.append(step)
            (signals / f"go_{step}").touch()
            if step < n - 1:
                # The trainer commits the next step; max_to_keep=1 would delete this one,
                # but the lease we hold keeps it until we ask for the next step.
                assert ckptcore.wait_for_new_checkpoint(root, step, timeout=60, seconds_to_sleep=0.02) == step + 1
            if reader is None:
                reader = CheckpointManager(root, CheckpointManagerOptions(read_only=True))
            reader.reload()
            restored = reader.restore(step)
            assert restored["s"] == step
            np.testing.assert_array_equal(restored["w"], np.full(256, float(step)))
            assert reader.metrics(step) == {"loss": 1.0 / (step + 1)}
        assert trainer.wait(60) == 0, trainer.stderr.read()
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        if reader is not None:
            reader.close()
    assert seen == list(range(n))
    # Each step was released before the trainer's save after next, whose retention deleted
    # it; step n-2 may still be leased at the last save (it goes at the next run's first save).
    left = sorted(p for p in os.listdir(root) if p.startswith("step_"))
    assert left in ([f"step_{n - 1}"], [f"step_{n - 2}", f"step_{n - 1}"])
    assert os.listdir(root / ".ckptcore-readers") == []


def test_wait_for_new_checkpoint_times_out_and_finds_the_next_step(tmp_path):
    assert ckptcore.wait_for_new_checkpoint(tmp_path / "missing", None, timeout=0.2, seconds_to_sleep=0.05) is None
    with CheckpointManager(tmp_path, CheckpointManagerOptions(enable_async_checkpointing=False)) as mgr:
        for s in (3, 5, 9):
            mgr.save(s, {"s": s})
    assert ckptcore.wait_for_new_checkpoint(tmp_path, None, timeout=1) == 3
    assert ckptcore.wait_for_new_checkpoint(tmp_path, 3, timeout=1) == 5
    assert ckptcore.wait_for_new_checkpoint(tmp_path, 9, timeout=0.2, seconds_to_sleep=0.05) is None
    # Uncommitted leftovers are never reported.
    (tmp_path / "12.ckptcore-tmp-host-1-abcd").mkdir()
    assert ckptcore.wait_for_new_checkpoint(tmp_path, 9, timeout=0.2, seconds_to_sleep=0.05) is None


def test_iterator_timeout_fn_and_start_after(tmp_path):
    with CheckpointManager(tmp_path, CheckpointManagerOptions(enable_async_checkpointing=False)) as mgr:
        for s in range(4):
            mgr.save(s, {"s": s})
    calls = []

    def timeout_fn():
        calls.append(1)
        return len(calls) >= 2  # keep waiting once, then stop

    steps = list(ckptcore.checkpoints_iterator(tmp_path, timeout=0.1, timeout_fn=timeout_fn, start_after=1,
                                               seconds_to_sleep=0.02))
    assert steps == [2, 3] and len(calls) == 2
    assert list(ckptcore.checkpoints_iterator(tmp_path, timeout=0.1, seconds_to_sleep=0.02)) == [0, 1, 2, 3]


def test_crashed_evaluator_protects_its_step_only_until_its_lease_expires(tmp_path):
    o = CheckpointManagerOptions(enable_async_checkpointing=False, max_to_keep=1)
    with CheckpointManager(tmp_path, o) as mgr:
        mgr.save(0, {"s": 0})
    code = """
    import sys, ckptcore
    for step in ckptcore.checkpoints_iterator(sys.argv[1], timeout=5, lease_ttl_secs=60):
        print("reading", step, flush=True)
        sys.stdin.readline()
    """
    evaluator = subprocess.Popen([PY, "-c", textwrap.dedent(code), str(tmp_path)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert evaluator.stdout.readline().strip() == "reading 0", evaluator.stderr.read()
        evaluator.send_signal(signal.SIGKILL)  # crashes while reading step 0
        evaluator.wait()
    finally:
        if evaluator.poll() is None:
            evaluator.kill()
    leases = os.listdir(tmp_path / ".ckptcore-readers")
    assert len(leases) == 1 and leases[0].startswith("0.")
    with CheckpointManager(tmp_path, o) as mgr:
        mgr.save(1, {"s": 1})
        assert mgr.all_steps() == [0, 1]  # the crashed reader's lease is still live
        # Time passes: the lease is not refreshed by anyone and expires.
        path = tmp_path / ".ckptcore-readers" / leases[0]
        doc = json.loads(path.read_text())
        doc["expires"] = time.time() - 1
        path.write_text(json.dumps(doc))
        mgr.save(2, {"s": 2})
        assert mgr.all_steps() == [2]
    assert os.listdir(tmp_path / ".ckptcore-readers") == []


@pytest.mark.parametrize("step_prefix", [None, "ckpt"])
def test_restore_in_another_process_holds_a_lease(tmp_path, step_prefix):
    # A restore is a reader too: while it runs, the step has a lease file (seen from here).
    with CheckpointManager(tmp_path, CheckpointManagerOptions(enable_async_checkpointing=False,
                                                             step_prefix=step_prefix)) as mgr:
        mgr.save(0, {"w": np.ones(100)})
    code = """
    import sys, ckptcore
    from ckptcore.storage import locks
    real = locks.Lease.release
    def pause_then_release(self):
        print("holding", flush=True)
        sys.stdin.readline()
        real(self)
    locks.Lease.release = pause_then_release
    mgr = ckptcore.CheckpointManager(sys.argv[1], ckptcore.CheckpointManagerOptions(read_only=True))
    mgr.restore(0)
    print("restored", flush=True)
    """
    proc = subprocess.Popen([PY, "-c", textwrap.dedent(code), str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding", proc.stderr.read()
        assert [p.split(".")[0] for p in os.listdir(tmp_path / ".ckptcore-readers")] == ["0"]
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "restored"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert os.listdir(tmp_path / ".ckptcore-readers") == []


def test_readers_without_write_access_still_read(tmp_path, caplog):
    # Leases cannot be written (here: their directory's name is taken by a file, as good as
    # read-only storage): restore and the iterator warn and read without protection.
    with CheckpointManager(tmp_path, CheckpointManagerOptions(enable_async_checkpointing=False)) as mgr:
        mgr.save(1, {"w": np.ones(4)})
    (tmp_path / ".ckptcore-readers").write_text("not a directory")
    with CheckpointManager(tmp_path, CheckpointManagerOptions(read_only=True)) as ro:
        np.testing.assert_array_equal(ro.restore(1)["w"], np.ones(4))
    assert list(ckptcore.checkpoints_iterator(tmp_path, timeout=0.1, seconds_to_sleep=0.02)) == [1]
    assert "could not take a reader lease" in caplog.text
