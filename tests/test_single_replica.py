"""Single-replica restore for every sharding type (issue 15, item 4), in one process with 8 devices.

The multi-process case (bytes read once per job) is in tests/test_multihost.py.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import ckptcore
from ckptcore.parallel import replicas

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")


def gspmd(named: NamedSharding, ndim: int):
    from jax._src.sharding_impls import GSPMDSharding

    return GSPMDSharding(tuple(named.mesh.devices.flat), named._to_xla_hlo_sharding(ndim))


def indices(sharding, shape):
    return {d: tuple(s.indices(n)[:2] for s, n in zip(i, shape, strict=True)) for d, i in sharding.devices_indices_map(shape).items()}


@pytest.mark.parametrize(
    "spec, replicas_per_region",
    [(P(None, "b"), 4), (P(), 8), (P("a"), 2), (P("a", "b"), 1)],
)
def test_gspmd_sharding_becomes_an_equivalent_named_sharding(spec, replicas_per_region):
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    shape = (8, 4)
    sharding = gspmd(NamedSharding(mesh, spec), 2)
    named = replicas._as_named(sharding, shape)
    if replicas_per_region == 1:
        assert named is None  # nothing replicated: restored as usual
        return
    assert named.mesh.shape[replicas.REPLICA_AXIS] == replicas_per_region
    assert indices(named, shape) == indices(sharding, shape)


def test_single_device_sharding_is_left_alone():
    target = {"x": jax.ShapeDtypeStruct((4,), np.float32, sharding=SingleDeviceSharding(jax.devices()[0]))}
    narrowed, _ = replicas.single_replica_targets(target, None)
    assert narrowed["x"] is target["x"]


@pytest.mark.parametrize("kind", ["named", "gspmd", "named_two_replica_axes"])
def test_single_replica_restore_onto_any_sharding(tmp_path, kind):
    mesh = jax.make_mesh((2, 2, 2), ("a", "b", "c"))
    value = np.arange(16 * 6, dtype=np.float32).reshape(16, 6)
    ckptcore.save(tmp_path / "ck", {"x": value, "k": jax.random.key(3)})
    named = NamedSharding(mesh, P("a"))  # replicated along b and c
    sharding = gspmd(named, 2) if kind == "gspmd" else named
    target = {"x": jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding), "k": None}
    axis = None if kind != "named_two_replica_axes" else "c"
    narrowed, _ = replicas.single_replica_targets(target, axis)
    readers = narrowed["x"].sharding.device_set
    # GSPMD: every replica but the first of each region is left out (2 of 8 devices read);
    # named: index 0 of one replica axis (4 of 8).
    assert len(readers) == (2 if kind == "gspmd" else 4)
    with ckptcore.multiprocess_options(single_replica_restore=True, replica_axis=axis):
        restored = ckptcore.restore(tmp_path / "ck", target)
    x = restored["x"]
    assert x.sharding == sharding or indices(x.sharding, value.shape) == indices(sharding, value.shape)
    assert len(x.addressable_shards) == 8
    for shard in x.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
    np.testing.assert_array_equal(np.asarray(x), value)
