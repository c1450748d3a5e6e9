"""``numpy.random.Generator`` leaves, stored inline in the index as their bit generator's state.

The state is JSON: Python ints of any size stay exact, NumPy arrays inside a state (e.g.
MT19937's key) become ``{"ndarray": dtype, "values": [...]}``. On restore only the bit
generators of :data:`BIT_GENERATORS` are rebuilt, looked up by name in ``numpy.random``:
nothing named by the checkpoint is imported or executed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ckptcore.errors import CorruptCheckpointError, UnsupportedLeafError
from ckptcore.tree.keys import KeyPath, format_key_path

KIND = "numpy_generator"
BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")
_STATE_DTYPES = ("uint32", "uint64")


def encode_generator(path: KeyPath, value: Any) -> dict[str, Any] | None:
    """The inline record of a Generator, or ``None`` if ``value`` is not one."""
    if not isinstance(value, np.random.Generator):
        return None
    bit_generator = value.bit_generator
    name = type(bit_generator).__name__
    if name not in BIT_GENERATORS or type(bit_generator) is not getattr(np.random, name):
        raise UnsupportedLeafError(
            f"numpy Generator at {format_key_path(path)} uses bit generator {name!r}; "
            f"supported: {', '.join(BIT_GENERATORS)}"
        )
    return {"kind": KIND, "bit_generator": name, "state": _to_json(bit_generator.state)}


def decode_generator(path: KeyPath, record: dict[str, Any]) -> np.random.Generator:
    """The Generator an inline record describes, in the saved state."""
    name = record.get("bit_generator")
    if name not in BIT_GENERATORS:
        raise CorruptCheckpointError(
            f"numpy Generator at {format_key_path(path)} names bit generator {name!r}, "
            f"not one of {', '.join(BIT_GENERATORS)}; the index is corrupt or from a newer ckptcore"
        )
    bit_generator = getattr(np.random, name)()
    try:
        bit_generator.state = _from_json(record["state"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise CorruptCheckpointError(
            f"the state of the numpy Generator at {format_key_path(path)} is malformed ({exc}); the index is corrupt"
        ) from exc
    return np.random.Generator(bit_generator)


def _to_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return {"ndarray": value.dtype.name, "values": [int(v) for v in value.reshape(-1)]}
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"unexpected {type(value).__name__} in a bit generator state")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"ndarray", "values"}:
            if value["ndarray"] not in _STATE_DTYPES or not isinstance(value["values"], list):
                raise ValueError(f"bad array in state: {value['ndarray']!r}")
            return np.array(value["values"], dtype=value["ndarray"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, (bool, int, str)):
        return value
    raise TypeError(f"unexpected {type(value).__name__} in a stored bit generator state")
