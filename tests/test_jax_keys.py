"""Random state: typed and legacy JAX PRNG keys, NumPy Generators (issue 3, item 5)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import ckptcore
from ckptcore.errors import CorruptCheckpointError, TargetMismatchError, UnsupportedLeafError
from ckptcore.io.index import INDEX_FILE


def _mesh():
    return jax.make_mesh((4, 2), ("data", "model"))


def _same_keys(a, b) -> None:
    assert jnp.issubdtype(a.dtype, jax.dtypes.prng_key) and a.dtype == b.dtype and a.shape == b.shape
    assert str(jax.random.key_impl(a)) == str(jax.random.key_impl(b))
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(a)), np.asarray(jax.random.key_data(b)))
    if a.ndim == 0:  # the restored key draws the same numbers
        np.testing.assert_array_equal(np.asarray(jax.random.uniform(a, (5,))), np.asarray(jax.random.uniform(b, (5,))))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_typed_keys_round_trip_as_keys(tmp_path, impl):
    key = jax.random.key(7, impl=impl)
    many = jax.device_put(jax.random.split(key, 8), NamedSharding(_mesh(), P("data")))
    ckptcore.save(tmp_path / "ck", {"key": key, "many": many})
    meta = ckptcore.metadata(tmp_path / "ck")
    assert meta["many"].kind == "jax_prng_key" and meta["many"].dtype == np.uint32
    assert meta["many"].sharding["spec"] == ["data", None]  # the key data: one more, unsharded dim
    back = ckptcore.restore(tmp_path / "ck")
    _same_keys(back["key"], key)
    _same_keys(back["many"], many)
    assert back["many"].sharding.spec == P("data")
    assert str(jax.random.key_impl(back["many"])) == impl


def test_typed_keys_onto_a_target_sharding(tmp_path):
    many = jax.random.split(jax.random.key(3), 8)
    ckptcore.save(tmp_path / "ck", {"many": many, "one": jax.random.key(1)})
    sharding = NamedSharding(jax.make_mesh((2, 4), ("a", "b")), P("b"))
    target = {
        "many": jax.ShapeDtypeStruct((8,), many.dtype, sharding=sharding),
        "one": jax.ShapeDtypeStruct((), many.dtype, sharding=SingleDeviceSharding(jax.devices()[5])),
    }
    back = ckptcore.restore(tmp_path / "ck", target)
    assert back["many"].sharding == sharding
    _same_keys(back["many"], many)
    assert back["one"].sharding == SingleDeviceSharding(jax.devices()[5])
    _same_keys(back["one"], jax.random.key(1))
    # The key data may be asked for as plain uint32 (e.g. by code that only knows legacy keys).
    data = ckptcore.restore(tmp_path / "ck", {"many": jax.ShapeDtypeStruct((8, 2), jnp.uint32)}, partial=True)
    np.testing.assert_array_equal(np.asarray(data["many"]), np.asarray(jax.random.key_data(many)))


def test_key_target_mismatches_are_clear(tmp_path):
    ckptcore.save(tmp_path / "ck", {"k": jax.random.split(jax.random.key(0), 4)})
    rbg = jax.random.key(0, impl="rbg")
    with pytest.raises(TargetMismatchError, match="PRNG key"):
        ckptcore.restore(tmp_path / "ck", {"k": jax.ShapeDtypeStruct((4,), rbg.dtype)})
    with pytest.raises(TargetMismatchError, match=r"PRNG keys of shape \(4,\)"):
        ckptcore.restore(tmp_path / "ck", {"k": jax.ShapeDtypeStruct((5,), jax.random.key(0).dtype)})


def test_legacy_uint32_keys_round_trip(tmp_path):
    key = jax.random.PRNGKey(42)
    ckptcore.save(tmp_path / "ck", {"key": key})
    back = ckptcore.restore(tmp_path / "ck")["key"]
    assert back.dtype == jnp.uint32 and back.shape == (2,)
    np.testing.assert_array_equal(np.asarray(jax.random.normal(back, (4,))), np.asarray(jax.random.normal(key, (4,))))


def test_abstract_or_deleted_leaves_are_refused(tmp_path):
    with pytest.raises(UnsupportedLeafError, match="abstract"):
        ckptcore.save(tmp_path / "a", {"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
    gone = jnp.ones(3)
    gone.delete()
    with pytest.raises(UnsupportedLeafError, match="deleted"):
        ckptcore.save(tmp_path / "b", {"x": gone})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("bit_generator", ["PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"])
def test_numpy_generators_continue_where_they_stopped(tmp_path, bit_generator):
    rng = np.random.Generator(getattr(np.random, bit_generator)(1234))
    rng.random(17)
    rng.integers(0, 10, size=3)  # leaves a buffered half-word in some bit generators
    ckptcore.save(tmp_path / "ck", {"rng": rng, "nested": [rng]})
    back = ckptcore.restore(tmp_path / "ck")
    assert type(back["rng"].bit_generator).__name__ == bit_generator
    np.testing.assert_array_equal(back["rng"].random(50), rng.random(50))
    assert back["nested"][0] is not back["rng"]
    doc = json.loads((tmp_path / "ck" / INDEX_FILE).read_text())  # plain JSON, big ints included
    assert doc["tree"]["items"][0]["value"]["bit_generator"] == bit_generator


def test_unknown_bit_generator_names_are_never_imported(tmp_path):
    ckptcore.save(tmp_path / "ck", {"rng": np.random.default_rng(0)})
    index_file = tmp_path / "ck" / INDEX_FILE
    doc = json.loads(index_file.read_text())
    doc["tree"]["items"][0]["value"]["bit_generator"] = "os.system"
    index_file.write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match=r"os\.system"):
        ckptcore.restore(tmp_path / "ck")
    doc["tree"]["items"][0]["value"].update(bit_generator="PCG64", state={"state": "nonsense"})
    index_file.write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match="malformed"):
        ckptcore.restore(tmp_path / "ck")


def test_generator_subclass_bit_generators_are_refused(tmp_path):
    class Custom(np.random.PCG64):
        pass

    with pytest.raises(UnsupportedLeafError, match="Custom"):
        ckptcore.save(tmp_path / "ck", {"rng": np.random.Generator(Custom(0))})
