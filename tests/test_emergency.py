"""ckptcore.emergency: 4 jax.distributed processes on 127.0.0.1, each with its own local tier (issue 16).

Every job runs under a timeout; processes are killed with SIGKILL as a host loss would.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptcore
from ckptcore.emergency import CheckpointManager, EmergencyRestoreError, Options

WORKER = Path(__file__).with_name("emergency_worker.py")
JOB_TIMEOUT_S = 150
N = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_job(tmp: Path, scenario: str, persistent: str, env: dict[str, str] | None = None, **config: Any) -> Any:
    port = free_port()
    outs = [tmp / f"result-{scenario}-{port}-{i}.json" for i in range(N)]
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **(env or {})}
    procs = []
    for i, out in enumerate(outs):
        cfg = {"port": port, "processes": N, "process_id": i, "devices": 2, "scenario": scenario,
               "local": str(tmp / f"local{i}"), "persistent": persistent, "out": str(out),
               "outs": [str(o) for o in outs], **config}
        with open(tmp / f"log-{scenario}-{port}-{i}.txt", "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(cfg)], env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
    return procs, outs


def wait_files(paths: list[Path], timeout: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.1)


def kill_all(procs: list[Any]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    for proc in procs:
        proc.wait(timeout=30)


def run_job(tmp: Path, scenario: str, persistent: str, env: dict[str, str] | None = None,
            **config: Any) -> list[dict[str, Any]]:
    procs, outs = start_job(tmp, scenario, persistent, env, **config)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        kill_all(procs)
    results = [json.loads(o.read_text()) if o.exists() else {"error": "no result"} for o in outs]
    for r, proc in zip(results, procs, strict=True):
        assert "error" not in r, f"process {r.get('process')}: {r.get('traceback') or r}"
        assert proc.returncode == 0
    return results


def train_then_kill(tmp: Path, persistent: str, env: dict[str, str] | None = None, **config: Any) -> list[Any]:
    """Train 6 steps (local 2, 4, 6; persistent 4), then SIGKILL every process (a lost job)."""
    procs, outs = start_job(tmp, "train", persistent, env, steps=6, wait_killed=True, **config)
    try:
        wait_files(outs)
    finally:
        kill_all(procs)
    results = [json.loads(o.read_text()) for o in outs]
    for r in results:
        assert "error" not in r, r.get("traceback")
        assert r["latest"] == 6 and r["persistent_steps"] == [4]
    return results


@pytest.mark.parametrize("where", ["file", "s3"])
def test_lose_one_host_resume_from_newest_local_step(tmp_path: Path, where: str, request: Any) -> None:
    env = None
    if where == "s3":
        from ckptcore_testing import servers

        server = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        env = servers.s3_env(server.endpoint)
        persistent = f"s3://{bucket}/run"
    else:
        persistent = str(tmp_path / "persistent")
    train_then_kill(tmp_path, persistent, env)
    shutil.rmtree(tmp_path / "local1")  # the replaced host comes back with an empty local disk
    results = run_job(tmp_path, "resume", persistent, env, continue_to=8)
    for r in results:
        assert r["latest"] == 6  # the newest local step, not the persistent step 4
        assert r["info"]["tier"] == "local" and r["identical"], r
        assert r["info"]["sources"] == {"0": "local", "1": "replica on process 2", "2": "local", "3": "local"}
        assert r["local_steps"][-1] == 8
    assert results[1]["local_steps_before"] == []
    assert sorted(os.listdir(tmp_path / "local1")) == ["6", "8", "ckptcore_manager.json"]  # refilled


def test_lose_two_peers_holding_the_same_shards_resume_from_persistent(tmp_path: Path) -> None:
    persistent = str(tmp_path / "persistent")
    train_then_kill(tmp_path, persistent)
    shutil.rmtree(tmp_path / "local1")
    shutil.rmtree(tmp_path / "local2")  # process 2 held process 1's replica
    results = run_job(tmp_path, "resume", persistent, clock_skew={"3": -7200, "0": 3600})  # clocks disagree
    for r in results:
        assert r["latest"] == 4 and r["identical"]
        assert r["info"]["tier"] == "persistent"
        assert "process(es) [1]" in r["info"]["reason"], r["info"]


def test_killed_during_a_local_save_resume_from_previous_local_step(tmp_path: Path) -> None:
    persistent = str(tmp_path / "persistent")
    procs, outs = start_job(tmp_path, "hang_in_local_save", persistent, steps=8, hang_step=8, persistent_every=100)
    try:
        wait_files([Path(f"{o}.saving") for o in outs])  # every process is inside the write of step 8
    finally:
        kill_all(procs)
    leftovers = [n for n in os.listdir(tmp_path / "local0") if n not in ("2", "4", "6", "ckptcore_manager.json")]
    assert leftovers, "the interrupted save left its staging directory"
    results = run_job(tmp_path, "resume", persistent, persistent_every=100)
    for r in results:
        assert r["latest"] == 6 and r["info"]["tier"] == "local" and r["identical"]
    assert sorted(os.listdir(tmp_path / "local0")) == ["4", "6", "ckptcore_manager.json"]  # leftover cleaned


# -- one process: bad input ------------------------------------------------------------------


def _state(step: int) -> dict[str, Any]:
    return {"w": np.arange(12, dtype=np.float32) * step, "step": step}


TARGET = {"w": np.zeros(12, np.float32), "step": 0}


def test_one_process_tiers_retention_and_report(tmp_path: Path) -> None:
    opts = Options(local_every=2, persistent_every=5, local_max_to_keep=2)
    with CheckpointManager(tmp_path / "local", tmp_path / "persistent", opts) as mgr:
        for step in range(1, 12):
            mgr.save(step, _state(step))
        mgr.wait_until_finished()
        assert mgr.persistent_steps() == [5, 10] and mgr.local_steps() in ([8, 10], [10])  # 8: if 10 was not yet
        mgr.save(12, _state(12))  # its retention sees the persistent step 10: local 8 goes first
        mgr.wait_until_finished()
        assert mgr.local_steps() == [10, 12]
        assert mgr.latest_step() == 12
        restored = mgr.restore(None, TARGET)
        assert mgr.last_restore_info.tier == "local" and np.array_equal(restored["w"], _state(12)["w"])
        assert mgr.restore(5, TARGET)["step"] == 5 and mgr.last_restore_info.tier == "persistent"
    # the local tier is an ordinary step directory
    reader = ckptcore.CheckpointManager(tmp_path / "local", ckptcore.CheckpointManagerOptions(read_only=True))
    assert reader.all_steps() == [10, 12]


def test_local_directory_of_another_run_is_skipped(tmp_path: Path, caplog: Any) -> None:
    with CheckpointManager(tmp_path / "local", tmp_path / "p1", Options(local_every=1, persistent_every=100)) as mgr:
        mgr.save(3, _state(3))
    with caplog.at_level(logging.WARNING, logger="ckptcore.emergency"):
        with CheckpointManager(tmp_path / "local", tmp_path / "p2", Options(local_every=1, persistent_every=100)) as mgr:
            assert mgr.latest_step() is None
            with pytest.raises(ckptcore.errors.CheckpointNotFoundError):
                mgr.restore(None, TARGET)
    assert "belongs to another run" in caplog.text


def test_corrupt_local_step_is_reported_and_dropped(tmp_path: Path) -> None:
    opts = Options(local_every=1, persistent_every=2)
    with CheckpointManager(tmp_path / "local", tmp_path / "persistent", opts) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": np.random.default_rng(step).random(1 << 16, np.float32)})
        mgr.wait_until_finished()
    for path in (tmp_path / "local" / "3").rglob("*"):
        if path.is_file() and path.stat().st_size > 1 << 15:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
    with CheckpointManager(tmp_path / "local", tmp_path / "persistent", opts) as mgr:
        assert mgr.latest_step() == 3
        with pytest.raises(EmergencyRestoreError, match="process 0, step 3"):
            mgr.restore(3, {"w": np.zeros(1 << 16, np.float32)})
        assert mgr.latest_step() == 2  # step 3 is never reported again
        restored = mgr.restore(None, {"w": np.zeros(1 << 16, np.float32)})["w"]
        assert np.array_equal(restored, np.random.default_rng(2).random(1 << 16, np.float32))


def test_unreachable_persistent_tier_at_restore(tmp_path: Path) -> None:
    opts = Options(local_every=1, persistent_every=2, run_id="r1", local_max_to_keep=1)  # step 2 only in the persistent tier
    with CheckpointManager(tmp_path / "local", tmp_path / "bucket" / "run", opts) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(step))
    shutil.rmtree(tmp_path / "bucket")
    (tmp_path / "bucket").write_text("")  # the persistent tier cannot be reached any more
    with CheckpointManager(tmp_path / "local", tmp_path / "bucket" / "run", opts) as mgr:
        assert mgr.latest_step() == 3 and mgr.restore(None, TARGET)["step"] == 3  # the local tier still works
        with pytest.raises(EmergencyRestoreError, match=r"step 2 .*unreachable"):
            mgr.restore(2, TARGET)
