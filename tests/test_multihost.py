"""Multi-process save and restore (issue 7): real ``jax.distributed`` jobs of 2 and 4 CPU processes.

Each test starts the processes of one job (tests/multihost_worker.py) with a coordinator on
127.0.0.1 and a few forced host devices per process, on local disk, and checks what every
process reports and what is on disk. Every job runs under a timeout: a hang fails the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

WORKER = Path(__file__).with_name("multihost_worker.py")
JOB_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_job(
    tmp_path: Path, scenario: str, processes: int, devices: int, env: dict[str, str] | None = None, **config: Any
) -> list[dict[str, Any]]:
    """Run one job; return each process's result (``{"exit": code, ...}``)."""
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **(env or {})}
    procs = []
    outs = [tmp_path / f"result-{scenario}-{port}-{i}.json" for i in range(processes)]
    victim = config.get("victim")
    for i, out in enumerate(outs):
        cfg = {
            "port": port, "processes": processes, "process_id": i, "devices": devices,
            "scenario": scenario, "dir": str(tmp_path), "out": str(out),
            "outs": [str(o) for j, o in enumerate(outs) if j != victim], **config,
        }
        with open(tmp_path / f"log-{scenario}-{port}-{i}.txt", "w") as log:
            procs.append(
                subprocess.Popen([sys.executable, str(WORKER), json.dumps(cfg)], env=env, stdout=log, stderr=log)
            )
    results = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        for i, (proc, out) in enumerate(zip(procs, outs, strict=True)):
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))  # a hang fails the test
            result = json.loads(out.read_text()) if out.exists() else {}
            result["exit"] = code
            result["log"] = (tmp_path / f"log-{scenario}-{port}-{i}.txt").read_text()[-3000:]
            results.append(result)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


def ok(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in results:
        assert r["exit"] == 0 and "error" not in r, f"process {r.get('process')} failed: {r.get('traceback') or r['log']}"
    return results


def index_doc(path: Path) -> dict[str, Any]:
    return json.loads((path / "ckptcore_index.json").read_text())


def leaves(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> record of the (flat dict) state's array leaves."""
    return {
        item["key"]: item["value"]
        for item in doc["tree"]["items"]
        if item["value"].get("kind") in ("jax_array", "ndarray")
    }


def assert_each_element_written_once(doc: dict[str, Any]) -> dict[str, list[int]]:
    """Every array's writers' shards tile it exactly (no gap, no duplicate); return name -> writers."""
    import numpy as np

    writers = {}
    for name, record in leaves(doc).items():
        shape = tuple(record["shape"])
        count = np.zeros(shape, dtype=np.int32)
        for writer in record["format_info"]["writers"]:
            for index in writer["shards"]:
                count[tuple(slice(a, b) for a, b in index)] += 1
        assert (count == 1).all(), f"{name}: elements written {sorted(set(count.reshape(-1).tolist()))} times"
        writers[name] = sorted(w["process"] for w in record["format_info"]["writers"])
    return writers


def test_two_processes_save_restore_and_errors(tmp_path: Path) -> None:
    results = ok(run_job(tmp_path, "save_restore", 2, 4, mesh=[2, 4], formats=["ocdbt", "zarr3"]))
    for r in results:
        # Each process checked its addressable shards after restoring on the saved and on a transposed mesh.
        assert r["checked_ocdbt"] == r["checked_other_ocdbt"] == r["checked_zarr3"] == 16
        assert "AlreadyExistsError" in r["exists_error"]
        assert "process 1 passed a state whose structure" in r["mismatch_error"]
        assert "disk full on process 1" in r["failure_error"]
    for fmt in ("ocdbt", "zarr3"):
        writers = assert_each_element_written_once(index_doc(tmp_path / fmt))
        # w is split between the processes; replicated arrays and NumPy leaves are written once, by the primary.
        assert writers == {"w": [0, 1], "b": [0], "r": [0], "i": [0], "local": [0], "host": [0]}
        assert sorted(os.listdir(tmp_path / fmt / fmt)) == ["process_0", "process_1"]
    # Failed saves left nothing behind, and the existing checkpoint is intact (restored after the refusal).
    names = os.listdir(tmp_path)
    assert not [n for n in names if n.startswith(("mismatch", "failed"))], names


def test_four_processes_and_other_process_counts(tmp_path: Path) -> None:
    """Save with 1, 2 and 4 processes; restore each with a different count and mesh."""
    import jax
    import numpy as np

    import ckptcore

    sys.path.insert(0, str(WORKER.parent))
    p1, p2, p4 = (str(tmp_path / f"p{n}") for n in (1, 2, 4))
    # One process (this one, 8 devices): save.
    mesh8 = jax.make_mesh((4, 2), ("data", "model"))
    base = {  # as in multihost_worker.GLOBAL; step n stores base + n
        "w": np.arange(32 * 16, dtype=np.float32).reshape(32, 16) / 7,
        "b": np.arange(16, dtype=np.float32) - 3,
        "r": np.full((4, 4), 2.5, dtype=np.float32),
        "i": np.arange(8 * 12, dtype=np.int32).reshape(8, 12),
    }
    state = {k: v + 1 for k, v in base.items()}
    specs = {"w": ("data", "model"), "b": ("model",), "r": (), "i": (None, "model")}
    sharded = {
        k: jax.device_put(v, jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec(*specs[k])))
        for k, v in state.items()
    }
    sharded.update(local=jax.numpy.arange(5, dtype=jax.numpy.int32) + 1, host=np.arange(10) + 1, step=1, name="run-1")
    ckptcore.save(p1, sharded)
    ok(run_job(tmp_path, "actions", 2, 4, mesh=[2, 4], actions=[["restore", p1, 1], ["save", p2, 2, "zarr3"]]))
    four = ok(run_job(
        tmp_path, "actions", 4, 2, mesh=[4, 2], subset=[2, 3],
        actions=[["restore", p1, 1], ["restore", p2, 2], ["save", p4, 4, "ocdbt"]],
    ))
    assert [r["checked"] for r in four] == [[8, 8]] * 4  # shards checked per process (2 devices x 4 arrays)
    assert [r.get("subset_checked") for r in four][2:] == [8, 8] and "subset_checked" not in four[0]
    writers = assert_each_element_written_once(index_doc(tmp_path / "p4"))
    assert writers["w"] == [0, 1, 2, 3]
    assert assert_each_element_written_once(index_doc(tmp_path / "subset"))["w"] == [2, 3]
    ok(run_job(tmp_path, "actions", 2, 4, mesh=[2, 4], actions=[["restore", p4, 4]]))
    # And with one process: every leaf read back whole.
    restored = ckptcore.restore(p4)
    for name in base:
        np.testing.assert_array_equal(np.asarray(restored[name]), base[name] + 4)
    assert restored["step"] == 4 and list(restored["host"]) == list(range(4, 14))


def test_single_replica_restore_reads_less(tmp_path: Path) -> None:
    plain_total = single_total = gspmd_plain = gspmd_single = 0
    for r in ok(run_job(tmp_path, "single_replica", 2, 4, mesh=[2, 4])):
        assert r["checked_single"] == r["checked_gspmd_False"] == r["checked_gspmd_True"] == 16
        plain_total += r["bytes_read_plain"]
        single_total += r["bytes_read_single"]
        gspmd_plain += r["bytes_read_gspmd_False"]
        gspmd_single += r["bytes_read_gspmd_True"]
    # b, r and i are replicated along "data": read once instead of once per process.
    replicated = (16 + 16 + 8 * 12) * 4
    assert plain_total - single_total == replicated
    # The same arrays under GSPMDSharding targets (no mesh axis names): also read once.
    assert gspmd_plain == plain_total and gspmd_single == single_total


def test_replica_parallel_save_spreads_replicated_bytes(tmp_path: Path) -> None:
    """Replicated arrays and NumPy leaves are written once, in row blocks spread over their holders."""
    import numpy as np

    import ckptcore

    results = ok(run_job(tmp_path, "replica_parallel", 4, 2, mesh=[4, 2], formats=["ocdbt", "zarr3"]))
    for fmt in ("ocdbt", "zarr3"):
        doc = index_doc(tmp_path / fmt)
        writers = assert_each_element_written_once(doc)
        assert writers["rep"] == writers["host"] == writers["odd"] == [0, 1, 2, 3]
        assert writers["half"] == [0, 1, 2, 3]  # each "model" half: 2 blocks of 1 MiB, by 2 of its 4 holders
        assert writers["small"] == [0]  # too small to split: one writer, as before
        rep = leaves(doc)["rep"]
        assert sorted(w["shards"] for w in rep["format_info"]["writers"]) == [
            [[[k * 256, (k + 1) * 256], [0, 1024]]] for k in range(4)
        ]
        assert len(rep["shard_checksums"]) == 4
        per_process = [r["bytes"][fmt] for r in results]
        assert max(per_process) <= 1.1 * min(per_process), per_process
    # One process reads the blocks back from every writer's directory.
    restored = ckptcore.restore(tmp_path / "ocdbt")
    np.testing.assert_array_equal(np.asarray(restored["rep"]), np.arange(1024 * 1024, dtype=np.float32).reshape(1024, 1024) / 3)
    np.testing.assert_array_equal(np.asarray(restored["odd"]), np.arange(1001 * 1100, dtype=np.float32).reshape(1001, 1100))
    np.testing.assert_array_equal(restored["host"], np.arange(1024 * 1024, dtype=np.int32).reshape(1024, 1024))


def test_manager_on_two_processes(tmp_path: Path) -> None:
    results = ok(run_job(tmp_path, "manager", 2, 4, mesh=[2, 4], **{"async": True}))
    for r in results:
        assert r["saved"] == [0, 2, 4, 6] and r["all_steps"] == [4, 6] and r["latest"] == 6 and r["checked"] == 16
        assert "UnsupportedLeafError" in r["bad_error"]  # raised on process 1, surfaced on process 0 too
        assert r["steps_after_bad"] == [4, 6] and r["steps_after_delete"] == [6]
        assert r["on_disk"] == ["6", "ckptcore_manager.json"]
    assert "process 1 failed" in results[0]["bad_error"]


def test_manager_lists_on_the_primary_alone(tmp_path: Path) -> None:
    """Steps, metrics and the root file are listed by the primary and broadcast (issue 15, item 4)."""
    results = ok(run_job(tmp_path, "manager_listing", 4, 2, mesh=[4, 2]))
    for r in results:
        assert r["steps"] == r["steps_after_reload"] == [2, 3] and r["best"] == 3, r
        assert r["metrics"] == [{"loss": 8.0}, {"loss": 7.0}] and r["root_metadata"] == {"run": 1}
        assert r["checked"] == 8
    assert results[0]["ls"] > 0
    for r in results[1:]:
        assert r["ls"] == 0, f"process {r['process']} listed the manager's directory {r['ls']} times"
        # Stats: none while opening, listing or saving (reading a step's files is not listing).
        assert r["info_first"] == 0, r["info_first"]


def test_killed_process_fails_every_other_process_and_commits_nothing(tmp_path: Path) -> None:
    path = tmp_path / "killed"
    results = run_job(tmp_path, "kill", 4, 2, mesh=[4, 2], victim=1, timeout_s=5, path=str(path))
    assert results[1]["exit"] == -9
    for r in results[:1] + results[2:]:
        assert r["exit"] == 1 and r["is_checkpoint_error"], r
        assert "process 1" in r["error"], r["error"]
    assert not path.exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith("killed")] == []  # the primary removed the staging data


def test_preemption_every_process_saves_the_same_step(tmp_path: Path) -> None:
    for extra in ({}, {"no_preemption_service": True}):  # JAX's sync manager, then the SIGTERM + KV fallback
        (tmp_path / str(len(extra))).mkdir()
        results = ok(run_job(tmp_path / str(len(extra)), "preemption", 2, 1, **extra))
        assert [r["sync_manager"] for r in results] == [not extra] * 2
        stops = {r["stopped_at"] for r in results}
        assert len(stops) == 1 and stops.pop() >= 3
        assert results[0]["steps"] == [results[0]["stopped_at"]]


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_two_processes_on_object_store_emulator(tmp_path: Path, scheme: str) -> None:
    from ckptcore_testing import servers

    start, env, create = (
        (servers.start_fake_gcs, servers.gcs_env, servers.create_gcs_bucket) if scheme == "gs"
        else (servers.start_moto, servers.s3_env, servers.create_s3_bucket)
    )
    with start() as server:
        create(server.endpoint, "multihost")
        url = f"{scheme}://multihost/ckpt"
        results = ok(run_job(
            tmp_path, "actions", 2, 4, mesh=[2, 4], env=env(server.endpoint),
            actions=[["save", url, 3, "ocdbt"], ["restore", url, 3]],
        ))
        assert [r["checked"] for r in results] == [[16], [16]]
