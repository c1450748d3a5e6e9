"""One process of an emergency-checkpointing job (run by tests/test_emergency.py and benchmarks, never imported).

    python tests/emergency_worker.py '{"port": P, "processes": N, "process_id": I, "devices": K,
        "scenario": "train"|"resume"|"hang_in_local_save", "local": DIR, "persistent": URL, "out": JSON, ...}'

"train" trains ``steps`` steps from scratch, saving every step through the emergency manager,
then waits until killed (``wait_killed``) or leaves. "resume" restores ``latest_step()`` and
checks every byte against the state recomputed from scratch. "hang_in_local_save" trains,
then blocks every write of step ``hang_step`` so that the job can be killed mid-save.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

CONFIG: dict[str, Any] = json.loads(sys.argv[1])
RESULT: dict[str, Any] = {"process": CONFIG["process_id"]}


def emit(code: int) -> None:
    with open(CONFIG["out"] + ".tmp", "w") as f:
        json.dump(RESULT, f)
    os.replace(CONFIG["out"] + ".tmp", CONFIG["out"])
    if CONFIG["process_id"] == 0:  # the coordination service lives here: let the others report first
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(os.path.exists(o) for o in CONFIG.get("outs", [])):
            time.sleep(0.1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


os.environ.pop("XLA_FLAGS", None)
os.environ["JAX_PLATFORMS"] = "cpu"
SKEW = float(CONFIG.get("clock_skew", {}).get(str(CONFIG["process_id"]), 0))
if SKEW:  # a host whose clock disagrees with the others'
    _real_time = time.time
    time.time = lambda: _real_time() + SKEW  # type: ignore[assignment]

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(CONFIG["devices"]))
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{CONFIG['port']}", num_processes=CONFIG["processes"],
    process_id=CONFIG["process_id"], initialization_timeout=60, heartbeat_timeout_seconds=60,
)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ckptcore  # noqa: E402
from ckptcore.emergency import CheckpointManager, Options  # noqa: E402

ROWS = int(CONFIG.get("rows", 64))
COLS = int(CONFIG.get("cols", 32))
SPECS = {"w": P("data", "model"), "b": P("model"), "m": P(None, "data")}


def mesh() -> Any:
    return jax.make_mesh((CONFIG["processes"], CONFIG["devices"]), ("data", "model"), devices=jax.devices())


def init(m: Any) -> dict[str, Any]:
    full = {
        "w": np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS) / 7,
        "b": np.linspace(-1, 1, COLS, dtype=np.float32),
        "m": np.arange(8 * ROWS, dtype=np.int32).reshape(8, ROWS),
    }
    state: dict[str, Any] = {
        k: jax.make_array_from_callback(v.shape, NamedSharding(m, SPECS[k]), lambda idx, v=v: v[idx])
        for k, v in full.items()
    }
    state["step"] = 0
    state["host"] = np.zeros(3, np.float64)  # a NumPy leaf, the same on every process
    return state


@jax.jit
def _update(w: Any, b: Any, mm: Any) -> tuple[Any, Any, Any]:
    return w * 1.0001 + jnp.sin(b)[None, :], b + 0.5, mm + 1


def train_step(state: dict[str, Any]) -> dict[str, Any]:
    w, b, mm = _update(state["w"], state["b"], state["m"])
    step = state["step"] + 1
    return {"w": w, "b": b, "m": mm, "step": step, "host": state["host"] + step}


def target(m: Any) -> dict[str, Any]:
    s = init(m)
    out = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in s.items() if k in SPECS}
    return {**out, "step": 0, "host": np.zeros(3, np.float64)}


def manager() -> CheckpointManager:
    opts = Options(local_every=int(CONFIG.get("local_every", 2)), persistent_every=int(CONFIG.get("persistent_every", 4)),
                   local_max_to_keep=2, replicas=int(CONFIG.get("replicas", 1)),
                   storage_options={"retries": 1, "retry_delay": 0.1, "timeout": 10})
    return CheckpointManager(CONFIG["local"], CONFIG["persistent"], opts)


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    for k in SPECS:
        if a[k].sharding != b[k].sharding:
            return False
        for x, y in zip(a[k].addressable_shards, b[k].addressable_shards, strict=True):
            if x.device != y.device or not np.array_equal(np.asarray(x.data), np.asarray(y.data)):
                return False
    return int(a["step"]) == int(b["step"]) and np.array_equal(a["host"], b["host"])


def train(mgr: CheckpointManager, state: dict[str, Any], start: int, steps: int, hang: int | None = None) -> Any:
    timings = []
    for step in range(start + 1, steps + 1):
        state = train_step(state)
        if step == hang:
            from ckptcore.io import save as saving

            mgr.wait_until_finished()  # the previous steps are complete; only step `hang` is interrupted
            real = saving.write_own_shards

            def blocked(*args: Any, step: int = step, real: Any = real, **kwargs: Any) -> Any:
                with open(f"{CONFIG['out']}.saving", "w") as f:
                    f.write(str(step))
                time.sleep(600)  # killed here, in the middle of the save
                return real(*args, **kwargs)

            saving.write_own_shards = blocked  # type: ignore[assignment]
        if CONFIG.get("compute_s"):  # the benchmark times the save, not the step's compute it would wait for
            jax.block_until_ready(state)
        t = time.perf_counter()
        mgr.save(step, state)
        timings.append(time.perf_counter() - t)
        time.sleep(float(CONFIG.get("compute_s", 0)))  # the benchmark's stand-in for the next steps' compute
    RESULT["save_blocking_s"] = timings
    return state


def async_blocking(state: dict[str, Any], saves: int) -> list[float]:
    """AsyncCheckpointer's blocking time (its snapshot) per save, at the same cadence as ``train``."""
    timings = []
    with ckptcore.AsyncCheckpointer() as ckpt:
        for i in range(saves):
            t = time.perf_counter()
            ckpt.save(f"{CONFIG['persistent']}-async/{i}", state)
            timings.append(time.perf_counter() - t)
            time.sleep(float(CONFIG.get("compute_s", 0)))
    return timings


def main() -> None:
    m = mesh()
    scenario = CONFIG["scenario"]
    mgr = manager()
    if scenario in ("train", "hang_in_local_save"):
        hang = CONFIG.get("hang_step") if scenario == "hang_in_local_save" else None
        state = train(mgr, init(m), 0, int(CONFIG["steps"]), hang)
        mgr.wait_until_finished()
        if CONFIG.get("rows"):  # the benchmark's figures, on the same state
            t = time.perf_counter()
            mgr._save_local(int(CONFIG["steps"]), state)  # the same step again (replaced)
            mgr._engine.wait()
            RESULT["local_total_s"] = time.perf_counter() - t
            RESULT["async_snapshot_s"] = async_blocking(state, int(CONFIG["steps"]))
        RESULT["local_steps"] = mgr.local_steps()
        RESULT["persistent_steps"] = mgr.persistent_steps()
        RESULT["latest"] = mgr.latest_step()
    elif scenario == "resume":
        RESULT["local_steps_before"] = mgr.local_steps()
        latest = mgr.latest_step()
        RESULT["latest"] = latest
        abstract = target(m)  # built before the clock starts: it computes the whole initial state
        t = time.perf_counter()
        restored = mgr.restore(latest, abstract)
        RESULT["restore_s"] = time.perf_counter() - t
        info = mgr.last_restore_info
        RESULT["info"] = {"step": info.step, "tier": info.tier, "reason": info.reason,
                          "sources": {str(k): v for k, v in info.sources.items()}} if info else None
        expected = init(m)
        for _ in range(int(latest)):
            expected = train_step(expected)
        RESULT["identical"] = same(restored, expected)
        if CONFIG.get("continue_to"):  # training goes on from the restored state
            train(mgr, restored, int(latest), int(CONFIG["continue_to"]))
            mgr.wait_until_finished()
            RESULT["local_steps"] = mgr.local_steps()
    mgr.close()
    RESULT["ok"] = True


try:
    main()
except BaseException as exc:
    RESULT["error"] = f"{type(exc).__name__}: {exc}"
    RESULT["is_checkpoint_error"] = isinstance(exc, ckptcore.CheckpointError)
    RESULT["traceback"] = traceback.format_exc()
    emit(1)
if CONFIG.get("wait_killed"):
    with open(CONFIG["out"], "w") as f:
        json.dump(RESULT, f)
    time.sleep(600)
emit(0)
