"""Any JAX pytree (issue 11): Flax TrainState, NNX state, Equinox modules, Optax states, dataclasses, registered nodes.

Saved as ``"node"`` containers keyed by field name, dict key or index; restored onto a
target with the target's own treedef; without a target as plain dicts and lists.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
optax = pytest.importorskip("optax")
eqx = pytest.importorskip("equinox")

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx, struct  # noqa: E402
from flax.training import train_state  # noqa: E402

import ckptcore  # noqa: E402
from ckptcore.errors import CheckpointError, CorruptCheckpointError, TargetMismatchError, UnsupportedLeafError  # noqa: E402
from ckptcore.tree.nodes import validate_tree  # noqa: E402

# -- models ------------------------------------------------------------------------------


class MLP(nn.Module):
    features: int = 4

    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.relu(nn.Dense(self.features)(x)))


MODEL = MLP()
X = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32).reshape(2, 3)


def create_state(rng: Any, tx: Any = None) -> train_state.TrainState:
    params = MODEL.init(rng, X)
    return train_state.TrainState.create(apply_fn=MODEL.apply, params=params, tx=tx or optax.adamw(1e-3))


def advanced(state: train_state.TrainState) -> train_state.TrainState:
    """The state after one (unjitted) update: every optimizer slot holds non-trivial values."""
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), state.params)
    return state.apply_gradients(grads=grads)


def assert_same_values(a: Any, b: Any) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(_data(x), _data(y))


def _data(x: Any) -> np.ndarray:
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def read_index(path: Any) -> dict[str, Any]:
    return json.loads((path / "ckptcore_index.json").read_text())


# -- Flax linen TrainState ---------------------------------------------------------------

TXS = {
    "adamw": lambda: optax.adamw(1e-3),
    "chain_clip_adam": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=1e-4),
    "masked": lambda: optax.masked(optax.adam(1e-3), lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
}


@pytest.mark.parametrize("tx_name", list(TXS))
def test_train_state_restores_onto_eval_shape_with_identical_treedef(tmp_path, tx_name):
    state = advanced(create_state(jax.random.key(0), TXS[tx_name]()))
    ckptcore.save(tmp_path / "ck", state)
    abstract = jax.eval_shape(lambda: create_state(jax.random.key(0), TXS[tx_name]()))
    back = ckptcore.restore(tmp_path / "ck", target=abstract)
    assert type(back) is train_state.TrainState
    assert jax.tree.structure(back) == jax.tree.structure(abstract)
    assert back.tx is abstract.tx and back.apply_fn == MODEL.apply  # static fields come from the target
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(back))
    assert_same_values(back, state)
    # The restored state trains on: the optimizer accepts its own state back.
    again = advanced(back)
    assert_same_values(again.params, advanced(state).params)


def test_train_state_restores_onto_concrete_target_and_static_fields_are_not_saved(tmp_path):
    state = advanced(create_state(jax.random.key(0)))
    ckptcore.save(tmp_path / "ck", state)
    index = read_index(tmp_path / "ck")
    root = index["tree"]
    assert root["type"] == "node" and root["node_type"] == "flax.training.train_state.TrainState"
    assert [(i["key"], i["key_kind"]) for i in root["items"]] == [
        ("step", "attr"), ("params", "attr"), ("opt_state", "attr")
    ]  # apply_fn and tx are static: in the treedef, never in the file
    fresh = create_state(jax.random.key(1))
    back = ckptcore.restore(tmp_path / "ck", target=fresh)
    assert jax.tree.structure(back) == jax.tree.structure(fresh)
    assert_same_values(back, state)


def test_no_target_gives_plain_containers_keyed_by_field_names(tmp_path):
    state = advanced(create_state(jax.random.key(0)))
    ckptcore.save(tmp_path / "ck", state)
    plain = ckptcore.restore(tmp_path / "ck")
    assert type(plain) is dict and list(plain) == ["step", "params", "opt_state"]
    assert int(plain["step"]) == 1
    adam = plain["opt_state"][0]  # optax states are namedtuples: kept as namedtuples
    assert adam._fields == ("count", "mu", "nu")
    np.testing.assert_array_equal(
        np.asarray(plain["params"]["params"]["Dense_0"]["kernel"]), np.asarray(state.params["params"]["Dense_0"]["kernel"])
    )


def test_typed_prng_keys_inside_a_train_state(tmp_path):
    class RngState(train_state.TrainState):
        rng: jax.Array

    def make(seed: int) -> RngState:
        params = MODEL.init(jax.random.key(seed), X)
        return RngState.create(apply_fn=MODEL.apply, params=params, tx=optax.sgd(0.1), rng=jax.random.key(seed + 7))

    state = make(0)
    ckptcore.save(tmp_path / "ck", state)
    back = ckptcore.restore(tmp_path / "ck", target=jax.eval_shape(lambda: make(0)))
    assert type(back) is RngState and jax.dtypes.issubdtype(back.rng.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(back.rng), jax.random.key_data(state.rng))
    assert jax.random.uniform(back.rng) == jax.random.uniform(state.rng)


def test_step_saved_as_python_int_comes_back_as_the_array_the_target_asks_for(tmp_path):
    state = create_state(jax.random.key(0))  # TrainState.create sets step=0, a Python int
    ckptcore.save(tmp_path / "ck", state)
    back = ckptcore.restore(tmp_path / "ck", target=jax.eval_shape(lambda: create_state(jax.random.key(0))))
    assert isinstance(back.step, jax.Array) and back.step.dtype == jnp.int32 and int(back.step) == 0
    ckptcore.save(tmp_path / "n", {"n": 3, "s": "text"})
    key_dtype = jax.random.key(0).dtype
    target = {"n": jax.ShapeDtypeStruct((3,), jnp.int32), "s": jax.ShapeDtypeStruct((), jnp.int32)}
    with pytest.raises(TargetMismatchError, match=r"(?s)\['n'\]: the checkpoint holds a scalar.*\['s'\]: the target has an array"):
        ckptcore.restore(tmp_path / "n", target=target)
    with pytest.raises(TargetMismatchError, match=r"\['n'\]: the saved 3 cannot become key<fry>"):
        ckptcore.restore(tmp_path / "n", target={"n": jax.ShapeDtypeStruct((), key_dtype), "s": None})


def test_sharding_comes_from_the_target(tmp_path):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    state = advanced(create_state(jax.random.key(0)))
    ckptcore.save(tmp_path / "ck", state)
    mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2])

    def shard(x: Any) -> Any:
        spec = P(None, "model") if x.ndim == 2 else P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    abstract = jax.eval_shape(lambda: create_state(jax.random.key(0)))
    target = abstract.replace(params=jax.tree.map(shard, abstract.params))
    back = ckptcore.restore(tmp_path / "ck", target=target)
    kernel = back.params["params"]["Dense_0"]["kernel"]
    assert kernel.sharding == NamedSharding(mesh, P(None, "model"))
    assert_same_values(back, state)


def test_partial_and_none_in_a_train_state_target(tmp_path):
    state = advanced(create_state(jax.random.key(0)))
    ckptcore.save(tmp_path / "ck", state)
    abstract = jax.eval_shape(lambda: create_state(jax.random.key(0)))
    back = ckptcore.restore(tmp_path / "ck", target=abstract.replace(opt_state=None))  # None skips a subtree
    assert back.opt_state is None
    assert_same_values(back.params, state.params)


# -- flax.struct.dataclass, register_dataclass, registered classes -----------------------


@struct.dataclass
class Config:
    weights: Any
    scale: Any
    name: str = struct.field(pytree_node=False, default="run")
    nothing: Any = None


@struct.dataclass
class Empty:
    pass


def test_struct_dataclass_static_field_comes_back_from_the_target(tmp_path):
    value = Config(weights={"w": jnp.arange(4.0)}, scale=np.float32(2.0), name="saved")
    tree = {"cfg": value, "empty": Empty(), "inner": [Empty(), None]}
    ckptcore.save(tmp_path / "ck", tree)
    saved = read_index(tmp_path / "ck")["tree"]["items"][0]["value"]
    assert [i["key"] for i in saved["items"]] == ["weights", "scale", "nothing"]  # name is static
    target = {"cfg": Config(weights={"w": jax.ShapeDtypeStruct((4,), jnp.float32)}, scale=0.0, name="target"),
              "empty": Empty(), "inner": [Empty(), None]}
    back = ckptcore.restore(tmp_path / "ck", target=target)
    assert jax.tree.structure(back) == jax.tree.structure(target)
    assert back["cfg"].name == "target" and back["cfg"].nothing is None and isinstance(back["empty"], Empty)
    np.testing.assert_array_equal(np.asarray(back["cfg"].weights["w"]), np.arange(4.0))
    assert back["cfg"].scale == np.float32(2.0)
    plain = ckptcore.restore(tmp_path / "ck")
    assert plain == {"cfg": {"weights": plain["cfg"]["weights"], "scale": np.float32(2.0), "nothing": None},
                     "empty": {}, "inner": [{}, None]}


@dataclasses.dataclass
class Point:
    x: Any
    y: Any
    label: str = "p"


jax.tree_util.register_dataclass(Point, data_fields=["x", "y"], meta_fields=["label"])


@jax.tree_util.register_pytree_with_keys_class
class Pair:
    """Keys of its own choosing: a DictKey and a GetAttrKey."""

    def __init__(self, left: Any, right: Any) -> None:
        self.left, self.right = left, right

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.DictKey("left"), self.left), (jax.tree_util.GetAttrKey("right"), self.right)), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


class Bag:
    """Registered without keys: children keyed by their flattened index. Its aux data is an array."""

    def __init__(self, items: list[Any], meta: np.ndarray) -> None:
        self.items, self.meta = items, meta


jax.tree_util.register_pytree_node(Bag, lambda b: (tuple(b.items), b.meta), lambda meta, items: Bag(list(items), meta))


def test_registered_dataclass_keyed_classes_and_unkeyed_nodes(tmp_path):
    meta = np.arange(3)  # not hashable by value: compared by identity through the target's treedef
    tree = {"point": Point(jnp.ones(2), np.int8(3), label="a"), "pair": Pair(np.arange(3.0), [1, 2]),
            "bag": Bag([np.zeros(2), "text"], meta)}
    ckptcore.save(tmp_path / "ck", tree)
    stored = {i["key"]: i["value"] for i in read_index(tmp_path / "ck")["tree"]["items"]}
    assert [(i["key"], i["key_kind"]) for i in stored["pair"]["items"]] == [("left", "dict"), ("right", "attr")]
    assert [(i["key"], i["key_kind"]) for i in stored["bag"]["items"]] == [(0, "index"), (1, "index")]
    assert stored["bag"]["node_type"].endswith("test_pytrees.Bag")

    target_meta = np.arange(3)
    target = {"point": Point(jax.ShapeDtypeStruct((2,), jnp.float32), 0, label="b"),
              "pair": Pair(np.zeros(3), [0, 0]), "bag": Bag([np.ones(2), ""], target_meta)}
    back = ckptcore.restore(tmp_path / "ck", target=target)
    assert isinstance(back["point"], Point) and back["point"].label == "b" and back["point"].y == 3
    assert isinstance(back["pair"], Pair) and back["pair"].right == [1, 2]
    assert isinstance(back["bag"], Bag) and back["bag"].meta is target_meta and back["bag"].items[1] == "text"
    np.testing.assert_array_equal(back["bag"].items[0], np.zeros(2))

    plain = ckptcore.restore(tmp_path / "ck")
    assert list(plain["point"]) == ["x", "y"] and list(plain["pair"]) == ["left", "right"]
    assert isinstance(plain["bag"], list) and plain["bag"][1] == "text"  # index-keyed: a list


# -- NNX ---------------------------------------------------------------------------------


class NNXModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        return self.out(self.dropout(nnx.relu(self.bn(self.linear(x)))))


def make_nnx(seed: int = 0) -> NNXModel:
    return NNXModel(nnx.Rngs(seed, dropout=seed + 1))


def test_nnx_state_with_rng_streams_restores_onto_nnx_eval_shape_and_merges(tmp_path):
    model = make_nnx(0)
    model(X)  # advances the dropout stream and the batch statistics
    _, state = nnx.split(model)
    ckptcore.save(tmp_path / "ck", state)

    abstract_model = nnx.eval_shape(lambda: make_nnx(5))
    graphdef2, abstract_state = nnx.split(abstract_model)
    back = ckptcore.restore(tmp_path / "ck", target=abstract_state)
    assert type(back) is type(state)
    assert jax.tree.structure(back) == jax.tree.structure(abstract_state)
    assert_same_values(back, state)
    restored = nnx.merge(graphdef2, back)
    np.testing.assert_array_equal(np.asarray(restored(X)), np.asarray(model(X)))  # same dropout masks too
    restored.eval()
    model.eval()
    np.testing.assert_array_equal(np.asarray(restored(X)), np.asarray(model(X)))


def test_nnx_optimizer_state_and_filtered_states(tmp_path):
    model = make_nnx(0)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    def loss(m: NNXModel) -> Any:
        return jnp.mean(m(X) ** 2)

    optimizer.update(model, nnx.grad(loss)(model))
    params, rest = nnx.state(model, nnx.Param, ...)
    tree = {"params": params, "rest": rest, "opt": nnx.state(optimizer)}
    ckptcore.save(tmp_path / "ck", tree)

    abstract_model = nnx.eval_shape(lambda: make_nnx(3))
    abstract_opt = nnx.eval_shape(lambda: nnx.Optimizer(make_nnx(3), optax.adam(1e-2), wrt=nnx.Param))
    a_params, a_rest = nnx.state(abstract_model, nnx.Param, ...)
    target = {"params": a_params, "rest": a_rest, "opt": nnx.state(abstract_opt)}
    back = ckptcore.restore(tmp_path / "ck", target=target)
    assert jax.tree.structure(back) == jax.tree.structure(target)
    assert_same_values(back, tree)
    # Only the parameters, from the same checkpoint.
    only = ckptcore.restore(tmp_path / "ck", target={"params": a_params}, partial=True)
    assert list(only) == ["params"]
    assert_same_values(only["params"], params)

    plain = ckptcore.restore(tmp_path / "ck")
    np.testing.assert_array_equal(
        np.asarray(plain["params"]["linear"]["kernel"]["value"]), np.asarray(model.linear.kernel[...])
    )


# -- Equinox -----------------------------------------------------------------------------


def make_eqx(seed: int = 0) -> Any:
    return eqx.nn.MLP(3, 2, 8, 2, key=jax.random.key(seed))


def test_equinox_filtered_model_and_partitions(tmp_path):
    model = make_eqx(0)
    params, static = eqx.partition(model, eqx.is_array)
    ckptcore.save(tmp_path / "ck", params)

    abstract = eqx.filter_eval_shape(make_eqx, 1)
    target = eqx.filter(abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    back = ckptcore.restore(tmp_path / "ck", target=target)
    assert jax.tree.structure(back) == jax.tree.structure(target)
    rebuilt = eqx.combine(back, static)
    np.testing.assert_array_equal(np.asarray(jax.vmap(rebuilt)(X)), np.asarray(jax.vmap(model)(X)))

    concrete = ckptcore.restore(tmp_path / "ck", target=eqx.filter(make_eqx(2), eqx.is_array))
    assert_same_values(concrete, params)

    # A partition by eqx.tree_at: only the last layer's weight is trainable.
    def last_weight(m: Any) -> Any:
        return m.layers[-1].weight

    mask = eqx.tree_at(last_weight, jax.tree.map(lambda _: False, model), replace=True)
    trainable, _ = eqx.partition(model, mask)
    ckptcore.save(tmp_path / "part", {"trainable": trainable})
    back = ckptcore.restore(tmp_path / "part", target={"trainable": eqx.partition(make_eqx(4), mask)[0]})
    np.testing.assert_array_equal(np.asarray(back["trainable"].layers[-1].weight), np.asarray(model.layers[-1].weight))
    assert back["trainable"].layers[0].weight is None


def test_unknown_leaf_inside_a_module_names_its_key_path_and_writes_nothing(tmp_path):
    model = make_eqx(0)  # its activation is a function: not an array
    with pytest.raises(UnsupportedLeafError, match=r"\['activation'\]"):
        ckptcore.save(tmp_path / "ck", model)
    assert not (tmp_path / "ck").exists()


# -- bad input ---------------------------------------------------------------------------


class Exploding:
    pass


def _explode(_: Any) -> Any:
    raise RuntimeError("boom")


jax.tree_util.register_pytree_node(Exploding, _explode, lambda aux, children: Exploding())


def test_a_node_whose_flattening_raises_is_named_and_existing_checkpoints_are_untouched(tmp_path):
    ckptcore.save(tmp_path / "ck", {"w": np.ones(3)})
    with pytest.raises(UnsupportedLeafError, match=r"\['bad'\]\[0\].*Exploding.*RuntimeError: boom"):
        ckptcore.save(tmp_path / "ck", {"w": np.zeros(3), "bad": [Exploding()]}, force=True)
    np.testing.assert_array_equal(ckptcore.restore(tmp_path / "ck")["w"], np.ones(3))


def test_target_with_an_extra_or_a_missing_field_fails_before_any_data_is_read(tmp_path):
    @struct.dataclass
    class V1:
        weights: Any
        bias: Any

    @struct.dataclass
    class V2:
        weights: Any
        biases: Any  # renamed
        extra: Any

    ckptcore.save(tmp_path / "ck", {"model": V1(jnp.ones(3), jnp.zeros(2))})
    for data in (tmp_path / "ck").iterdir():  # any read would now fail: mismatches must be found first
        if data.is_dir():
            shutil.rmtree(data)
    spec = jax.ShapeDtypeStruct
    target = {"model": V2(spec((3,), jnp.float32), spec((2,), jnp.float32), spec((1,), jnp.float32))}
    with pytest.raises(TargetMismatchError) as err:
        ckptcore.restore(tmp_path / "ck", target=target)
    message = str(err.value)
    assert "['model']['biases'] (did you mean ['model']['bias']" in message
    assert "['model']['extra']" in message
    assert "not in the target" in message and "['model']['bias']" in message
    with pytest.raises(TargetMismatchError, match=r"\['model'\] is a V1, but the checkpoint holds an array"):
        ckptcore.save(tmp_path / "leaf", {"model": np.ones(3)})
        ckptcore.restore(tmp_path / "leaf", target={"model": V1(spec((3,), jnp.float32), spec((2,), jnp.float32))})


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "node", "items": []},  # no node_type
        {"type": "node", "node_type": "x.Y", "items": [{"key": "a", "key_kind": "weird", "value": {"type": "none"}}]},
        {"type": "node", "node_type": "x.Y", "items": [{"key": 1, "key_kind": "attr", "value": {"type": "none"}}]},
        {"type": "node", "node_type": "x.Y", "items": [{"key": True, "key_kind": "index", "value": {"type": "none"}}]},
        {"type": "node", "node_type": "x.Y", "items": [{"key": "a", "key_kind": "attr"}]},
        {"type": "node", "node_type": "x.Y", "items": [{"key": "a", "key_kind": "attr", "value": {"type": "none"}}] * 2},
        {"type": "node", "node_type": "x.Y", "items": {"a": 1}},
        {"type": "node", "node_type": "x.Y", "items": [{"key": "a", "key_kind": "dict", "value": {"type": "bogus"}}]},
    ],
)
def test_malformed_nodes_in_an_index_are_corrupt_checkpoint_errors(bad):
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint index|the index is corrupt"):
        validate_tree({"type": "dict", "items": [{"key": "k", "key_type": "str", "value": bad}]})


def test_a_tampered_index_is_rejected_on_restore(tmp_path):
    ckptcore.save(tmp_path / "ck", Point(np.ones(2), np.zeros(2)))
    index = read_index(tmp_path / "ck")
    index["tree"]["items"][0]["key_kind"] = "attribute"
    (tmp_path / "ck" / "ckptcore_index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="key_kind 'attribute'"):
        ckptcore.restore(tmp_path / "ck")


def test_the_type_name_in_a_checkpoint_is_never_imported(tmp_path):
    ckptcore.save(tmp_path / "ck", Point(np.ones(2), np.zeros(2)))
    index = read_index(tmp_path / "ck")
    index["tree"]["node_type"] = "ckptcore_never_imported_module.Evil"
    (tmp_path / "ck" / "ckptcore_index.json").write_text(json.dumps(index))
    plain = ckptcore.restore(tmp_path / "ck")
    assert list(plain) == ["x", "y"]
    assert ckptcore.metadata(tmp_path / "ck").node_type == "ckptcore_never_imported_module.Evil"
    back = ckptcore.restore(tmp_path / "ck", target=Point(np.zeros(2), np.ones(2)))
    assert isinstance(back, Point)
    assert "ckptcore_never_imported_module" not in sys.modules


# -- metadata, inspect -------------------------------------------------------------------


def test_metadata_and_inspect_show_field_names_and_the_type_name(tmp_path):
    state = advanced(create_state(jax.random.key(0)))
    ckptcore.save(tmp_path / "ck", state)
    meta = ckptcore.metadata(tmp_path / "ck")
    assert isinstance(meta, dict) and list(meta) == ["step", "params", "opt_state"]
    assert meta.node_type == "flax.training.train_state.TrainState"
    assert meta["params"]["params"]["Dense_1"]["kernel"].shape == (3, 4)
    # The metadata tree is a valid (plain) target.
    plain = ckptcore.restore(tmp_path / "ck", target=meta)
    assert_same_values(plain["params"], state.params)

    out = subprocess.run([sys.executable, "-m", "ckptcore", "inspect", str(tmp_path / "ck")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "flax.training.train_state.TrainState" in out.stdout
    assert "['params']['params']['Dense_0']['kernel']" in out.stdout and "['step']" in out.stdout
    out = subprocess.run([sys.executable, "-m", "ckptcore", "inspect", "--json", str(tmp_path / "ck")],
                         capture_output=True, text=True, timeout=120)
    summary = json.loads(out.stdout)
    assert {"path": "<root>", "node_type": "flax.training.train_state.TrainState"} in summary["nodes"]
    assert summary["tree"]["type"] == "node"


# -- checkpointers, manager, object stores -----------------------------------------------


def test_manager_and_async_checkpointer_accept_train_states(tmp_path):
    state = advanced(create_state(jax.random.key(0)))
    abstract = jax.eval_shape(lambda: create_state(jax.random.key(0)))
    options = ckptcore.CheckpointManagerOptions(max_to_keep=2)
    with ckptcore.CheckpointManager(tmp_path / "run", options) as mgr:
        mgr.save(1, state)
        mgr.save(2, advanced(state))
        mgr.wait_until_finished()
        back = mgr.restore(mgr.latest_step(), target=abstract)
    assert jax.tree.structure(back) == jax.tree.structure(abstract)
    assert_same_values(back, advanced(state))

    ckpt = ckptcore.AsyncCheckpointer()
    try:
        ckpt.save(tmp_path / "async", state)
        ckpt.wait_until_finished()
        back = ckpt.restore(tmp_path / "async", target=abstract)
    finally:
        ckpt.close()
    assert_same_values(back, state)


def test_train_state_on_gcs(gcs_bucket):
    state = advanced(create_state(jax.random.key(0)))
    url = f"gs://{gcs_bucket}/state"
    ckptcore.save(url, state)
    back = ckptcore.restore(url, target=jax.eval_shape(lambda: create_state(jax.random.key(0))))
    assert type(back) is train_state.TrainState
    assert_same_values(back, state)


def test_same_values_as_orbax_standard_checkpointer(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    model = make_nnx(0)
    _, nnx_state = nnx.split(model)
    state = advanced(create_state(jax.random.key(0)))
    tree = {"linen": state, "nnx": nnx_state}
    ckptcore.save(tmp_path / "ours", tree)
    with ocp.StandardCheckpointer() as orbax:
        orbax.save(tmp_path / "orbax", tree)
        orbax.wait_until_finished()
        reference = orbax.restore(tmp_path / "orbax", jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x, tree
    )
    ours = ckptcore.restore(tmp_path / "ours", target=abstract)
    assert jax.tree.structure(ours) == jax.tree.structure(reference) == jax.tree.structure(tree)
    assert_same_values(ours, reference)


def test_errors_are_checkpoint_errors():
    assert issubclass(UnsupportedLeafError, CheckpointError) and issubclass(TargetMismatchError, CheckpointError)
