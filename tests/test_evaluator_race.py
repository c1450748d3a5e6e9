"""Evaluators vs retention (issue 15, item 7): a step handed to a reader is never deleted under it.

Real processes on this machine: one writer saving with ``max_to_keep=1`` as fast as it can,
several readers following it with ``checkpoints_iterator`` and restoring each step they
are handed. Retention marks a step before it lists the reader leases, and a reader leases
a step before it looks for the mark (ckptcore.storage.locks): no reader may ever fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("evaluator_race_worker.py")
WRITE_SECONDS = 20
READERS = 3


def test_readers_never_fail_on_a_step_they_were_handed(tmp_path: Path) -> None:
    root = tmp_path / "run"
    done = tmp_path / "done"
    outs = [tmp_path / f"reader-{i}.json" for i in range(READERS)]
    readers = [
        subprocess.Popen([sys.executable, str(WORKER), "reader", str(root), str(done), str(out)])
        for out in outs
    ]
    writer = subprocess.Popen([sys.executable, str(WORKER), "writer", str(root), str(WRITE_SECONDS), str(tmp_path / "w.json")])
    try:
        assert writer.wait(timeout=WRITE_SECONDS + 60) == 0
        for proc in readers:
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in (writer, *readers):
            if proc.poll() is None:
                proc.kill()
    saved = json.loads((tmp_path / "w.json").read_text())["saved"]
    results = [json.loads(out.read_text()) for out in outs]
    assert saved > 20, saved
    for r in results:
        assert r["failures"] == [], r["failures"][0]
        assert r["handed"] == sorted(set(r["handed"])), "steps are handed once, ascending"
    assert all(r["handed"] for r in results), [len(r["handed"]) for r in results]
    # Retention kept up: the newest step remains, and the steps readers held at the last save.
    steps = [p.name for p in root.iterdir() if not p.name.startswith(".") and p.name != "ckptcore_manager.json"]
    assert 1 <= len(steps) <= 1 + READERS, steps
