"""Single-replica restore: replicated arrays are read once and copied to the other replicas.

Only the devices at index 0 of the replica axis read from storage; XLA copies the data to
the other replicas (a jitted identity), which is cheaper in bytes read when storage is the
bottleneck. Switched on by ``MultiprocessOptions.single_replica_restore``.

What the replica axis is, per sharding type (every ``jax.sharding.Sharding`` is covered):

* ``NamedSharding``: a mesh axis the partition spec does not use (``replica_axis``, or the
  first such axis of size > 1). Its index 0 devices form the sub-mesh that reads.
* any other sharding with replicas (``GSPMDSharding``, a third-party ``Sharding``): the
  devices that hold the same region (shard index) form a replica group, ordered as the
  sharding lists its devices (``devices_indices_map``); replica 0 is the first device of
  each group. The sharding is rewritten as an equivalent ``NamedSharding`` over a mesh of
  the array's tiles plus one ``replica`` axis, then read as above (``replica_axis`` does
  not apply: such shardings name no axes). A sharding whose regions do not form an even
  grid with equal replica groups is restored the ordinary way.
* ``SingleDeviceSharding`` and shardings without replicas: nothing to narrow; read as usual.

(jax 0.10 has no ``PositionalSharding`` any more; ``GSPMDSharding`` lives in
``jax._src.sharding_impls`` and is what ``jit`` outputs may carry.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REPLICA_AXIS = "replica"
"""The name of the replica axis of the mesh built for a sharding that names no axes."""


def single_replica_targets(target: Any, replica_axis: str | None) -> tuple[Any, Callable[[Any], Any]]:
    """The target to read, and how to finish the result, for a single-replica restore.

    Every ``jax.Array`` target leaf whose sharding replicates it along the replica axis
    (see the module: any sharding type) is read only by the devices at index 0 of that
    axis, then copied to the other replicas by a jitted identity (XLA moves the data
    between devices and processes).
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
    spec: Any  # the partition spec of the (equivalent) NamedSharding over ``mesh``


def _replica_plan(leaf: Any, axis: str | None) -> _ReplicaPlan | None:
    from jax.sharding import NamedSharding

    sharding = getattr(leaf, "sharding", None)
    if sharding is None or not hasattr(leaf, "shape") or len(getattr(sharding, "device_set", ())) < 2:
        return None  # no sharding, or one device (SingleDeviceSharding): nothing to narrow
    if isinstance(sharding, NamedSharding):
        return _named_plan(leaf, sharding, sharding, axis)
    equivalent = _as_named(sharding, tuple(int(n) for n in leaf.shape))
    return None if equivalent is None else _named_plan(leaf, equivalent, sharding, REPLICA_AXIS)


def _named_plan(leaf: Any, named: Any, sharding: Any, axis: str | None) -> _ReplicaPlan | None:
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = named.mesh
    used = {a for entry in named.spec for a in ((entry,) if isinstance(entry, str) else (entry or ()))}
    candidates = [a for a in mesh.axis_names if a not in used and mesh.shape[a] > 1]
    chosen = axis if axis is not None else (candidates[0] if candidates else None)
    if chosen is None or chosen not in candidates:
        return None
    position = list(mesh.axis_names).index(chosen)
    sub_devices = mesh.devices.take([0], axis=position)
    sub_mesh = Mesh(sub_devices, mesh.axis_names, axis_types=getattr(mesh, "axis_types", None))
    sub_sharding = NamedSharding(sub_mesh, PartitionSpec(*named.spec))
    read_target = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sub_sharding)
    return _ReplicaPlan(read_target, sharding, chosen, mesh, named.spec)


def _as_named(sharding: Any, shape: tuple[int, ...]) -> Any:
    """A ``NamedSharding`` that places every region on the same devices as ``sharding``, or ``None``.

    Its mesh has one axis per array dimension (the number of tiles along it) and a last
    ``replica`` axis (the devices holding each region, in the sharding's device order).
    """
    import numpy as np
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

    try:
        index_map = sharding.devices_indices_map(shape)
    except (TypeError, ValueError, IndexError):
        return None
    groups: dict[tuple[tuple[int, int], ...], list[Any]] = {}
    for device, index in index_map.items():
        groups.setdefault(_region(index, shape), []).append(device)
    replicas = {len(devices) for devices in groups.values()}
    if len(replicas) != 1 or replicas == {1}:
        return None  # no replicas, or uneven groups
    starts = [sorted({region[d][0] for region in groups}) for d in range(len(shape))]
    tiles = [len(s) for s in starts]
    if math.prod(tiles) != len(groups) or any(n % t for n, t in zip(shape, tiles, strict=True)):
        return None  # not an even grid of tiles
    devices = np.empty((*tiles, replicas.pop()), dtype=object)
    for region, members in groups.items():
        tile = tuple(starts[d].index(region[d][0]) for d in range(len(shape)))
        for j, device in enumerate(members):
            devices[(*tile, j)] = device
    names = (*(f"dim{d}" for d in range(len(shape))), REPLICA_AXIS)
    mesh = Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))
    named = NamedSharding(mesh, PartitionSpec(*names[:-1]))
    mapped = named.devices_indices_map(shape)
    if any(_region(mapped[d], shape) != _region(i, shape) for d, i in index_map.items()):
        return None
    return named


def _region(index: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(tuple(s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))  # type: ignore[misc]


def _broadcast(value: Any, plan: _ReplicaPlan | None) -> Any:
    """Copy ``value`` (held by the replica-0 devices) to every replica of ``plan.sharding``."""
    if plan is None:
        return value
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

    sharding, axis, mesh, spec = plan.sharding, plan.axis, plan.mesh, plan.spec
    # Auto axes: XLA may pick the communication (an explicit-axes mesh refuses the slicing).
    auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    # A stacked array (replicas, *shape) sharded along the replica axis: replica 0's slot is
    # the data read, the other slots are zeros created on their devices (never read).
    stacked = NamedSharding(auto, PartitionSpec(axis, *spec))
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
    out = _take_first(NamedSharding(auto, spec))(global_stack)
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
