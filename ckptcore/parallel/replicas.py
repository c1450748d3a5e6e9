"""Single-replica restore: replicated arrays are read once and copied to the other replicas.

Only the devices at index 0 of the replica axis read from storage; XLA copies the data to
the other replicas (a jitted identity), which is cheaper in bytes read when storage is the
bottleneck. Switched on by ``MultiprocessOptions.single_replica_restore``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def single_replica_targets(target: Any, replica_axis: str | None) -> tuple[Any, Callable[[Any], Any]]:
    """The target to read, and how to finish the result, for a single-replica restore.

    Every ``jax.Array`` target leaf whose ``NamedSharding`` replicates it along the replica
    axis is read only by the devices at index 0 of that axis, then copied to the other
    replicas by a jitted identity (XLA moves the data between devices and processes).
    Called only when ``MultiprocessOptions.single_replica_restore`` is on and JAX is in use.
    """
    import jax

    plans: list[Any] = []

    def narrow(leaf: Any) -> Any:
        plan = _replica_plan(leaf, replica_axis)
        plans.append(plan)
        return plan.read_target if plan is not None else leaf

    narrowed = jax.tree_util.tree_map(narrow, target)
    if not any(plans):
        return target, lambda restored: restored

    def widen(restored: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten(restored)
        return jax.tree_util.tree_unflatten(treedef, [_broadcast(v, p) for v, p in zip(leaves, plans, strict=True)])

    return narrowed, widen


@dataclass
class _ReplicaPlan:
    read_target: Any  # a ShapeDtypeStruct on the replica-0 sub-mesh
    sharding: Any  # the target's sharding (all replicas)
    axis: str
    mesh: Any


def _replica_plan(leaf: Any, axis: str | None) -> _ReplicaPlan | None:
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding) or not hasattr(leaf, "shape"):
        return None
    mesh = sharding.mesh
    used = {a for entry in sharding.spec for a in ((entry,) if isinstance(entry, str) else (entry or ()))}
    candidates = [a for a in mesh.axis_names if a not in used and mesh.shape[a] > 1]
    chosen = axis if axis is not None else (candidates[0] if candidates else None)
    if chosen is None or chosen not in candidates:
        return None
    position = list(mesh.axis_names).index(chosen)
    sub_devices = mesh.devices.take([0], axis=position)
    sub_mesh = Mesh(sub_devices, mesh.axis_names, axis_types=getattr(mesh, "axis_types", None))
    sub_sharding = NamedSharding(sub_mesh, PartitionSpec(*sharding.spec))
    read_target = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sub_sharding)
    return _ReplicaPlan(read_target, sharding, chosen, mesh)


def _broadcast(value: Any, plan: _ReplicaPlan | None) -> Any:
    """Copy ``value`` (held by the replica-0 devices) to every replica of ``plan.sharding``."""
    if plan is None:
        return value
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

    sharding, axis, mesh = plan.sharding, plan.axis, plan.mesh
    # Auto axes: XLA may pick the communication (an explicit-axes mesh refuses the slicing).
    auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    # A stacked array (replicas, *shape) sharded along the replica axis: replica 0's slot is
    # the data read, the other slots are zeros created on their devices (never read).
    stacked = NamedSharding(auto, PartitionSpec(axis, *sharding.spec))
    shape = (mesh.shape[axis], *value.shape)
    local = {shard.device: shard.data for shard in value.addressable_shards}
    buffers = []
    for device, maybe_index in stacked.addressable_devices_indices_map(shape).items():
        index = maybe_index or tuple(slice(None) for _ in shape)
        if (index[0].start or 0) == 0:
            # The replica-0 devices of the full mesh are the devices of the sub-mesh read onto.
            buffers.append(local[device][None])
        else:
            piece = [len(range(*s.indices(n))) for s, n in zip(index[1:], value.shape, strict=True)]
            buffers.append(jnp.zeros((1, *piece), value.dtype, device=device))
    global_stack = jax.make_array_from_single_device_arrays(shape, stacked, buffers, dtype=value.dtype)
    out = _take_first(NamedSharding(auto, sharding.spec))(global_stack)
    # Same devices, same layout: re-wrap the buffers under the caller's sharding (no copy).
    return jax.make_array_from_single_device_arrays(
        value.shape, sharding, [s.data for s in out.addressable_shards], dtype=value.dtype
    )


_take_first_cache: dict[Any, Any] = {}


def _take_first(sharding: Any) -> Any:
    import jax

    fn = _take_first_cache.get(sharding)
    if fn is None:
        fn = jax.jit(lambda stacked: stacked[0], out_shardings=sharding)
        _take_first_cache[sharding] = fn
    return fn
