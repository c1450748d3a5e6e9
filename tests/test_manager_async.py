"""Background saves and deletes, retention protections, todelete_subdir."""

from __future__ import annotations

import datetime
import os
import threading

import numpy as np
import pytest

from ckptcore import CheckpointManager, CheckpointManagerOptions
from ckptcore.errors import BackgroundWriteError, StepInUseError
from ckptcore.storage import locks as lease_files


def state(i: int, n: int = 1000) -> dict:
    return {"w": np.full(n, float(i), np.float32), "step": i}


def visible(path) -> list[str]:
    return sorted(p for p in os.listdir(path) if not p.startswith(".") and p != "ckptcore_manager.json")


def test_async_save_snapshots_and_never_reports_uncommitted(tmp_path):
    gate = threading.Event()
    entered = threading.Event()
    o = CheckpointManagerOptions(enable_async_checkpointing=True, max_to_keep=2)
    with CheckpointManager(tmp_path, o) as mgr:
        mgr.save(0, state(0))
        mgr.wait_until_finished()
        # Hold the next background write at its first step so we can look while it is in flight.
        original = mgr._write_step

        def slow_write(*args, **kwargs):
            entered.set()
            gate.wait(30)
            return original(*args, **kwargs)

        mgr._write_step = slow_write
        arr = np.full(1000, 1.0, np.float32)
        assert mgr.save(1, {"w": arr, "step": 1})
        arr[:] = -5.0  # the caller changes its array right away: the snapshot is unaffected
        assert entered.wait(30)
        assert mgr.is_saving_in_progress()
        assert mgr.all_steps() == [0] and mgr.latest_step() == 0  # step 1 is not committed yet
        assert not mgr.should_save(1)  # but it is not due again either
        gate.set()
        mgr.wait_until_finished()
        assert not mgr.is_saving_in_progress()
        assert mgr.all_steps() == [0, 1]
        np.testing.assert_array_equal(mgr.restore(1)["w"], 1.0)
        mgr._write_step = original
        mgr.save(2, state(2))
        mgr.save(3, state(3))  # waits for step 2 first
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2, 3]
    assert visible(tmp_path) == ["2", "3"]


def test_background_error_surfaces_at_next_call_and_close(tmp_path):
    o = CheckpointManagerOptions(enable_async_checkpointing=True, array_format="no-such-format")
    mgr = CheckpointManager(tmp_path, o)
    assert mgr.save(1, state(1))  # the format is looked up in the background
    with pytest.raises(BackgroundWriteError, match="save step 1"):
        mgr.wait_until_finished()
    assert mgr.all_steps() == []
    mgr.save(2, state(2))
    with pytest.raises(BackgroundWriteError):
        mgr.save(3, state(3))  # the error of step 2 surfaces here
    mgr.save(4, state(4))
    with pytest.raises(BackgroundWriteError):
        mgr.close()
    assert visible(tmp_path) == []
    assert not (tmp_path / ".ckptcore-writer.json").exists()  # the lock is released even so


def test_background_delete(tmp_path):
    o = CheckpointManagerOptions(enable_async_checkpointing=False, enable_background_delete=True, max_to_keep=1)
    with CheckpointManager(tmp_path, o) as mgr:
        for i in range(4):
            mgr.save(i, state(i))
            assert mgr.all_steps() == [i]
        mgr.wait_until_finished()
        assert visible(tmp_path) == ["3"]
    o = CheckpointManagerOptions(enable_async_checkpointing=True, enable_background_delete=True, max_to_keep=2)
    with CheckpointManager(tmp_path, o) as mgr:
        for i in range(4, 8):
            mgr.save(i, state(i))
    assert visible(tmp_path) == ["6", "7"]


def test_todelete_subdir_moves_steps(tmp_path):
    o = CheckpointManagerOptions(enable_async_checkpointing=False, max_to_keep=1, todelete_subdir="trash")
    with CheckpointManager(tmp_path, o) as mgr:
        for i in range(3):
            mgr.save(i, state(i))
        assert mgr.all_steps() == [2]
    assert visible(tmp_path) == ["2", "trash"]
    assert sorted(os.listdir(tmp_path / "trash")) == ["0", "1"]
    with CheckpointManager(tmp_path, o) as mgr:
        assert mgr.all_steps() == [2]  # the trash is not a step


def test_restored_step_survives_until_a_newer_step_is_committed(tmp_path):
    plain = CheckpointManagerOptions(enable_async_checkpointing=False)
    with CheckpointManager(tmp_path, plain) as mgr:
        mgr.save(50, state(50), metrics={"loss": 5.0})
        mgr.save(60, state(60), metrics={"loss": 1.0})
    # Best-1 by loss: the run restores step 50 and saves an older, better step 40 (e.g. a
    # re-evaluation). Without the protection, 50 and 60 would both be deleted.
    o = CheckpointManagerOptions(
        enable_async_checkpointing=False, max_to_keep=1, best_fn=lambda m: m["loss"], best_mode="min"
    )
    with CheckpointManager(tmp_path, o) as mgr:
        np.testing.assert_array_equal(mgr.restore(50)["w"], 50.0)
        mgr.save(40, state(40), metrics={"loss": 0.5}, force=True)
        assert mgr.all_steps() == [40, 50]  # 60 deleted, the restored 50 kept
        mgr.save(70, state(70), metrics={"loss": 3.0})  # newer than 50: protection ends
        assert mgr.all_steps() == [40]


def test_reader_lease_defers_retention_and_blocks_delete(tmp_path):
    o = CheckpointManagerOptions(enable_async_checkpointing=False, max_to_keep=1, lease_ttl_secs=30)
    with CheckpointManager(tmp_path, o) as mgr:
        mgr.save(1, state(1))
        lease = lease_files.acquire_reader_lease(mgr._root, 1, ttl=30)
        try:
            mgr.save(2, state(2))
            assert mgr.all_steps() == [1, 2]  # 1 is being read: kept for now
            assert visible(tmp_path) == ["1", "2"]
            with pytest.raises(StepInUseError, match=r"step 1 .*being read"):
                mgr.delete(1)
        finally:
            lease.release()
        mgr.save(3, state(3))  # the next retention pass deletes it
        assert mgr.all_steps() == [3]
    assert visible(tmp_path) == ["3"]
    assert os.listdir(tmp_path / ".ckptcore-readers") == []


def test_expired_reader_lease_is_ignored_and_cleaned(tmp_path):
    o = CheckpointManagerOptions(enable_async_checkpointing=False, max_to_keep=1)
    with CheckpointManager(tmp_path, o) as mgr:
        mgr.save(1, state(1))
        # A reader that crashed: its lease stopped being refreshed and expired.
        lease = lease_files.Lease(
            mgr._root, f"{lease_files.readers_dir(mgr._root)}/1.deadbeef.json", ttl=-1, kind="reader", step=1
        )
        mgr._root.fs.makedirs(lease_files.readers_dir(mgr._root), exist_ok=True)
        lease.write()
        mgr.save(2, state(2))
        assert mgr.all_steps() == [2]
    assert os.listdir(tmp_path / ".ckptcore-readers") == []


def test_keep_time_interval_keeps_spaced_steps(tmp_path):
    o = CheckpointManagerOptions(
        enable_async_checkpointing=False, max_to_keep=1, keep_time_interval=datetime.timedelta(hours=1)
    )
    with CheckpointManager(tmp_path, o) as mgr:
        for i in range(4):
            mgr.save(i, state(i))
        # Saved within a second of each other: only the first is an interval anchor.
        assert mgr.all_steps() == [0, 3]


def test_explicit_delete_and_reload(tmp_path):
    o = CheckpointManagerOptions(enable_async_checkpointing=False, writer_lock=False)
    with CheckpointManager(tmp_path, o) as a, CheckpointManager(tmp_path, o) as b:
        a.save(1, state(1))
        a.save(2, state(2))
        assert b.all_steps() == []
        b.reload()
        assert b.all_steps() == [1, 2]
        a.delete(1)
        assert a.all_steps() == [2]
        b.reload()
        assert b.all_steps() == [2]
    assert visible(tmp_path) == ["2"]
