"""One process of a two-process jax.distributed job (started by test_multiprocess.py).

argv: port, process id, checkpoint path, result file. Saves a (4, 2)-sharded state with the
safetensors format, restores it onto a (2, 4) mesh, and writes what it checked as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

port, pid, path, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
result: dict = {"process": pid}
try:
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import ckptcore

    host = np.arange(256 * 512, dtype=np.float32).reshape(256, 512)
    src = NamedSharding(jax.make_mesh((4, 2), ("x", "y")), P("x", "y"))
    dst = NamedSharding(jax.make_mesh((2, 4), ("x", "y")), P("x", "y"))
    state = {
        "w": jax.make_array_from_callback(host.shape, src, lambda index: host[index]),
        "n": np.arange(10, dtype=np.int64),
    }
    ckptcore.save(path, state, format="safetensors")
    target = {"w": jax.ShapeDtypeStruct(host.shape, np.float32, sharding=dst),
              "n": np.zeros(10, np.int64)}
    restored = ckptcore.restore(path, target=target)
    result["shards_ok"] = all(
        np.array_equal(np.asarray(s.data), host[s.index]) for s in restored["w"].addressable_shards
    )
    result["n_ok"] = bool(np.array_equal(restored["n"], state["n"]))
    result["files"] = sorted(
        os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs if f.endswith(".safetensors")
    )
except BaseException:
    result["error"] = traceback.format_exc()
with open(out, "w") as f:
    json.dump(result, f)
