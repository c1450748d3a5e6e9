"""``jax.Array`` leaves: sharded save and resharding restore. Imported only when JAX is met.

Save
    Each distinct region (shard index) is written once across processes and replicas: by
    the process holding its replica 0 (``replica_id == 0``), or, for a large region that
    several processes hold (replicated across hosts), split into row blocks written by
    each holder (replica-parallel save, see :func:`_own_shards`). In a multi-process run
    every process hands the format only its own shards, which the format writes at their
    index into the global-shape array. Small arrays (at most
    :data:`SMALL_GATHER_BYTES`) that this process holds entirely are gathered on the host
    and written whole, so that the format can pack them. The index records the *logical*
    sharding, never device ids: for a ``NamedSharding`` the mesh axis names, sizes and
    types plus the partition spec; ``{"type": "single_device"}``, ``{"type":
    "replicated"}`` or ``{"type": "other"}`` for the rest.

    Typed PRNG keys (``jax.random.key``) are stored as their key data
    (``jax.random.key_data``, uint32) with the implementation name, and come back as typed
    keys. Legacy ``uint32`` keys (``jax.random.PRNGKey``) are plain uint32 arrays.

Restore
    Onto a target leaf that is a ``jax.ShapeDtypeStruct`` with a sharding or an existing
    ``jax.Array``: the regions this process's devices hold
    (``sharding.addressable_devices_indices_map``) are deduplicated, only those regions
    are read (cast to the target dtype by the format, region by region), each is put on
    its devices and its host copy dropped, and the array is assembled with
    ``jax.make_array_from_single_device_arrays``. Any mesh works: another shape, axis
    order, or number of devices than the saved one. A sharding that cannot hold the
    array (a dimension not divisible by its mesh axes, a spec longer than the array's
    rank) is a :class:`~ckptcore.errors.TargetMismatchError`.

    Without a target (or for a ``ShapeDtypeStruct`` without a sharding) the default is:
    the saved logical sharding when this machine has at least as many devices as the
    saved mesh (its first devices, in ``jax.devices()`` order, form the mesh); otherwise a
    ``jax.Array`` on the first local device. When JAX is not installed, JAX leaves come
    back as NumPy arrays (typed keys as their uint32 key data).

Memory
    Regions are read in waves of ``max_bytes_in_flight`` (see :func:`ckptcore.restore`).
    Each host region is dropped as soon as it is on its devices; on CPU devices JAX adopts
    a 64-byte aligned host buffer without a copy, so the one copy made is into such a
    buffer, and the read buffers are handed back to the OS between waves. A restore thus
    peaks near its result's size plus one wave.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from ckptcore.errors import ChecksumMismatchError, CorruptCheckpointError, TargetMismatchError, UnsupportedLeafError
from ckptcore.io import checksums
from ckptcore.io import plans as arrays
from ckptcore.plugins.buffers import ALIGN, aligned_empty
from ckptcore.plugins.registrations import Index, ReadRequest, Shard, WriteRequest
from ckptcore.tree.dtypes import dtype_name, is_supported_array_dtype
from ckptcore.tree.keys import KeyPath, format_key_path, storage_key

SMALL_GATHER_BYTES = 64 << 10
"""Fully addressable arrays up to this size are written and read whole (one region, no per-shard I/O)."""

KIND_ARRAY = "jax_array"
KIND_PRNG_KEY = "jax_prng_key"

RegionKey = tuple[tuple[int, int], ...]


# -- save --------------------------------------------------------------------------------


def plan_write(path: KeyPath, value: Any, *, copy: bool, shards: bool = True) -> arrays.PlannedWrite:
    """The write of one JAX leaf: this process's distinct replica-0 shards.

    ``copy`` is not needed: jax arrays are immutable, and the host views taken here keep
    their buffers alive (a donation then copies instead of reusing them). ``shards=False``
    leaves a sharded leaf's shards to the caller (the emergency tier's views choose their own).
    """
    import jax

    value = _concrete(path, value)
    extra: dict[str, Any] = {}
    kind = KIND_ARRAY
    if _is_key_dtype(value.dtype):
        extra = {"prng_impl": str(jax.random.key_impl(value)), "key_shape": list(value.shape)}
        kind = KIND_PRNG_KEY
        value = jax.random.key_data(value)
    dtype = np.dtype(value.dtype)
    if not is_supported_array_dtype(dtype):
        raise UnsupportedLeafError(f"jax.Array of dtype {dtype} at {format_key_path(path)} is not supported")
    shape = tuple(int(n) for n in value.shape)
    nbytes = math.prod(shape) * dtype.itemsize
    record = {
        "kind": kind, "shape": list(shape), "dtype": dtype_name(dtype), "nbytes": int(nbytes),
        "sharding": sharding_record(value.sharding), **extra,
    }
    hint = None
    if value.is_fully_addressable and nbytes <= SMALL_GATHER_BYTES:
        own: tuple[Shard, ...] = (Shard(arrays.full_index(shape), np.asarray(value)),)
    elif shards or value.is_fully_addressable:
        own, hint = _own_shards(value, shape, dtype.itemsize, storage_key(path))
    else:
        own = ()
    request = WriteRequest(key=storage_key(path), shape=shape, dtype=dtype, shards=own, chunk_hint=hint)
    return arrays.PlannedWrite(path, record, request)


def _concrete(path: KeyPath, value: Any) -> Any:
    import jax

    where = format_key_path(path)
    if isinstance(value, jax.core.Tracer):
        raise UnsupportedLeafError(f"the leaf at {where} is a traced value: save concrete arrays, outside jit")
    if not hasattr(type(value), "addressable_shards"):
        raise UnsupportedLeafError(
            f"the leaf at {where} is an abstract {type(value).__name__} and holds no data; save a jax.Array"
        )
    if value.is_deleted():
        raise UnsupportedLeafError(f"the jax.Array at {where} was deleted (donated?); save it before donating it")
    return value


def _own_shards(
    value: Any, shape: tuple[int, ...], itemsize: int, key: str
) -> tuple[tuple[Shard, ...], tuple[int, ...] | None]:
    """The shards this process writes, and the chunk hint: each element once across processes and replicas.

    A region (a distinct shard index) that one process holds is written by the process
    holding its replica 0, as a whole. A region that several active processes hold
    (replicated across hosts, e.g. ``P()`` or an unused mesh axis spanning processes) is
    split along its first axis into one row block per holder (:func:`multiwriter.split_rows`;
    which holder writes which block: :func:`multiwriter.block_writers`) and each holder
    writes its block from its own replica: the bytes of replicated arrays
    are spread over the hosts instead of all falling on one (replica-parallel save). Regions
    too small to be worth splitting keep one writer. The split is computed from the sharding
    alone, so every process agrees on it without a message.
    """
    from ckptcore.io import multiwriter

    me = _process_index()
    holders = _region_holders(value.sharding, shape, multiwriter.active_processes())
    local: dict[RegionKey, tuple[Index, Any, bool]] = {}
    for shard in value.addressable_shards:
        index = _normalize(shard.index, shape)
        region = _key(index)
        seen = local.get(region)
        if seen is None or (shard.replica_id == 0 and not seen[2]):
            local[region] = (index, shard.data, shard.replica_id == 0 or (seen is not None and seen[2]))
    shards: list[Shard] = []
    block_shape: tuple[int, ...] | None = None
    for region, (index, data, has_replica_0) in local.items():
        holding, ordinal = holders.get(region, ((), 0))
        blocks = multiwriter.split_rows(index, len(holding), itemsize) if me in holding else [index]
        if len(blocks) == 1:
            if has_replica_0:
                shards.append(Shard(index, np.asarray(data)))
            continue
        position = multiwriter.block_writers(holding, key, ordinal, len(blocks)).index(me)
        if position >= len(blocks):
            continue  # fewer rows than holders: the first holders write them
        block = blocks[position]
        block_shape = tuple(s.stop - s.start for s in blocks[0])
        rows = slice(block[0].start - index[0].start, block[0].stop - index[0].start)
        # On CPU the host view is free; elsewhere copy only this block off the device.
        host = np.asarray(data)[rows] if _on_cpu_device(data) else np.asarray(data[rows])
        shards.append(Shard(block, host))
    whole = len(shards) == 1 and _key(shards[0].index) == _key(arrays.full_index(shape))
    if whole:
        return tuple(shards), None
    return tuple(shards), block_shape or tuple(int(n) for n in value.sharding.shard_shape(shape))


def _process_index() -> int:
    import jax

    return int(jax.process_index())


def _on_cpu_device(data: Any) -> bool:
    return all(d.platform == "cpu" for d in data.devices())


Holders = dict[RegionKey, tuple[tuple[int, ...], int]]


def _region_holders(sharding: Any, shape: tuple[int, ...], active: tuple[int, ...] | None) -> Holders:
    """Region -> (the active processes holding a replica of it, ascending; its position among the regions)."""
    try:
        return _region_holders_cached(sharding, shape, active)
    except TypeError:  # an unhashable sharding
        return _region_holders_uncached(sharding, shape, active)


def _region_holders_uncached(sharding: Any, shape: tuple[int, ...], active: tuple[int, ...] | None) -> Holders:
    found: dict[RegionKey, set[int]] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        found.setdefault(_key(_normalize(index, shape)), set()).add(int(device.process_index))
    return {
        k: (tuple(sorted(p for p in found[k] if active is None or p in active)), ordinal)
        for ordinal, k in enumerate(sorted(found))
    }


_region_holders_cached = functools.lru_cache(maxsize=256)(_region_holders_uncached)


def start_host_copies(state: Any) -> None:
    """Start the device-to-host copy of every replica-0 shard in ``state`` before any is awaited.

    On accelerators this overlaps all transfers of a snapshot; on CPU it costs nothing.
    Containers are walked as :func:`ckptcore.tree.encode_tree` walks them.
    """
    for value in _leaves(state):
        if not arrays.is_jax_value(value) or not hasattr(type(value), "addressable_shards"):
            continue
        try:
            if value.is_deleted() or _on_cpu(value):
                continue  # deleted: plan_write reports it; on CPU the host view needs no copy
            if value.is_fully_addressable and value.nbytes <= SMALL_GATHER_BYTES:
                value.copy_to_host_async()  # gathered whole by plan_write
                continue
            for shard in value.addressable_shards:
                if shard.replica_id == 0:
                    shard.data.copy_to_host_async()
        except Exception:  # a prefetch only: plan_write raises the real error, if any
            continue


def _on_cpu(value: Any) -> bool:
    return all(d.platform == "cpu" for d in value.sharding.device_set)


def _leaves(tree: Any) -> Iterator[Any]:
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    else:
        from ckptcore.tree.pytrees import flatten_node

        try:
            flat = flatten_node(tree)  # a TrainState, an NNX State...: walked as encode_tree walks it
        except UnsupportedLeafError:
            flat = None  # a prefetch only: encode_tree reports it
        if flat is None:
            yield tree
        else:
            for v in flat.children:
                yield from _leaves(v)


def sharding_record(sharding: Any) -> dict[str, Any]:
    """The logical sharding as JSON: mesh axes and partition spec, never device ids."""
    from jax.sharding import NamedSharding

    if isinstance(sharding, NamedSharding) and all(isinstance(n, str) for n in sharding.mesh.axis_names):
        mesh = sharding.mesh
        return {
            "type": "named",
            "mesh": {
                "axis_names": list(mesh.axis_names),
                "axis_sizes": [int(n) for n in mesh.axis_sizes],
                "axis_types": [t.name for t in getattr(mesh, "axis_types", ())],
            },
            "spec": [_spec_entry(e) for e in sharding.spec],
        }
    devices = len(sharding.device_set)
    if devices == 1:
        return {"type": "single_device"}
    if sharding.is_fully_replicated:
        return {"type": "replicated", "num_devices": devices}
    return {"type": "other", "num_devices": devices}


def _spec_entry(entry: Any) -> Any:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, tuple):
        return list(entry)
    return None  # None (or UNCONSTRAINED, which a concrete array never has): not partitioned


# -- restore -----------------------------------------------------------------------------


def plan_read(
    path: KeyPath, record: dict[str, Any], target: Any, saved_shape: tuple[int, ...], saved_dtype: np.dtype
) -> tuple[ReadRequest, arrays.Finisher]:
    """How to read a stored leaf onto ``target``'s sharding (``None``: the documented default)."""
    import jax

    where = format_key_path(path)
    as_key = record["kind"] == KIND_PRNG_KEY and (target is None or _is_key_dtype(target.dtype))
    impl = str(record.get("prng_impl", ""))
    shape, dtype = saved_shape, saved_dtype
    sharding = getattr(target, "sharding", None) if target is not None else None
    if target is not None:
        if as_key:
            shape = _key_data_shape(where, target, record, saved_shape)
            target_impl = getattr(getattr(target.dtype, "_impl", None), "name", impl)
            if target_impl != impl:
                raise TargetMismatchError(
                    f"PRNG key implementation mismatch at {where}: the checkpoint holds {impl!r} keys, "
                    f"the target asks for {target_impl!r}"
                )
        else:
            arrays.check_shape(path, saved_shape, tuple(int(n) for n in target.shape))
            dtype = np.dtype(target.dtype)
    place_keys_on = None  # a key sharding with no data-shape equivalent: place the keys afterwards
    if sharding is None:
        sharding = default_sharding(record, shape)
    elif not isinstance(sharding, jax.sharding.Sharding):
        raise TargetMismatchError(
            f"the target at {where} has sharding {sharding!r}; restoring needs a concrete jax.sharding.Sharding "
            "(e.g. NamedSharding(mesh, PartitionSpec(...)))"
        )
    elif as_key:
        _index_map(where, sharding, tuple(int(n) for n in target.shape))
        data_sharding = _key_data_sharding(sharding)
        if data_sharding is None:
            place_keys_on, sharding = sharding, default_sharding({}, shape)
        else:
            sharding = data_sharding
    index_map = _index_map(where, sharding, shape)

    nbytes = math.prod(shape) * dtype.itemsize
    if sharding.is_fully_addressable and nbytes <= SMALL_GATHER_BYTES:
        regions: list[Index] = [arrays.full_index(shape)]
        placement: list[list[Any]] | None = None  # jax.device_put(host, sharding) splits it
    else:
        regions, placement = _dedupe(index_map)
    expected = _expected_checksums(record) if dtype == saved_dtype else {}
    request = ReadRequest(
        key=record["key"], shape=saved_shape, saved_dtype=saved_dtype, dtype=dtype,
        info=record.get("format_info", {}), regions=tuple(regions),
        aligned=placement is not None and any(d.platform == "cpu" for d in sharding.device_set),
    )

    def finish(results: list[np.ndarray]) -> Any:
        # Consumes ``results``: each host region is dropped once it is on its devices, so a
        # restore holds little more than its result.
        if placement is None:
            host = results.pop()
            _verify(where, record, host, expected.get(_key(regions[0])))
            out = jax.device_put(host, sharding)
            del host
        else:
            on_device: dict[Any, Any] = {}
            for i, devices in enumerate(placement):
                host, results[i] = results[i], None  # type: ignore[call-overload]
                _verify(where, record, host, expected.get(_key(regions[i])))  # while the region is in cache
                for device, array in zip(devices, _put(host, devices), strict=True):
                    on_device[device] = array
                del host
            results.clear()
            # dtype: a process without devices in the sharding (multi-process) passes no arrays
            out = jax.make_array_from_single_device_arrays(
                shape, sharding, [on_device[d] for d in index_map], dtype=dtype
            )
        if as_key:
            out = jax.random.wrap_key_data(out, impl=impl)
            if place_keys_on is not None:
                out = jax.device_put(out, place_keys_on)
        return out

    return request, finish


def _put(host: np.ndarray, devices: list[Any]) -> list[Any]:
    """``host`` on each of ``devices``.

    On CPU devices JAX adopts a 64-byte aligned, C-contiguous host buffer without copying
    it, so each CPU device gets such a buffer (the region itself when it already is one,
    else an aligned copy made here): the one copy is then made in NumPy memory, and the
    formats' read buffers are released to be reused by the next wave instead of piling up
    beside the device copies XLA would otherwise allocate.
    """
    import jax

    others = [d for d in devices if d.platform != "cpu"]
    cpus = [d for d in devices if d.platform == "cpu"]
    placed = dict(zip(others, jax.device_put([host] * len(others), others), strict=True)) if others else {}
    for i, device in enumerate(cpus):
        adoptable = i == 0 and host.flags.c_contiguous and host.ctypes.data % ALIGN == 0
        placed[device] = jax.device_put(host if adoptable else _aligned_copy(host), device)
    return [placed[device] for device in devices]


def _aligned_copy(host: np.ndarray) -> np.ndarray:
    out = aligned_empty(tuple(host.shape), host.dtype)
    np.copyto(out, host)
    return out


def _index_map(where: str, sharding: Any, shape: tuple[int, ...]) -> dict[Any, Index]:
    try:
        sharding.shard_shape(shape)  # raises when a dimension does not divide evenly
        raw = sharding.addressable_devices_indices_map(shape)
    except (ValueError, IndexError, TypeError) as exc:
        raise TargetMismatchError(
            f"the target sharding at {where} cannot hold an array of shape {shape}: {exc}. "
            "Use a partition spec whose mesh axes divide each dimension, with no more entries than the array's rank"
        ) from exc
    return {device: _normalize(index, shape) for device, index in raw.items()}


def _dedupe(index_map: dict[Any, Index]) -> tuple[list[Index], list[list[Any]]]:
    """Each distinct region once, with the devices that hold it (replicas read once)."""
    by_region: dict[RegionKey, tuple[Index, list[Any]]] = {}
    for device, index in index_map.items():
        by_region.setdefault(_key(index), (index, []))[1].append(device)
    return [index for index, _ in by_region.values()], [devices for _, devices in by_region.values()]


def _normalize(index: tuple[Any, ...], shape: tuple[int, ...]) -> Index:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))


def _key(index: Index) -> RegionKey:
    return tuple((int(s.start), int(s.stop)) for s in index)


def _expected_checksums(record: dict[str, Any]) -> dict[RegionKey, str]:
    found: dict[RegionKey, str] = {}
    if "checksum" in record:
        found[tuple((0, int(n)) for n in record["shape"])] = record["checksum"]
    for entry in record.get("shard_checksums", ()):
        found[tuple((int(a), int(b)) for a, b in entry["index"])] = entry["checksum"]
    return found


def _verify(where: str, record: dict[str, Any], data: np.ndarray, expected: str | None) -> None:
    if expected is not None and not checksums.matches(data, expected):
        raise ChecksumMismatchError(
            f"array {where} (storage key {record['key']!r}) does not match its checksum; "
            "the stored data is corrupt. Restore from another checkpoint."
        )


# -- default placement -------------------------------------------------------------------


def default_sharding(record: dict[str, Any], shape: tuple[int, ...]) -> Any:
    """The saved logical sharding if this machine's devices can form its mesh, else one local device."""
    import jax

    saved = record.get("sharding") or {}
    if saved.get("type") == "named":
        sharding = _saved_named_sharding(saved)
        if sharding is not None:
            try:
                sharding.shard_shape(shape)
                return sharding
            except (ValueError, IndexError, TypeError):
                pass  # an index that does not describe this shape: fall back, the data is still readable
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _saved_named_sharding(saved: dict[str, Any]) -> Any:
    from jax.sharding import NamedSharding, PartitionSpec

    mesh_rec, spec_rec = saved.get("mesh") or {}, saved.get("spec")
    names, sizes = mesh_rec.get("axis_names"), mesh_rec.get("axis_sizes")
    types = mesh_rec.get("axis_types") or []
    if not (isinstance(names, list) and isinstance(sizes, list) and isinstance(spec_rec, list)):
        return None
    if len(names) != len(sizes) or not all(isinstance(n, str) for n in names):
        return None
    if not all(isinstance(n, int) and n > 0 for n in sizes):
        return None
    spec = []
    for entry in spec_rec:
        axes = entry if isinstance(entry, list) else [entry] if entry is not None else []
        if not all(a in names for a in axes):
            return None
        spec.append(tuple(axes) if isinstance(entry, list) else entry)
    mesh = _mesh(tuple(names), tuple(sizes), tuple(str(t) for t in types) if len(types) == len(names) else ())
    return None if mesh is None else NamedSharding(mesh, PartitionSpec(*spec))


@functools.lru_cache(maxsize=64)
def _mesh(names: tuple[str, ...], sizes: tuple[int, ...], types: tuple[str, ...]) -> Any:
    import jax

    devices = jax.devices()
    count = math.prod(sizes)
    if count > len(devices):
        return None
    known = jax.sharding.AxisType.__members__
    axis_types = tuple(known[t] for t in types) if types and all(t in known for t in types) else None
    return jax.make_mesh(sizes, names, axis_types=axis_types, devices=devices[:count])


# -- PRNG keys ---------------------------------------------------------------------------


def _is_key_dtype(dtype: Any) -> bool:
    import jax

    try:
        return bool(jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))
    except TypeError:
        return False


def _key_data_shape(where: str, target: Any, record: dict[str, Any], saved_shape: tuple[int, ...]) -> tuple[int, ...]:
    key_shape = tuple(int(n) for n in record.get("key_shape", saved_shape[:-1]))
    wanted = tuple(int(n) for n in target.shape)
    if wanted != key_shape:
        raise TargetMismatchError(
            f"shape mismatch at {where}: the checkpoint holds PRNG keys of shape {key_shape}, the target asks for {wanted}"
        )
    if saved_shape[: len(key_shape)] != key_shape:
        raise CorruptCheckpointError(f"the key data shape {saved_shape} at {where} does not extend its key shape {key_shape}")
    return saved_shape


def _key_data_sharding(sharding: Any) -> Any:
    """The sharding of the key data of keys sharded by ``sharding`` (trailing dims unsharded)."""
    from jax.sharding import NamedSharding, SingleDeviceSharding

    if isinstance(sharding, (NamedSharding, SingleDeviceSharding)):
        return sharding  # a NamedSharding's spec is padded with None for the extra dims
    return None
