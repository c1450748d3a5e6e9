"""JAX stays optional: the NumPy path never imports it, and JAX checkpoints restore without it (issue 3)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_numpy_save_restore_never_imports_jax(tmp_path):
    out = _run(
        f"""
        import sys, numpy as np, ckptcore
        state = {{"w": np.ones((64, 64), np.float32), "rng": np.random.default_rng(1), "n": 3}}
        ckptcore.save({str(tmp_path / "ck")!r}, state)
        back = ckptcore.restore({str(tmp_path / "ck")!r})
        ckptcore.metadata({str(tmp_path / "ck")!r})
        assert (back["w"] == 1).all() and back["rng"].random() == np.random.default_rng(1).random()
        print("jax" in sys.modules, "jaxlib" in sys.modules)
        """
    )
    assert out.split() == ["False", "False"]


@pytest.fixture
def jax_checkpoint(tmp_path):
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4, 2), ("data", "model"))
    import numpy as np

    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    state = {"w": jax.device_put(w, NamedSharding(mesh, P("data", "model"))), "key": jax.random.key(5)}
    import ckptcore

    ckptcore.save(tmp_path / "ck", state)
    return tmp_path / "ck", np.asarray(jax.random.key_data(state["key"]))


def test_jax_checkpoint_restores_as_numpy_without_jax(jax_checkpoint):
    path, key_data = jax_checkpoint
    out = _run(
        f"""
        import sys
        sys.modules["jax"] = None  # as if JAX were not installed: importing it raises ImportError
        import numpy as np, ckptcore
        back = ckptcore.restore({str(path)!r})
        assert type(back["w"]) is np.ndarray and back["w"].shape == (64, 64)
        np.testing.assert_array_equal(back["w"], np.arange(64 * 64, dtype=np.float32).reshape(64, 64))
        print(back["key"].dtype, back["key"].tolist())
        """
    )
    assert out.split()[0] == "uint32" and out.split(maxsplit=1)[1].strip() == str(key_data.tolist())
