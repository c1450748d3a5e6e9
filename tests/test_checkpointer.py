"""Checkpointer (synchronous) and AsyncCheckpointer with jax.Array leaves (issue 5)."""

from __future__ import annotations

import numpy as np
import pytest

import ckptcore
from ckptcore.errors import AlreadyExistsError, CheckpointerClosedError, CheckpointNotFoundError, StorageError


def test_sync_checkpointer_raises_failures_at_once(tmp_path):
    (tmp_path / "file").write_text("x")
    ck = ckptcore.Checkpointer()
    with pytest.raises(StorageError, match="ckpt"):
        ck.save(tmp_path / "file" / "ckpt", {"a": np.ones(3)})
    ck.save(tmp_path / "ok", {"a": np.ones(3)})
    assert not ck.is_saving_in_progress()
    with pytest.raises(AlreadyExistsError):
        ck.save(tmp_path / "ok", {"a": np.zeros(3)})
    ck.save(tmp_path / "ok", {"a": np.zeros(3)}, force=True, donate=True)
    np.testing.assert_array_equal(ck.restore(tmp_path / "ok")["a"], np.zeros(3))
    with pytest.raises(CheckpointNotFoundError):
        ck.restore(tmp_path / "missing")
    ck.close()
    with pytest.raises(CheckpointerClosedError, match="closed"):
        ck.restore(tmp_path / "ok")


def test_async_save_of_sharded_jax_arrays_survives_deleting_them(tmp_path):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((4, 2), ("data", "model"), devices=jax.devices()[:8])
    sharding = NamedSharding(mesh, PartitionSpec("data", "model"))
    host = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    x = jax.device_put(host, sharding)
    y = jnp.arange(10, dtype=jnp.int32)
    state = {"x": x, "y": y, "n": np.full(7, 3.0)}
    with ckptcore.AsyncCheckpointer() as ck:
        ck.save(tmp_path / "j", state)
        x.delete()  # the caller drops its device buffers while the write runs
        y.delete()
        state["n"][:] = 0
        ck.wait_until_finished()
        target = {"x": jax.ShapeDtypeStruct(host.shape, host.dtype, sharding=sharding), "y": None, "n": None}
        restored = ck.restore(tmp_path / "j", target, partial=True)
    assert restored["x"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(restored["x"]), host)
    whole = ckptcore.restore(tmp_path / "j")
    np.testing.assert_array_equal(np.asarray(whole["y"]), np.arange(10))
    np.testing.assert_array_equal(whole["n"], np.full(7, 3.0))


def test_a_save_in_flight_at_interpreter_exit_is_finished_not_lost(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, ckptcore\n"
        "ck = ckptcore.AsyncCheckpointer()\n"
        "ck.save(sys.argv[1], {'w': np.arange(1 << 20, dtype=np.float32)})\n"
        "del ck\n"  # neither waited for nor closed: the exit hook must finish the write
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a")], check=True, timeout=120)
    np.testing.assert_array_equal(ckptcore.restore(tmp_path / "a")["w"], np.arange(1 << 20, dtype=np.float32))
