"""Two jax.distributed processes save with the safetensors format (one file per process) and restore resharded."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_processes_each_write_their_own_file(tmp_path):
    pytest.importorskip("jax")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    path = tmp_path / "ckpt"
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = []
    for i in range(2):
        log = open(tmp_path / f"log{i}.txt", "w")
        procs.append((subprocess.Popen([sys.executable, str(WORKER), str(port), str(i), str(path), str(outs[i])],
                                       env=env, stdout=log, stderr=log), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=120)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    results = []
    for i, out in enumerate(outs):
        assert out.exists(), (tmp_path / f"log{i}.txt").read_text()[-3000:]
        results.append(json.loads(out.read_text()))
    for r in results:
        assert "error" not in r, r["error"]
        assert r["shards_ok"] and r["n_ok"]
    files = results[0]["files"]
    assert any(f.startswith("safetensors/process_0/") for f in files), files
    assert any(f.startswith("safetensors/process_1/") for f in files), files
