"""Array leaves: turning them into write requests, and read results back into arrays.

NumPy is handled here; ``jax.Array`` leaves are delegated to :mod:`ckptcore.io.jax_leaves`,
which is imported only when a JAX value is actually met (JAX stays optional).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ckptcore.errors import ChecksumMismatchError, TargetMismatchError, UnsupportedLeafError
from ckptcore.io import checksums
from ckptcore.io.plans import (
    Finisher,
    PlannedWrite,
    check_shape,
    full_index,
    is_jax_value,
    jax_available,
    target_shape_dtype,
)
from ckptcore.plugins.registrations import ReadRequest, Shard, WriteRequest
from ckptcore.tree.dtypes import dtype_from_name, dtype_name, is_supported_array_dtype
from ckptcore.tree.keys import KeyPath, format_key_path, storage_key


def plan_write(path: KeyPath, value: Any, *, copy: bool) -> PlannedWrite | None:
    """The write of an array leaf, or ``None`` if ``value`` is not an array."""
    if is_jax_value(value):
        from ckptcore.io import jax_leaves

        return jax_leaves.plan_write(path, value, copy=copy)
    if not isinstance(value, np.ndarray):
        return None
    dtype = value.dtype
    if not is_supported_array_dtype(dtype):
        raise UnsupportedLeafError(
            f"NumPy array of dtype {dtype} at {format_key_path(path)} is not supported; "
            "numeric, bool and ml_dtypes arrays are (convert strings or objects to bytes or str leaves)"
        )
    if dtype.byteorder == ">":
        value, dtype = value.astype(dtype.newbyteorder("=")), dtype.newbyteorder("=")
    elif copy:
        value = np.array(value, order="C", copy=True)
    key = storage_key(path)
    record = {"kind": "ndarray", "shape": list(value.shape), "dtype": dtype_name(dtype), "nbytes": int(value.nbytes)}
    request = WriteRequest(key=key, shape=tuple(value.shape), dtype=dtype, shards=(Shard(full_index(value.shape), value),))
    return PlannedWrite(path, record, request)


def plan_read(path: KeyPath, record: dict[str, Any], target: Any) -> tuple[ReadRequest, Finisher]:
    """How to read one stored array leaf into what ``target`` asks for (``None``: the default)."""
    saved_shape = tuple(record["shape"])
    saved_dtype = dtype_from_name(record["dtype"])
    if is_jax_value(target) or (target is None and record["kind"].startswith("jax") and jax_available()):
        from ckptcore.io import jax_leaves

        return jax_leaves.plan_read(path, record, target, saved_shape, saved_dtype)
    dtype = saved_dtype
    wanted = target_shape_dtype(target) if target is not None else None
    if target is not None and wanted is None:
        raise TargetMismatchError(
            f"the target leaf at {format_key_path(path)} is a {type(target).__name__}, but the checkpoint holds an "
            "array there: use an array or an object with .shape and .dtype, or None to skip it"
        )
    if wanted is not None:
        check_shape(path, saved_shape, wanted[0])
        dtype = wanted[1]
    # A cast is done after the checksum check, so a restore into another dtype is verified too.
    cast_to = dtype if dtype != saved_dtype and record.get("checksum") else None
    request = ReadRequest(
        key=record["key"], shape=saved_shape, saved_dtype=saved_dtype, dtype=saved_dtype if cast_to else dtype,
        info=record.get("format_info", {}), regions=(full_index(saved_shape),),
    )
    expected = record.get("checksum") if request.dtype == saved_dtype else None

    def finish(arrays: list[np.ndarray]) -> np.ndarray:
        array = arrays[0]
        if expected is not None and not checksums.matches(array, expected):
            raise ChecksumMismatchError(
                f"array {format_key_path(path)} (storage key {record['key']!r}) does not match its checksum; "
                "the stored data is corrupt. Restore from another checkpoint."
            )
        return array.astype(cast_to) if cast_to is not None else array

    return request, finish


__all__ = [
    "Finisher", "PlannedWrite", "check_shape", "full_index", "is_jax_value", "jax_available", "plan_read",
    "plan_write", "target_shape_dtype",
]
