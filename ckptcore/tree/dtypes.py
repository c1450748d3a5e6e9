"""Dtype names as stored in the index, including ml_dtypes (bfloat16, float8...)."""

from __future__ import annotations

import numpy as np

from ckptcore.errors import CorruptCheckpointError


def dtype_name(dtype: np.dtype) -> str:
    """The name a dtype is stored under (always little-endian / native data)."""
    return np.dtype(dtype).name


def dtype_from_name(name: str) -> np.dtype:
    """The dtype a stored name stands for; only plain names, nothing is evaluated."""
    if not isinstance(name, str) or not name.replace("_", "").isalnum():
        raise CorruptCheckpointError(f"invalid dtype name {name!r} in checkpoint index")
    try:
        return np.dtype(name)
    except TypeError:
        pass
    import ml_dtypes

    found = getattr(ml_dtypes, name, None)
    if found is None:
        raise CorruptCheckpointError(
            f"dtype {name!r} in the checkpoint index is unknown to NumPy and ml_dtypes; "
            "upgrade ml_dtypes (pip install -U ml_dtypes)"
        )
    return np.dtype(found)


def is_supported_array_dtype(dtype: np.dtype) -> bool:
    """Numeric, boolean and ml_dtypes arrays; not objects, strings or records."""
    if dtype.kind in "biufc":
        return True
    return dtype.kind == "V" and dtype.fields is None and dtype.type.__module__.startswith("ml_dtypes")
