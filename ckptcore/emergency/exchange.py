"""Moving bytes between processes through JAX: peer replicas at save, replica hand-over at restore.

Save: every process's shards go to its peer with one jitted ``ppermute`` over a 1-D mesh
of all devices. Each leaf's device shards, as they are (no copy, no reshape: an eager
reshape of a large shard costs a copy inside the save's blocking time), become the blocks
of one array of shape ``(num_devices * shard_rows, *rest)`` split over that mesh, and
device ``k`` of process ``p`` sends its block to device ``k`` of process ``p + shift``.
The call is *dispatched* in the caller's thread
(so it is ordered like every other collective of the training program, on every process)
and awaited in the background writer, which only reads the result: the local save's
blocking time stays the snapshot.

Restore: a replica's files travel from the process holding them to the process that lost
them, in chunks of :data:`CHUNK_BYTES`, as a ``(num_processes, chunk)`` uint8 array over a
mesh of each process's first device (:func:`send_bytes`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ckptcore.errors import CheckpointError
from ckptcore.parallel.coordinator import Operation

CHUNK_BYTES = 64 << 20


def devices_by_process() -> list[list[Any]]:
    """Every process's devices, in process order, each list by device id."""
    import jax

    out: dict[int, list[Any]] = {}
    for device in jax.devices():
        out.setdefault(int(device.process_index), []).append(device)
    ordered = [sorted(out[p], key=lambda d: d.id) for p in sorted(out)]
    if len({len(d) for d in ordered}) > 1:
        raise CheckpointError(
            "emergency checkpointing needs the same number of devices on every process; found "
            + ", ".join(f"process {p}: {len(d)}" for p, d in enumerate(ordered))
        )
    return ordered


@functools.lru_cache(maxsize=32)
def _permute_fn(devices: tuple[Any, ...], pairs: tuple[tuple[int, int], ...], count: int) -> Any:
    import jax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(devices, dtype=object), ("emergency",))

    def body(*xs: Any) -> Any:
        return tuple(jax.lax.ppermute(x, "emergency", list(pairs)) for x in xs)

    spec = (P("emergency"),) * count
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec)), mesh


def dispatch_to_peers(values: list[Any], shift: int) -> list[Any]:
    """Start sending every process's shards of ``values`` to process ``+shift``; returns the stacked results.

    On process ``q`` the result's shard on its local device ``k`` is the row that local
    device ``k`` of process ``q - shift`` sent (see :func:`received_row`).
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if not values:
        return []
    groups = devices_by_process()
    flat = tuple(d for group in groups for d in group)
    per = len(groups[0])
    n = len(flat)
    pairs = tuple((i, (i + shift * per) % n) for i in range(n))
    fn, mesh = _permute_fn(flat, pairs, len(values))
    sharding = NamedSharding(mesh, P("emergency"))
    local = [d for d in flat if d.process_index == jax.process_index()]
    stacked = []
    for value in values:
        shard_shape = tuple(int(s) for s in value.sharding.shard_shape(value.shape))
        block = shard_shape or (1,)  # a 0-d shard travels as one element
        by_device = {s.device: s.data for s in value.addressable_shards}
        rows = []
        for device in local:
            data = by_device.get(device)
            if data is None:  # a leaf on a subset of the devices: this device sends zeros
                data = jax.device_put(np.zeros(block, value.dtype), device)
            rows.append(data if shard_shape else data.reshape(block))
        stacked.append(jax.make_array_from_single_device_arrays((n * block[0], *block[1:]), sharding, rows))
    out = list(fn(*stacked))
    for array in out:
        for shard in array.addressable_shards:
            if shard.device.platform != "cpu":
                shard.data.copy_to_host_async()
    return out


def received_row(result: Any, local_index: int, shape: tuple[int, ...]) -> np.ndarray:
    """The block (of ``shape``) this process's ``local_index``-th device received, in host memory."""
    import jax

    device = [d for d in devices_by_process()[jax.process_index()]][local_index]
    for shard in result.addressable_shards:
        if shard.device == device:
            return np.asarray(shard.data).reshape(shape)
    raise CheckpointError(f"no shard of the exchanged array on device {device}")


def allgather(operation: Operation, slot: str, value: Any) -> list[Any]:
    """Every process's ``value``, on every process (through the coordinator)."""
    gathered = operation.gather(slot, value)
    everyone: list[Any] = operation.broadcast(f"{slot}/all", lambda: list(gathered or []))
    return everyone


def send_bytes(operation: Operation, slot: str, source: int, destination: int, payload: bytes | None) -> bytes | None:
    """``payload`` from process ``source`` to process ``destination``; every process calls it.

    Returns the bytes on ``destination``, ``None`` elsewhere. The size travels through the
    coordinator, the bytes through JAX in chunks of :data:`CHUNK_BYTES`.
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    me = jax.process_index()
    sizes = allgather(operation, f"{slot}/size", len(payload) if (me == source and payload is not None) else -1)
    size = int(sizes[source])
    if size < 0:
        raise CheckpointError(f"process {source} had nothing to send to process {destination}")
    firsts = tuple(group[0] for group in devices_by_process())
    fn, mesh = _permute_fn(firsts, ((source, destination),), 1)
    sharding = NamedSharding(mesh, P("emergency"))
    mine = firsts[me]
    received = bytearray() if me == destination else None
    offset = 0
    while offset < size or (size == 0 and offset == 0):
        length = min(CHUNK_BYTES, size - offset)
        chunk = np.zeros((1, max(length, 1)), np.uint8)
        if me == source and payload is not None and length:
            chunk[0, :length] = np.frombuffer(payload, np.uint8, count=length, offset=offset)
        row = jax.device_put(chunk, mine)
        stacked = jax.make_array_from_single_device_arrays((len(firsts), chunk.shape[1]), sharding, [row])
        (out,) = fn(stacked)
        if received is not None:
            received += np.asarray(out.addressable_shards[0].data)[0, :length].tobytes()
        offset += max(length, 1)
    return bytes(received) if received is not None else None
