"""Writes the orbax-checkpoint 0.5.21 fixtures in this directory (run with that release, not ckptcore's venv).

    python3.11 -m venv /tmp/orbax0521
    /tmp/orbax0521/bin/pip install -r requirements.txt
    /tmp/orbax0521/bin/python generate.py

The expected values are recomputed by tests/test_orbax_fixtures.py from ``expected_state()``
(kept in sync by hand: the tests import this file, which needs only NumPy at import time).
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def expected_numpy() -> dict:
    """The NumPy part of every fixture (small: the whole directory stays well under 1 MB)."""
    return {
        "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "f64": np.linspace(-1, 1, 5),
        "i8": np.array([-128, 0, 127], np.int8),
        "u16": np.arange(6, dtype=np.uint16).reshape(2, 3),
        "i64": np.array([2**40, -(2**40)], np.int64),
        "b": np.array([True, False, True]),
        "c64": np.array([1 + 2j, 3 - 4j], np.complex64),
        "nested": {"w": np.full((2, 2), 7, np.int32), "empty": {}},
        "seq": [np.ones(2, np.float16), np.zeros(1, np.uint8)],
    }


def sharded_values() -> np.ndarray:
    return np.arange(64, dtype=np.float32).reshape(8, 8)


def main() -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    sharded = jax.device_put(sharded_values(), NamedSharding(mesh, P("x", "y")))
    state = {
        **expected_numpy(),
        "sharded": sharded,
        "bf16": jax.numpy.asarray(np.array([1.5, -2.0], dtype=jax.numpy.bfloat16)),
        "int_scalar": 7,
        "float_scalar": 2.5,
        "text": "hello orbax",
        "nothing": None,
        "key": jax.random.PRNGKey(3),
    }
    for name, use_ocdbt in (("pytree_ocdbt", True), ("pytree_no_ocdbt", False)):
        out = os.path.join(HERE, name)
        shutil.rmtree(out, ignore_errors=True)
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt))
        ckptr.save(out, state)
    # Plain zarr arrays and scalars (0.5.21 ignores aggregate=True: it no longer writes the msgpack
    # ``checkpoint`` file); tests/test_orbax_fixtures.py builds the older msgpack layout on top of it.
    out = os.path.join(HERE, "pytree_aggregate")
    shutil.rmtree(out, ignore_errors=True)
    small = {"a": np.arange(4, dtype=np.int32), "s": 3, "f": 0.25, "t": "agg", "n": {"x": np.ones(2, np.float32)}}
    save_args = jax.tree_util.tree_map(lambda _: ocp.SaveArgs(aggregate=True), small)
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)).save(out, small, save_args=save_args)
    # A CheckpointManager root: two items, metrics, best_fn and retention.
    root = os.path.join(HERE, "manager")
    shutil.rmtree(root, ignore_errors=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=2, best_fn=lambda m: m["loss"], best_mode="min")
    mgr = ocp.CheckpointManager(root, options=options, item_names=("state", "extra"))
    for step, loss in ((1, 0.9), (2, 0.5), (3, 0.7)):
        params = {"w": np.full((2, 3), step, np.float32), "step": step}
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(params),
                                               extra=ocp.args.JsonSave({"step": step, "note": "x"})),
                 metrics={"loss": loss})
    mgr.wait_until_finished()
    mgr.close()
    print("wrote fixtures with orbax-checkpoint", ocp.__version__ if hasattr(ocp, "__version__") else "?", file=sys.stderr)


if __name__ == "__main__":
    main()
