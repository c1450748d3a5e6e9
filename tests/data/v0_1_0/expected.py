"""The formulas behind the ckptcore 0.1.0 fixtures in this directory.

Shared by ``make_fixtures.py`` (which saved them with ckptcore 0.1.0) and
``tests/test_compat_v0_1_0.py`` (which recomputes the expected values and compares them
with what today's ckptcore restores). NumPy and ml_dtypes only; the JAX parts take the
``jax`` module as an argument so that importing this file never imports JAX.

Changing anything here invalidates the committed fixtures: never edit a formula.
"""

from __future__ import annotations

import collections
from typing import Any

import ml_dtypes
import numpy as np

# A namedtuple saved in the numpy fixture. Without a target it comes back as a namedtuple
# with the same name and fields (not this class: ckptcore never imports saved classes).
Point = collections.namedtuple("Point", ["x", "y"])


def float32_block() -> np.ndarray:
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / np.float32(8) - np.float32(1)
    a[0, 0, 0] = -0.0
    a[0, 0, 1] = np.inf
    a[0, 0, 2] = -np.inf
    a[0, 0, 3] = np.nan
    return a


def numpy_tree() -> dict[Any, Any]:
    """Every leaf and container kind ckptcore 0.1.0 supports without JAX."""
    return {
        "f32": float32_block(),
        "f16": (np.arange(12, dtype=np.float16) * np.float16(0.5) - np.float16(2)).reshape(3, 4),
        "bf16": (np.arange(16, dtype=np.float32) / 4 - 2).astype(ml_dtypes.bfloat16).reshape(4, 4),
        "f64": np.linspace(-1.0, 1.0, 7, dtype=np.float64),
        "i8": np.arange(-10, 10, dtype=np.int8).reshape(4, 5),
        "i64": np.arange(5, dtype=np.int64) * np.int64(-(2**40)),
        "u64": np.iinfo(np.uint64).max - np.arange(6, dtype=np.uint64) * np.uint64(2**60),
        "u8": (np.arange(10, dtype=np.uint8) * np.uint8(29)),
        "bool": (np.arange(12) % 3 == 0).reshape(3, 4),
        "c64": (np.arange(6, dtype=np.float32) + 1j * (np.arange(6, dtype=np.float32) - 2)).astype(np.complex64),
        "zero_d": np.array(3.25, dtype=np.float64),
        "zero_d_int": np.array(-7, dtype=np.int32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "empty_1d": np.zeros((0,), dtype=np.int16),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
        "py_int": 7,
        "py_neg_int": -(2**62),
        "py_float": 0.1,
        "py_str": "h\u00e9llo w\u00f6rld \u2713",
        "py_empty_str": "",
        "py_bytes": bytes(range(0, 256, 17)),
        "py_true": True,
        "py_false": False,
        "py_none": None,
        "np_f32": np.float32(1.5),
        "np_i64": np.int64(-42),
        "nested": {
            1: {"leaf": np.arange(3, dtype=np.float32) + np.float32(1)},
            2: "two",
            "a.b": np.arange(4, dtype=np.int32) * 3,
            "c/d": {"e.f/g": np.ones((2, 2), dtype=np.float16)},
            "spaced key \u00fc": 1.25,
        },
        "list": [1, np.arange(3, dtype=np.int32), "s", None, [2.5, []]],
        "tuple": (np.arange(4, dtype=np.int16), 2.5, (), ("x",)),
        "point": Point(x=np.arange(3, dtype=np.float64) / 3, y=5),
        "empty_dict": {},
        "empty_list": [],
    }


def zarr3_tree() -> dict[str, Any]:
    """The part of :func:`numpy_tree` saved with ``format="zarr3"``."""
    t = numpy_tree()
    keys = ["f32", "f16", "bf16", "i8", "u64", "bool", "c64", "zero_d", "empty", "py_int", "py_str", "py_none",
            "nested", "list", "tuple", "point", "empty_dict"]
    return {k: t[k] for k in keys}


def object_store_tree() -> dict[str, Any]:
    """Saved to s3:// on moto_server, then downloaded object by object."""
    return {
        "w": (np.arange(64, dtype=np.float32).reshape(8, 8) - 20) / 3,
        "b": np.arange(8, dtype=np.int64) * -5,
        "bf16": (np.arange(10, dtype=np.float32) / 8).astype(ml_dtypes.bfloat16),
        "step": 123,
        "name": "object-store",
        "nested": {"k.1": [True, None], 3: np.array(2.0, dtype=np.float32)},
    }


# -- manager root ---------------------------------------------------------------------

MANAGER_STEPS = (10, 20, 30)
MANAGER_COMPOSITE_STEP = 30
MANAGER_METADATA = {"model": "mlp", "layers": [4, 4]}


def manager_state(step: int) -> dict[str, Any]:
    return {
        "params": {
            "w": np.arange(12, dtype=np.float32).reshape(3, 4) * np.float32(step),
            "b": np.full((4,), step, dtype=np.int32),
        },
        "step": step,
        "tag": f"step-{step}",
    }


def manager_metrics(step: int) -> dict[str, float]:
    return {"loss": 1.0 / step, "accuracy": step / 100.0}


def manager_json(step: int) -> dict[str, Any]:
    return {"lr": 3e-4, "schedule": "cosine", "seen": step * 32, "tags": ["a", "b"], "nested": {"x": None}}


def manager_item(step: int) -> Any:
    """What is saved at ``step``: a plain tree, or (composite step) the items of a Composite."""
    if step == MANAGER_COMPOSITE_STEP:
        return {"state": manager_state(step), "meta": manager_json(step)}
    return manager_state(step)


# -- JAX ------------------------------------------------------------------------------

SHARDED_SHAPE = (8, 16)
SHARDED_MESH = (4, 2)  # ("data", "model"), 8 devices
MESH_AXES = ("data", "model")


def sharded_w() -> np.ndarray:
    return np.arange(8 * 16, dtype=np.float32).reshape(8, 16) / 16 - 3


def sharded_replicated() -> np.ndarray:
    return np.arange(15, dtype=np.int32).reshape(3, 5) * 7 - 11


def sharded_half() -> np.ndarray:
    """P("data", None), bfloat16."""
    return (np.arange(8 * 4, dtype=np.float32).reshape(8, 4) / 4).astype(ml_dtypes.bfloat16)


def prng_key(jax: Any) -> Any:
    return jax.random.key(0)


MP_PROCESSES = 2
MP_DEVICES_PER_PROCESS = 4
MP_MESH = (4, 2)


def mp_w() -> np.ndarray:
    """P("data", "model") over 2 processes x 4 devices."""
    return np.arange(16 * 8, dtype=np.float32).reshape(16, 8) * np.float32(0.25) + np.float32(1)


def mp_b() -> np.ndarray:
    """P("model"): replicated along "data" (across the processes)."""
    return np.arange(8, dtype=np.int32) - 4


def mp_r() -> np.ndarray:
    """P(): replicated on every device."""
    return np.full((3, 3), 2.5, dtype=np.float32)


def mp_host() -> np.ndarray:
    """A NumPy leaf (the same on both processes)."""
    return np.arange(6, dtype=np.int64) * 11
