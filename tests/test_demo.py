"""``ckptcore demo``: a real training run interrupted, resumed and verified bit-identical."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from ckptcore import CheckpointManager, CheckpointManagerOptions
from ckptcore.cli.demo import _pack_rng, _unpack_rng, run_demo


def test_demo_resumes_bit_identical_and_keeps_three_steps(tmp_path, capsys):
    assert run_demo(str(tmp_path), size_mb=1, bulk_mb=8) == 0
    out = capsys.readouterr().out
    assert "bit-identical to it" in out and ": YES" in out
    assert "5. bulk state of 8 MiB" in out and "identical: YES" in out
    assert "steps on disk [100, 125, 150]" in out
    with CheckpointManager(tmp_path / "run", CheckpointManagerOptions(read_only=True)) as mgr:
        assert mgr.all_steps() == [250, 275, 300]
        restored = mgr.restore()
        assert int(restored.state["step"]) == 300
        assert restored.config["hidden"] > 0
        assert isinstance(mgr.metrics(300)["loss"], float)
        assert mgr.metadata() == {"demo": "mlp-regression"}
    # Run again into the same directory: refused, nothing touched.
    assert run_demo(str(tmp_path), size_mb=1, bulk_mb=8) == 2
    assert "give an empty --directory" in capsys.readouterr().out
    with CheckpointManager(tmp_path / "run", CheckpointManagerOptions(read_only=True)) as mgr:
        assert mgr.all_steps() == [250, 275, 300]


def test_demo_command_runs_without_jax(tmp_path):
    # JAX stays optional: the demo runs with jax made unimportable.
    blocker = tmp_path / "nojax"
    blocker.mkdir()
    (blocker / "jax.py").write_text("raise ImportError('jax is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "ckptcore", "demo", "--directory", str(tmp_path / "d"), "--bulk-mb", "4"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "YES" in proc.stdout


def test_rng_state_round_trips_exactly():
    rng = np.random.default_rng(123)
    rng.standard_normal(7)
    rng.integers(0, 10, 3, dtype=np.uint32)  # leaves a buffered half-word behind
    clone = _unpack_rng(_pack_rng(rng))
    np.testing.assert_array_equal(rng.standard_normal(5), clone.standard_normal(5))
    assert rng.integers(0, 2**32, 4, dtype=np.uint32).tolist() == clone.integers(0, 2**32, 4, dtype=np.uint32).tolist()

