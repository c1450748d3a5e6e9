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
from pathlib import Path
from typing import Any

import pytest

WORKER = Path(__file__).with_name("multihost_worker.py")
JOB_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_job(tmp_path: Path, scenario: str, processes: int, devices: int, **config: Any) -> list[dict[str, Any]]:
    """Run one job; return each process's result (``{"exit": code, ...}``)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs, outs = [], []
    for i in range(processes):
        out = tmp_path / f"result-{scenario}-{port}-{i}.json"
        cfg = {
            "port": port, "processes": processes, "process_id": i, "devices": devices,
            "scenario": scenario, "dir": str(tmp_path), "out": str(out), **config,
        }
        log = open(tmp_path / f"log-{scenario}-{port}-{i}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(cfg)], env=env, stdout=log, stderr=log))
        outs.append(out)
    results = []
    try:
        for i, (proc, out) in enumerate(zip(procs, outs, strict=True)):
            code = proc.wait(timeout=JOB_TIMEOUT_S)
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
