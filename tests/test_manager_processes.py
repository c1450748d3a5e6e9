"""Several processes on one checkpoint directory: the writer lock, crashed writers and savers."""

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

from ckptcore import CheckpointManager, CheckpointManagerOptions
from ckptcore.errors import ConcurrentWriterError

PY = sys.executable


def spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_line(proc: subprocess.Popen, expected: str) -> None:
    line = proc.stdout.readline().strip()
    if line != expected:
        proc.kill()
        raise AssertionError(f"child said {line!r}, expected {expected!r}; stderr: {proc.stderr.read()}")


HOLDER = """
import sys, numpy as np
from ckptcore import CheckpointManager, CheckpointManagerOptions
mgr = CheckpointManager(sys.argv[1], CheckpointManagerOptions(enable_async_checkpointing=False, lease_ttl_secs=30))
mgr.save(1, {"w": np.ones(10)})
print("ready", flush=True)
sys.stdin.readline()
mgr.close()
print("closed", flush=True)
"""


def opts(**kw) -> CheckpointManagerOptions:
    kw.setdefault("enable_async_checkpointing", False)
    return CheckpointManagerOptions(**kw)


def test_second_writer_gets_clear_error_until_first_closes(tmp_path):
    proc = spawn(HOLDER, str(tmp_path))
    try:
        wait_line(proc, "ready")
        with pytest.raises(ConcurrentWriterError, match=rf"pid {proc.pid}.*read_only=True"):
            CheckpointManager(tmp_path, opts())
        # Readers are welcome while the writer runs.
        with CheckpointManager(tmp_path, opts(read_only=True)) as ro:
            assert ro.all_steps() == [1]
            np.testing.assert_array_equal(ro.restore()["w"], np.ones(10))
        proc.stdin.write("\n")
        proc.stdin.flush()
        wait_line(proc, "closed")
    finally:
        proc.kill()
        proc.wait()
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(2, {"w": np.zeros(10)})
        assert mgr.all_steps() == [1, 2]


def test_killed_writer_on_this_host_is_replaced_at_once(tmp_path):
    proc = spawn(HOLDER, str(tmp_path))
    wait_line(proc, "ready")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lock = json.loads((tmp_path / ".ckptcore-writer.json").read_text())
    assert lock["pid"] == proc.pid and lock["expires"] > time.time()  # still "live", but its process is gone
    with CheckpointManager(tmp_path, opts()) as mgr:
        assert mgr.all_steps() == [1]
        mgr.save(2, {"w": np.zeros(10)})


def test_lock_of_another_host_blocks_until_it_expires(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"w": np.ones(3)})
    lock = tmp_path / ".ckptcore-writer.json"
    lock.write_text(json.dumps({"owner": "x", "host": "other-host", "pid": 1, "expires": time.time() + 3600}))
    with pytest.raises(ConcurrentWriterError, match="host other-host"):
        CheckpointManager(tmp_path, opts())
    # The other host crashed: its lease is no longer refreshed and expires.
    lock.write_text(json.dumps({"owner": "x", "host": "other-host", "pid": 1, "expires": time.time() - 1}))
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(2, {"w": np.ones(3)})
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid()
    assert not lock.exists()


def test_lock_is_refreshed_while_held(tmp_path):
    with CheckpointManager(tmp_path, opts(lease_ttl_secs=0.6)) as mgr:
        first = json.loads((tmp_path / ".ckptcore-writer.json").read_text())["expires"]
        deadline = time.time() + 20
        while json.loads((tmp_path / ".ckptcore-writer.json").read_text())["expires"] == first:
            assert time.time() < deadline, "the writer lease was never refreshed"
            time.sleep(0.05)
        mgr.save(1, {"w": np.ones(3)})


def test_two_processes_racing_for_the_lock_one_wins(tmp_path):
    code = """
    import sys, time
    from ckptcore import CheckpointManager, CheckpointManagerOptions
    from ckptcore.errors import ConcurrentWriterError
    start = float(sys.argv[2])
    while time.time() < start:
        time.sleep(0.001)
    try:
        mgr = CheckpointManager(sys.argv[1], CheckpointManagerOptions(enable_async_checkpointing=False))
    except ConcurrentWriterError:
        print("refused", flush=True)
    else:
        print("writer", flush=True)
        sys.stdin.readline()
        mgr.close()
    """
    (tmp_path / "run").mkdir()
    start = str(time.time() + 3)
    procs = [spawn(code, str(tmp_path / "run"), start) for _ in range(3)]
    try:
        said = sorted(p.stdout.readline().strip() for p in procs)
        assert said == ["refused", "refused", "writer"], [p.stderr.read() for p in procs if p.poll() is not None]
    finally:
        for p in procs:
            if p.poll() is None:
                p.stdin.write("\n")
                p.stdin.flush()
        for p in procs:
            p.wait(30)


def test_writer_killed_before_commit_loses_no_committed_step(tmp_path):
    code = """
    import os, sys, numpy as np
    from ckptcore import CheckpointManager, CheckpointManagerOptions
    mgr = CheckpointManager(sys.argv[1], CheckpointManagerOptions(enable_async_checkpointing=False, max_to_keep=1))
    mgr.save(1, {"w": np.ones(1000)})
    def crash(*args, **kwargs):
        os._exit(17)  # the machine dies after writing step 2's data, before its commit
    mgr._strategy.commit = crash
    mgr.save(2, {"w": np.zeros(1000)})
    """
    proc = spawn(code, str(tmp_path))
    assert proc.wait(60) == 17, proc.stderr.read()
    leftovers = [p for p in os.listdir(tmp_path) if ".ckptcore-tmp-" in p]
    assert leftovers, "the crash should have left step 2's staging directory behind"
    with CheckpointManager(tmp_path, opts(cleanup_tmp_directories=True, max_to_keep=1)) as mgr:
        assert mgr.all_steps() == [1]
        np.testing.assert_array_equal(mgr.restore()["w"], np.ones(1000))
        mgr.save(2, {"w": np.full(1000, 2.0)})
        assert mgr.all_steps() == [2]
    assert not [p for p in os.listdir(tmp_path) if ".ckptcore-tmp-" in p]


def test_writer_that_lost_its_lock_stops_saving(tmp_path):
    mgr = CheckpointManager(tmp_path, opts(lease_ttl_secs=0.6))
    try:
        mgr.save(1, {"w": np.ones(3)})
        # Its lease expired (say the storage stalled) and another host took the directory over.
        lock = tmp_path / ".ckptcore-writer.json"
        lock.write_text(json.dumps({"owner": "other", "host": "other-host", "pid": 1, "expires": time.time() + 3600}))
        deadline = time.time() + 20
        while mgr._writer_lease.lost is None:  # noticed at its next refresh
            assert time.time() < deadline, "the lost lock was never noticed"
            time.sleep(0.05)
        with pytest.raises(ConcurrentWriterError, match="lost the writer lock"):
            mgr.save(2, {"w": np.ones(3)})
        assert mgr.all_steps() == [1]
    finally:
        mgr.close()
    assert json.loads(lock.read_text())["owner"] == "other"  # the new holder's lock is left alone


def test_manager_dropped_without_close_releases_its_lock(tmp_path):
    import gc

    mgr = CheckpointManager(tmp_path, opts())
    mgr.save(1, {"w": np.ones(3)})
    del mgr
    gc.collect()
    with CheckpointManager(tmp_path, opts()) as again:
        assert again.all_steps() == [1]
