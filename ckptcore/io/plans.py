"""The plans of a save and of a read: planned writes of leaves, a prepared save, finishers of reads.

Shared by :mod:`ckptcore.io.leaves` (NumPy, and the dispatch), :mod:`ckptcore.io.jax_leaves`
(``jax.Array``), the save walk and :mod:`ckptcore.io.multiwriter`, so that none of them
imports another's module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptcore.errors import TargetMismatchError
from ckptcore.plugins.registrations import Index, WriteRequest
from ckptcore.tree.keys import KeyPath, format_key_path
from ckptcore.tree.nodes import Node

Finisher = Callable[[list[np.ndarray]], Any]


def is_jax_value(value: Any) -> bool:
    """Whether ``value`` is a JAX array or abstract array, without importing JAX."""
    module = type(value).__module__
    return module.startswith(("jax", "jaxlib")) and hasattr(value, "shape") and hasattr(value, "dtype")


def jax_available() -> bool:
    """Whether JAX can be imported (without it, JAX leaves are restored as NumPy arrays)."""
    global _JAX_AVAILABLE
    if _JAX_AVAILABLE is None:
        try:
            import jax  # noqa: F401
        except ImportError:
            _JAX_AVAILABLE = False
        else:
            _JAX_AVAILABLE = True
    return _JAX_AVAILABLE


_JAX_AVAILABLE: bool | None = None


def full_index(shape: tuple[int, ...]) -> Index:
    return tuple(slice(0, n) for n in shape)


@dataclass
class PlannedWrite:
    """An array leaf ready to be written: its index record (filled in as it is written)."""

    path: KeyPath
    record: dict[str, Any]
    request: WriteRequest


def target_shape_dtype(target: Any) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype a target leaf asks for, if it is array-like."""
    shape, dtype = getattr(target, "shape", None), getattr(target, "dtype", None)
    if shape is None or dtype is None:
        return None
    return tuple(int(n) for n in shape), np.dtype(dtype)


def check_shape(path: KeyPath, saved: tuple[int, ...], wanted: tuple[int, ...]) -> None:
    if saved != wanted:
        raise TargetMismatchError(
            f"shape mismatch at {format_key_path(path)}: the checkpoint holds {saved}, the target asks for {wanted}"
        )


@dataclass
class PreparedSave:
    """A snapshot of a pytree: its stored tree and the array writes it needs."""

    tree: Node
    writes: list[PlannedWrite] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(w.record["nbytes"] for w in self.writes)
