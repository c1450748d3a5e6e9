"""``jax.Array`` leaves. Imported only when a JAX value is met, so JAX stays optional.

Minimal version: arrays are gathered to the host on save and restored onto the default
device. Sharded save and resharding restore replace this (issue "JAX arrays").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ckptcore import arrays
from ckptcore.dtypes import dtype_name
from ckptcore.keys import KeyPath, storage_key
from ckptcore.registrations import ReadRequest, Shard, WriteRequest


def plan_write(path: KeyPath, value: Any, *, copy: bool) -> arrays.PlannedWrite:
    import jax

    host = np.asarray(jax.device_get(value))
    record = {"kind": "jax_array", "shape": list(host.shape), "dtype": dtype_name(host.dtype), "nbytes": int(host.nbytes)}
    request = WriteRequest(
        key=storage_key(path), shape=host.shape, dtype=host.dtype, shards=(Shard(arrays.full_index(host.shape), host),)
    )
    return arrays.PlannedWrite(path, record, request)


def plan_read(
    path: KeyPath, record: dict[str, Any], target: Any, saved_shape: tuple[int, ...], saved_dtype: np.dtype
) -> tuple[ReadRequest, arrays.Finisher]:
    import jax

    dtype = np.dtype(target.dtype) if target is not None else saved_dtype
    if target is not None:
        arrays.check_shape(path, saved_shape, tuple(target.shape))
    request = ReadRequest(
        key=record["key"], shape=saved_shape, saved_dtype=saved_dtype, dtype=dtype,
        info=record.get("format_info", {}), regions=(arrays.full_index(saved_shape),),
    )
    sharding = getattr(target, "sharding", None)

    def finish(results: list[np.ndarray]) -> Any:
        return jax.device_put(results[0], sharding) if sharding is not None else jax.numpy.asarray(results[0])

    return request, finish
