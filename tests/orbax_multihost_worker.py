"""One process of tests/test_orbax_multihost.py: orbax-checkpoint saves a sharded state from a 2-process job,
then ckptcore restores it in the same job onto another mesh (never imported by pytest)."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

CONFIG = json.loads(sys.argv[1])
RESULT: dict = {"process": CONFIG["process_id"]}

os.environ.pop("XLA_FLAGS", None)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{CONFIG['port']}", num_processes=2,
                           process_id=CONFIG["process_id"], initialization_timeout=60)

import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402


def values(shape):
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


def global_array(mesh, spec, shape):
    data = values(shape)
    return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), lambda idx: data[idx])


def main() -> None:
    import orbax.checkpoint as ocp

    import ckptcore

    mesh = jax.make_mesh((4, 2), ("x", "y"))
    state = {"w": global_array(mesh, P("x", "y"), (16, 8)), "b": global_array(mesh, P("x"), (16,)), "step": 3}
    with ocp.StandardCheckpointer() as ck:
        ck.save(CONFIG["dir"] + "/ocdbt", state)
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)).save(CONFIG["dir"] + "/plain", state)
    other = jax.make_mesh((2, 4), ("a", "b"))
    target = {"w": jax.ShapeDtypeStruct((16, 8), np.float32, sharding=NamedSharding(other, P("b", "a"))),
              "b": jax.ShapeDtypeStruct((16,), np.float32, sharding=NamedSharding(other, P(("a", "b")))),
              "step": 0}
    checked = 0
    for name in ("ocdbt", "plain"):
        back = ckptcore.restore(CONFIG["dir"] + "/" + name, target)
        assert back["step"] == 3
        for key in ("w", "b"):
            assert back[key].sharding == target[key].sharding
            for shard in back[key].addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), values(target[key].shape)[shard.index])
                checked += 1
    RESULT["checked"] = checked


try:
    main()
except BaseException as exc:
    RESULT["error"] = f"{type(exc).__name__}: {exc}"
    RESULT["traceback"] = traceback.format_exc()
with open(CONFIG["out"], "w") as f:
    json.dump(RESULT, f)
if CONFIG["process_id"] == 0:  # host of the coordination service: wait (bounded) for the other's result
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not os.path.exists(CONFIG["other_out"]):
        time.sleep(0.1)
sys.stdout.flush()
sys.stderr.flush()
os._exit(1 if "error" in RESULT else 0)
