"""The older msgpack ``checkpoint`` file of orbax-checkpoint (and Flax): the tree with its small leaves inline.

Decoded with the ``msgpack`` library as data only: the extension types orbax and Flax use
(1 ndarray, 2 complex, 3 NumPy scalar, 4 tuple) are parsed here into NumPy values of plain,
validated dtype names; any other extension type is an error. Nothing is ever executed or
unpickled. Arrays stored elsewhere appear as ``"PLACEHOLDER://<param>"`` strings.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from ckptcore.errors import CorruptCheckpointError
from ckptcore.tree.dtypes import dtype_from_name

FILE = "checkpoint"
PLACEHOLDER_PREFIXES = ("PLACEHOLDER://", "AGGREGATED://")
MAX_BYTES = 2 << 30


class _Rejected(ValueError):
    pass


def _ndarray(data: bytes) -> np.ndarray:
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True, strict_map_key=False)
    name = dtype_name.decode("ascii") if isinstance(dtype_name, bytes) else str(dtype_name)
    dtype = dtype_from_name(name)
    if dtype.kind in "OUSV":
        raise _Rejected(f"dtype {name!r} is not an array of numbers")
    return np.frombuffer(bytes(buffer), dtype=dtype).reshape([int(n) for n in shape]).copy()


def _ext(code: int, data: bytes) -> Any:
    if code == 1:
        return _ndarray(data)
    if code == 2:
        real, imag = msgpack.unpackb(data, strict_map_key=False)
        return complex(float(real), float(imag))
    if code == 3:
        return _ndarray(data)[()]
    if code == 4:
        return tuple(msgpack.unpackb(data, raw=False, ext_hook=_ext, strict_map_key=False))
    raise _Rejected(f"unknown msgpack extension type {code}")


def decode(raw: bytes, url: str) -> Any:
    """The tree in the ``checkpoint`` file; chunked arrays (``__msgpack_chunked_array__``) are joined."""
    try:
        tree = msgpack.unpackb(raw, raw=False, ext_hook=_ext, strict_map_key=False, max_bin_len=MAX_BYTES)
        return _unchunk(tree)
    except (ValueError, TypeError, KeyError, msgpack.UnpackException, CorruptCheckpointError) as exc:
        raise CorruptCheckpointError(
            f"the msgpack 'checkpoint' file of the orbax-checkpoint item at {url} cannot be read "
            f"({type(exc).__name__}: {exc}); it is damaged or not an orbax/Flax checkpoint"
        ) from exc


def _unchunk(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("__msgpack_chunked_array__"):
            chunks = [node["chunks"][k] for k in sorted(node["chunks"], key=int)]
            shape = [int(node["shape"][k]) for k in sorted(node["shape"], key=int)]
            return np.concatenate([np.ravel(c) for c in chunks]).reshape(shape)
        return {str(k): _unchunk(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_unchunk(v) for v in node)
    return node


def placeholder_param(value: Any) -> str | None:
    if isinstance(value, str):
        for prefix in PLACEHOLDER_PREFIXES:
            if value.startswith(prefix):
                return value[len(prefix):]
    return None


def leaf_at(tree: Any, path: list[str]) -> Any:
    for key in path:
        tree = tree[int(key)] if isinstance(tree, (list, tuple)) else tree[key]
    return tree
