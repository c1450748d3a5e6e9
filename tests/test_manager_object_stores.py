"""The same manager code on object stores (moto_server for s3://, fake-gcs-server for gs://).

Commit there is a marker written last (no rename): the manager must only ever see
committed steps, and its leases and root file work through fsspec alone.
"""

from __future__ import annotations

import numpy as np
import pytest

import ckptcore
from ckptcore import CheckpointManager, CheckpointManagerOptions, Composite, Json
from ckptcore.errors import ConcurrentWriterError, StepAlreadyExistsError
from ckptcore.storage import locks as lease_files


def state(i: int) -> dict:
    return {"w": np.full((32, 8), float(i), np.float32), "i": i}


def test_manager_round_trip_and_retention(cloud):
    url = cloud.url("run")
    o = CheckpointManagerOptions(max_to_keep=2, step_prefix="step", enable_async_checkpointing=True)
    with CheckpointManager(url, o, metadata={"where": cloud.scheme}) as mgr:
        for i in range(4):
            mgr.save(i, Composite(state=state(i), cfg=Json({"i": i})), metrics={"loss": 1.0 / (i + 1)})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2, 3]
        with pytest.raises(StepAlreadyExistsError):
            mgr.save(3, state(3))
    with CheckpointManager(url, CheckpointManagerOptions(read_only=True)) as ro:
        assert ro.all_steps() == [2, 3] and ro.metadata() == {"where": cloud.scheme}
        out = ro.restore()
        np.testing.assert_array_equal(out.state["w"], state(3)["w"])
        assert out.cfg == {"i": 3} and ro.metrics(2) == {"loss": 1.0 / 3}
    fs = ckptcore.storage.resolve(url).fs
    fs.invalidate_cache()
    names = sorted(p.rstrip("/").rpartition("/")[2] for p in fs.ls(f"{cloud.bucket}/run", detail=False))
    assert [n for n in names if n.startswith("step_")] == ["step_2", "step_3"]


def test_uncommitted_step_is_never_reported_and_is_cleaned(cloud):
    url = cloud.url("partial")
    o = CheckpointManagerOptions(enable_async_checkpointing=False)
    with CheckpointManager(url, o) as mgr:
        mgr.save(1, state(1))
        # A save that died before its commit marker: data and pending marker, no commit.
        loc = mgr._root.child("2")
        staging = mgr._strategy.begin(loc)
        staging.fs.pipe_file(f"{staging.path}/default/ckptcore_index.json", b"{}")
    with CheckpointManager(url, o) as mgr:
        assert mgr.all_steps() == [1]
        assert ckptcore.wait_for_new_checkpoint(url, 1, timeout=0.3, seconds_to_sleep=0.1) is None
    with CheckpointManager(url, CheckpointManagerOptions(cleanup_tmp_directories=True, enable_async_checkpointing=False)) as mgr:
        assert mgr.all_steps() == [1]
        assert not mgr._strategy.is_staging(mgr._root.child("2"))
        mgr.save(2, state(2))
        assert mgr.all_steps() == [1, 2]
        np.testing.assert_array_equal(mgr.restore(2)["w"], state(2)["w"])


def test_writer_lock_and_reader_lease_on_object_store(cloud):
    url = cloud.url("locks")
    o = CheckpointManagerOptions(enable_async_checkpointing=False, max_to_keep=1)
    with CheckpointManager(url, o) as mgr:
        with pytest.raises(ConcurrentWriterError, match="another CheckpointManager"):
            # Same process, other manager: the lease holder's process is alive.
            CheckpointManager(url, o)
        mgr.save(1, state(1))
        lease = lease_files.acquire_reader_lease(mgr._root, 1, ttl=30)
        try:
            mgr.save(2, state(2))
            assert mgr.all_steps() == [1, 2]
        finally:
            lease.release()
        mgr.save(3, state(3))
        assert mgr.all_steps() == [3]
    with CheckpointManager(url, o) as mgr:  # the lock was released at close
        assert mgr.all_steps() == [3]
    assert list(ckptcore.checkpoints_iterator(url, timeout=0.2, seconds_to_sleep=0.05)) == [3]
