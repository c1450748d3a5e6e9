"""ckptcore.abstract: a restore target built from the live state, without copying its data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckptcore


def test_abstract_of_a_train_state_restores_the_same_classes_and_shardings(tmp_path):
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    sharding = NamedSharding(mesh, P("data", "model"))
    params = {"w": jax.device_put(jnp.arange(64.0).reshape(8, 8), sharding), "b": jnp.ones(8)}
    state = train_state.TrainState.create(apply_fn=lambda *a: None, params=params, tx=optax.adam(1e-3))
    ckptcore.save(tmp_path / "ck", state)
    target = jax.tree.map(ckptcore.abstract, state)
    assert isinstance(target.params["w"], jax.ShapeDtypeStruct) and target.params["w"].sharding == sharding
    back = ckptcore.restore(tmp_path / "ck", target=target)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    assert back.params["w"].sharding == sharding
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_abstract_of_numpy_leaves_restores_numpy_arrays(tmp_path):
    state = {"w": np.arange(6, dtype=np.float16).reshape(2, 3), "step": 3, "name": "run"}
    ckptcore.save(tmp_path / "ck", state)
    target = {k: ckptcore.abstract(v) for k, v in state.items()}
    assert target["w"].shape == (2, 3) and target["step"] == 3
    back = ckptcore.restore(tmp_path / "ck", target=target)
    assert isinstance(back["w"], np.ndarray) and back["w"].dtype == np.float16
    np.testing.assert_array_equal(back["w"], state["w"])
    assert back["step"] == 3 and back["name"] == "run"
