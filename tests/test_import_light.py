"""``import ckptcore`` stays light: no JAX, TensorStore or NumPy, no plugin (issue 2, item 9 of the brief)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

import ckptcore

HEAVY = ("jax", "jaxlib", "tensorstore", "numpy", "ml_dtypes", "ckptcore_posix", "ckptcore_zarr3", "fsspec", "rich")

PROBE = """
import json, sys, time
start = time.perf_counter()
import ckptcore
elapsed = time.perf_counter() - start
names = dir(ckptcore)
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[1])))
print(json.dumps({"seconds": elapsed, "heavy": heavy, "public": names}))
"""


def _probe() -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(HEAVY)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_import_ckptcore_imports_nothing_heavy():
    result = _probe()
    print(f"\nimport ckptcore took {result['seconds'] * 1000:.1f} ms")  # reported, never asserted
    assert result["heavy"] == []
    assert "save" in result["public"] and "restore" in result["public"]


def test_metadata_needs_neither_tensorstore_nor_jax(tmp_path):
    ckptcore.save(tmp_path / "ck", {"w": np.ones((64, 64), np.float32), "step": 3})
    code = ("import sys, ckptcore; m = ckptcore.metadata(sys.argv[1]); i = ckptcore.info(sys.argv[1]); "
            "assert m['w'].shape == (64, 64) and m['step'] == 3; "
            "print(sorted({'tensorstore', 'jax'} & {n.split('.')[0] for n in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ck")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_numpy_only_save_and_restore_never_imports_jax(tmp_path):
    code = ("import sys, numpy as np, ckptcore; ckptcore.save(sys.argv[1], {'a': np.arange(5)}); "
            "assert ckptcore.restore(sys.argv[1])['a'].sum() == 10; print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ck")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_public_api_is_listed_and_resolvable():
    for name in ckptcore.__all__:
        assert getattr(ckptcore, name) is not None, name
    assert set(ckptcore.__all__) <= set(dir(ckptcore))
