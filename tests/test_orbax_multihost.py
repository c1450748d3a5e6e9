"""A sharded state saved by orbax-checkpoint from two ``jax.distributed`` processes, restored by ckptcore (issue 13).

The job (tests/orbax_multihost_worker.py, 2 processes x 4 CPU devices, coordinator on
127.0.0.1) saves with orbax's StandardCheckpointer (OCDBT: one ``ocdbt.process_<i>/`` per
process, merged into ``manifest.ocdbt``) and PyTreeCheckpointer without OCDBT, then restores
with ckptcore in the same job onto a (2, 4) mesh; here one process with 8 devices restores
the same checkpoints onto a third mesh.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ckptcore

jax = pytest.importorskip("jax")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("ckptcore_orbax")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

WORKER = Path(__file__).with_name("orbax_multihost_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_process_orbax_save_restored_by_ckptcore(tmp_path):
    port = free_port()
    outs = [tmp_path / f"result-{i}.json" for i in range(2)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = []
    for i in range(2):
        cfg = {"port": port, "process_id": i, "dir": str(tmp_path), "out": str(outs[i]), "other_out": str(outs[1 - i])}
        log = open(tmp_path / f"log-{i}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(cfg)], env=env, stdout=log, stderr=log))
    try:
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, code in enumerate(codes):
        result = json.loads(outs[i].read_text()) if outs[i].exists() else {}
        assert code == 0 and "error" not in result, result.get("traceback") or (tmp_path / f"log-{i}.txt").read_text()[-3000:]
        assert result["checked"] == 2 * (4 + 4)  # per checkpoint: 4 local shards of each of the 2 arrays
    assert sorted(n for n in os.listdir(tmp_path / "ocdbt") if n.startswith("ocdbt.process_")) == [
        "ocdbt.process_0", "ocdbt.process_1"]

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("z",))
    expected = np.arange(128, dtype=np.float32).reshape(16, 8)
    for name in ("ocdbt", "plain"):
        target = {"w": jax.ShapeDtypeStruct((16, 8), np.float32, sharding=NamedSharding(mesh, P(None, "z")))}
        back = ckptcore.restore(tmp_path / name, target, partial=True)
        assert back["w"].sharding == target["w"].sharding
        np.testing.assert_array_equal(np.asarray(back["w"]), expected)
        whole = ckptcore.restore(tmp_path / name)
        np.testing.assert_array_equal(np.asarray(whole["b"]), np.arange(16, dtype=np.float32))
        assert whole["step"] == 3
