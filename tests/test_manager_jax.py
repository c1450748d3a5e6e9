"""The manager with sharded JAX arrays: async snapshot, restore onto a target sharding."""

from __future__ import annotations

import numpy as np


def test_async_save_of_sharded_state_and_restore_onto_other_sharding(tmp_path):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from ckptcore import CheckpointManager, CheckpointManagerOptions, Composite, Json

    mesh = jax.make_mesh((4, 2), ("data", "model"))
    sharding = NamedSharding(mesh, PartitionSpec("data", "model"))
    w = jax.device_put(jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16), sharding)
    opts = CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
    with CheckpointManager(tmp_path, opts) as mgr:
        for step in range(3):
            mgr.save(step, Composite(params={"w": w + step, "b": jnp.ones(8)}, meta=Json({"step": step})),
                     metrics={"loss": jnp.float32(1.0 / (step + 1))})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1, 2]
        assert mgr.metrics(2) == {"loss": np.float32(1 / 3).item()}
        other = NamedSharding(mesh, PartitionSpec("model", None))
        target = Composite(params={
            "w": jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=other),
            "b": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec())),
        })
        out = mgr.restore(2, target)
        assert set(out) == {"params"}
        assert isinstance(out.params["w"], jax.Array) and out.params["w"].sharding == other
        np.testing.assert_array_equal(np.asarray(out.params["w"]), np.asarray(w) + 2)
        meta = mgr.item_metadata(2)
        assert meta.params["w"].shape == (64, 16) and meta.meta == {"step": 2}
