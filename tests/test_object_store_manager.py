"""CheckpointManager, the evaluator iterator and AsyncCheckpointer on gs:// and s3:// emulators."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import ckptcore
from ckptcore import storage
from ckptcore.storage.object_store import COMMIT_MARKER


def _state(step: int) -> dict:
    return {"w": np.full((64, 64), step, np.float32), "b": np.arange(100) * step, "step": step}


def _names(url: str) -> set[str]:
    loc = storage.resolve(url)
    return {str(p).rstrip("/").rpartition("/")[2] for p in loc.fs.ls(loc.path, detail=False)}


def test_manager_retention_and_async_save(cloud):
    root = cloud.url("run")
    options = ckptcore.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True, step_prefix="step")
    with ckptcore.CheckpointManager(root, options) as mgr:
        for step in range(5):
            mgr.save(step, _state(step), metrics={"loss": 1.0 / (step + 1)})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [3, 4]
        assert mgr.latest_step() == 4
        restored = mgr.restore(4)
        np.testing.assert_array_equal(restored["w"], _state(4)["w"])
    # Retention really removed the old steps from the bucket (marker first, then data).
    names = _names(root)
    assert {"step_3", "step_4"} <= names and not {"step_0", "step_1", "step_2"} & names
    step_dir = storage.resolve(f"{root}/step_4")
    assert step_dir.fs.exists(f"{step_dir.path}/{COMMIT_MARKER}")
    # A reopened manager (read-only) sees the same committed steps.
    reader = ckptcore.CheckpointManager(root, ckptcore.CheckpointManagerOptions(read_only=True, step_prefix="step"))
    assert reader.all_steps() == [3, 4]
    np.testing.assert_array_equal(reader.restore(3)["b"], _state(3)["b"])
    reader.close()


def test_uncommitted_step_is_not_listed_and_is_cleaned(cloud):
    root = cloud.url("run2")
    with ckptcore.CheckpointManager(root, ckptcore.CheckpointManagerOptions(enable_async_checkpointing=False)) as mgr:
        mgr.save(1, _state(1))
    # A step whose save died before its commit marker.
    final = storage.resolve(f"{root}/2")
    strategy = storage.atomicity(final)
    staging = strategy.begin(final)
    staging.fs.pipe_file(f"{staging.path}/partial.bin", b"x" * 100)
    opts = ckptcore.CheckpointManagerOptions(cleanup_tmp_directories=True, enable_async_checkpointing=False)
    with ckptcore.CheckpointManager(root, opts) as mgr:
        assert mgr.all_steps() == [1]
    assert "2" not in _names(root)


def test_evaluator_iterator_follows_training(cloud):
    root = cloud.url("run3")
    seen: list[int] = []
    values: list[float] = []
    options = ckptcore.CheckpointManagerOptions(max_to_keep=3, enable_async_checkpointing=True)
    mgr = ckptcore.CheckpointManager(root, options)
    mgr.save(0, _state(0))
    mgr.wait_until_finished()

    def evaluate() -> None:
        for step in ckptcore.checkpoints_iterator(root, timeout=10, seconds_to_sleep=0.1):
            seen.append(step)
            values.append(_restore_step(root, step))
            if step == 3:
                return

    reader = threading.Thread(target=evaluate)
    reader.start()
    for step in range(1, 4):
        mgr.save(step, _state(step))
        mgr.wait_until_finished()
    reader.join(60)
    mgr.close()
    assert not reader.is_alive()
    assert seen == sorted(seen) and seen[-1] == 3 and len(set(seen)) == len(seen)
    assert values == [float(s) for s in seen]


def _restore_step(root: str, step: int) -> float:
    with ckptcore.CheckpointManager(root, ckptcore.CheckpointManagerOptions(read_only=True)) as reader:
        return float(reader.restore(step)["w"][0, 0])


def test_async_checkpointer(cloud):
    url = cloud.url("async")
    state = _state(9)
    with ckptcore.AsyncCheckpointer() as ckpt:
        ckpt.save(url, state)
        state["w"][:] = -1  # the snapshot was taken: mutating now must not change what is saved
        ckpt.wait_until_finished()
    out = ckptcore.restore(url)
    np.testing.assert_array_equal(out["w"], _state(9)["w"])


def test_async_save_failure_surfaces_and_commits_nothing(cloud):
    proxy = cloud.proxy()
    # Reads answer (save's synchronous checks pass); every upload fails, in the background.
    proxy.configure(fail_rate=1.0, match=lambda method, path: method in ("PUT", "POST"))
    url = cloud.url("async-fail")
    options = {"endpoint": proxy.endpoint, "retries": 1, "retry_delay": 0.01, "retry_max_delay": 0.05}
    ckpt = ckptcore.AsyncCheckpointer()
    ckpt.save(url, _state(1), storage_options=options)
    with pytest.raises(ckptcore.errors.CheckpointError, match="async-fail"):
        ckpt.wait_until_finished()
    assert proxy.stats().failed > 0
    ckpt.close()
    proxy.heal()
    loc = storage.resolve(url)
    assert not storage.atomicity(loc).is_committed(loc)
