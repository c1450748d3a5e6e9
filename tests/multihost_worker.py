"""One process of a multi-process test: joins a ``jax.distributed`` job on 127.0.0.1 and runs a scenario.

Run by tests/test_multihost.py (never imported by pytest)::

    python tests/multihost_worker.py '{"port": P, "processes": N, "process_id": I, "devices": K,
                                       "scenario": "...", "dir": D, "out": RESULT_JSON, ...}'

Each process writes its result (a JSON object, with "error" when its scenario raised) to
``out`` and leaves with ``os._exit``: after a failure the JAX runtime's shutdown barrier
would wait for the dead process, which is exactly the hang the tests must not have.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from typing import Any

CONFIG: dict[str, Any] = json.loads(sys.argv[1])
RESULT: dict[str, Any] = {"process": CONFIG["process_id"]}


def emit(code: int) -> None:
    with open(CONFIG["out"], "w") as f:
        json.dump(RESULT, f)
    if CONFIG["process_id"] == 0:
        # Process 0 hosts the coordination service: leaving at once could abort the others
        # before they report. Wait (bounded) for their results.
        deadline = time.monotonic() + 30
        others = [o for o in CONFIG.get("outs", []) if o != CONFIG["out"]]
        while time.monotonic() < deadline and not all(os.path.exists(o) for o in others):
            time.sleep(0.1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


os.environ.pop("XLA_FLAGS", None)  # the parent's 8 forced devices: this process gets its own count
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(CONFIG["devices"]))
if CONFIG.get("no_preemption_service"):
    jax.config.update("jax_enable_preemption_service", False)
if CONFIG["processes"] > 1:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{CONFIG['port']}",
        num_processes=CONFIG["processes"],
        process_id=CONFIG["process_id"],
        initialization_timeout=60,
        heartbeat_timeout_seconds=60,
    )

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, SingleDeviceSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ckptcore  # noqa: E402
from ckptcore.parallel import preemption  # noqa: E402
from ckptcore.plugins.hookspecs import hookimpl  # noqa: E402
from ckptcore.plugins.registrations import ArrayFormatRegistration  # noqa: E402

ME = jax.process_index()

# -- the state every scenario saves (the same on every process) --------------------------

GLOBAL = {
    "w": np.arange(32 * 16, dtype=np.float32).reshape(32, 16) / 7,  # P("data", "model")
    "b": np.arange(16, dtype=np.float32) - 3,  # P("model"): replicated along "data"
    "r": np.full((4, 4), 2.5, dtype=np.float32),  # P(): replicated everywhere
    "i": np.arange(8 * 12, dtype=np.int32).reshape(8, 12),  # P(None, "model")
}
SPECS = {"w": P("data", "model"), "b": P("model"), "r": P(), "i": P(None, "model")}


def make_mesh(shape: list[int]) -> Any:
    return jax.make_mesh(tuple(shape), ("data", "model"), devices=jax.devices()[: math.prod(shape)])


def make_state(mesh: Any, *, step: int = 0) -> dict[str, Any]:
    state: dict[str, Any] = {
        name: jax.make_array_from_callback(
            value.shape, NamedSharding(mesh, SPECS[name]), lambda idx, v=value: v[idx] + step
        )
        for name, value in GLOBAL.items()
    }
    state["local"] = jax.device_put(jnp.arange(5, dtype=jnp.int32) + step, jax.local_devices()[0])
    state["host"] = np.arange(10, dtype=np.int64) + step
    state["step"] = step
    state["name"] = "run-1"
    return state


def make_target(mesh: Any) -> dict[str, Any]:
    target: dict[str, Any] = {
        name: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, SPECS[name]))
        for name, value in GLOBAL.items()
    }
    target["local"] = jax.ShapeDtypeStruct((5,), jnp.int32, sharding=SingleDeviceSharding(jax.local_devices()[0]))
    target["host"] = np.zeros(10, np.int64)
    target["step"] = 0
    target["name"] = ""
    return target


def check_state(restored: dict[str, Any], mesh: Any, *, step: int = 0) -> int:
    """Compare every addressable shard with the expected data; return the number checked."""
    checked = 0
    for name, value in GLOBAL.items():
        array = restored[name]
        assert array.sharding == NamedSharding(mesh, SPECS[name]), (name, array.sharding)
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index] + step, err_msg=name)
            checked += 1
    np.testing.assert_array_equal(np.asarray(restored["local"]), np.arange(5) + step)
    np.testing.assert_array_equal(restored["host"], np.arange(10) + step)
    assert restored["step"] == step and restored["name"] == "run-1", (restored["step"], restored["name"])
    return checked


# -- a format that counts what is read and can misbehave on purpose ------------------------


class CountingFormat:
    """The real TensorStore ocdbt format, counting bytes read; optionally dies while writing."""

    def __init__(self) -> None:
        from ckptcore_zarr3.tensorstore_format import TensorStoreFormat

        self.real = TensorStoreFormat(ocdbt=True)
        self.bytes_read = 0
        self.die_in_write = False
        self.fail_in_write = False

    def write(self, location: Any, requests: Any, options: Any) -> Any:
        infos = self.real.write(location, requests, options)
        if self.die_in_write:
            os.kill(os.getpid(), 9)  # a crash in the middle of a save: no cleanup, no message
        if self.fail_in_write:
            raise OSError(f"disk full on process {ME} (injected)")
        return infos

    def read(self, location: Any, requests: Any, options: Any) -> Any:
        results = self.real.read(location, requests, options)
        self.bytes_read += sum(a.nbytes for arrays in results for a in arrays)
        return results


class CountingPlugin:
    def __init__(self, fmt: CountingFormat) -> None:
        self.fmt = fmt

    @hookimpl
    def ckptcore_array_formats(self) -> list[ArrayFormatRegistration]:
        return [ArrayFormatRegistration(name="counted", format=self.fmt, version=1)]


COUNTING = CountingFormat()
ckptcore.register_plugin(CountingPlugin(COUNTING), name="counting-format")


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# -- scenarios -------------------------------------------------------------------------------


def scenario_save_restore() -> None:
    """Save on this job's mesh, restore onto the same and onto a transposed mesh, check bytes."""
    root = CONFIG["dir"]
    mesh = make_mesh(CONFIG["mesh"])
    state = make_state(mesh)
    for fmt in CONFIG.get("formats", ["ocdbt"]):
        path = f"{root}/{fmt}"
        start = time.perf_counter()
        ckptcore.save(path, state, format=fmt)
        RESULT[f"save_s_{fmt}"] = time.perf_counter() - start
        # Visible to every process as soon as save returns.
        assert os.path.exists(f"{path}/ckptcore_index.json")
        RESULT[f"checked_{fmt}"] = check_state(ckptcore.restore(path, make_target(mesh)), mesh)
        other = make_mesh(CONFIG["mesh"][::-1])
        RESULT[f"checked_other_{fmt}"] = check_state(ckptcore.restore(path, make_target(other)), other)
    # Errors: an existing checkpoint is refused on every process, and stays intact.
    try:
        ckptcore.save(f"{root}/{CONFIG.get('formats', ['ocdbt'])[0]}", state)
        RESULT["exists_error"] = None
    except ckptcore.CheckpointError as exc:
        RESULT["exists_error"] = type(exc).__name__ + ": " + str(exc)
    # A process whose tree differs: every process fails, nothing is committed.
    odd = dict(state)
    if ME == CONFIG["processes"] - 1:
        odd["extra"] = np.zeros(3)
    try:
        ckptcore.save(f"{root}/mismatch", odd)
        RESULT["mismatch_error"] = None
    except ckptcore.CheckpointError as exc:
        RESULT["mismatch_error"] = type(exc).__name__ + ": " + str(exc)
    # An injected write failure on the last process: an error everywhere, nothing committed.
    COUNTING.fail_in_write = ME == CONFIG["processes"] - 1
    try:
        ckptcore.save(f"{root}/failed", state, format="counted")
        RESULT["failure_error"] = None
    except ckptcore.CheckpointError as exc:
        RESULT["failure_error"] = type(exc).__name__ + ": " + str(exc)
    COUNTING.fail_in_write = False
    # Coordination cost: a tiny state's save, several times (median reported).
    tiny = {"x": np.arange(4, dtype=np.float32)}
    times = []
    for k in range(5):
        start = time.perf_counter()
        ckptcore.save(f"{root}/tiny_{k}", tiny)
        times.append(time.perf_counter() - start)
    RESULT["tiny_save_s"] = sorted(times)[len(times) // 2]


def scenario_actions() -> None:
    """``actions``: ["save", path, step, format] or ["restore", path, step], on this job's mesh."""
    mesh = make_mesh(CONFIG["mesh"])
    for action in CONFIG["actions"]:
        if action[0] == "save":
            ckptcore.save(action[1], make_state(mesh, step=action[2]), format=action[3])
        else:
            restored = ckptcore.restore(action[1], make_target(mesh))
            RESULT.setdefault("checked", []).append(check_state(restored, mesh, step=action[2]))
    if "subset" in CONFIG:
        scenario_subset()


def scenario_single_replica() -> None:
    """Replicas along "data": single-replica restore reads each array once in the whole job."""
    mesh = make_mesh(CONFIG["mesh"])
    path = f"{CONFIG['dir']}/replicated"
    ckptcore.save(path, make_state(mesh), format="counted")
    COUNTING.bytes_read = 0
    check_state(ckptcore.restore(path, make_target(mesh)), mesh)
    RESULT["bytes_read_plain"] = COUNTING.bytes_read
    COUNTING.bytes_read = 0
    with ckptcore.multiprocess_options(single_replica_restore=True):
        restored = ckptcore.restore(path, make_target(mesh))
    RESULT["bytes_read_single"] = COUNTING.bytes_read
    RESULT["checked_single"] = check_state(restored, mesh)
    # The same with shardings that name no mesh axes (what jit outputs may carry).
    from jax._src.sharding_impls import GSPMDSharding

    target = make_target(mesh)
    for name, value in GLOBAL.items():
        named = NamedSharding(mesh, SPECS[name])
        sharding = GSPMDSharding(tuple(mesh.devices.flat), named._to_xla_hlo_sharding(value.ndim))
        target[name] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
    for single in (False, True):
        COUNTING.bytes_read = 0
        with ckptcore.multiprocess_options(single_replica_restore=single):
            restored = ckptcore.restore(path, target)
        RESULT[f"bytes_read_gspmd_{single}"] = COUNTING.bytes_read
        checked = 0
        for name, value in GLOBAL.items():
            assert restored[name].sharding.is_equivalent_to(target[name].sharding, value.ndim), name
            for shard in restored[name].addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index], err_msg=name)
                checked += 1
        RESULT[f"checked_gspmd_{single}"] = checked


REPLICATED = {  # large enough to be split among the holders (multiwriter.SPLIT_MIN_BLOCK_BYTES)
    "rep": (np.arange(1024 * 1024, dtype=np.float32).reshape(1024, 1024) / 3, P()),  # every process
    "half": (np.arange(512 * 2048, dtype=np.float32).reshape(512, 2048) - 7, P(None, "model")),  # along "data"
    "odd": (np.arange(1001 * 1100, dtype=np.float32).reshape(1001, 1100), P()),  # 4.2 MiB, rows not divisible
}


def scenario_replica_parallel() -> None:
    """Replicated arrays and NumPy leaves of several MiB: each holder writes a row block of them."""
    mesh = make_mesh(CONFIG["mesh"])
    state: dict[str, Any] = {
        name: jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec), lambda idx, v=value: v[idx])
        for name, (value, spec) in REPLICATED.items()
    }
    state["host"] = np.arange(1024 * 1024, dtype=np.int32).reshape(1024, 1024)  # 4 MiB on every process
    state["small"] = jax.make_array_from_callback((8, 8), NamedSharding(mesh, P()), lambda idx: np.ones((8, 8))[idx])
    for fmt in CONFIG["formats"]:
        path = f"{CONFIG['dir']}/{fmt}"
        ckptcore.save(path, state, format=fmt)
        RESULT.setdefault("bytes", {})[fmt] = dir_bytes(f"{path}/{fmt}/process_{ME}")
        for shape in (CONFIG["mesh"], CONFIG["mesh"][::-1]):
            other = make_mesh(shape)
            target = {
                name: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(other, spec))
                for name, (value, spec) in REPLICATED.items()
            }
            target["host"] = np.zeros((1024, 1024), np.int32)
            target["small"] = jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(other, P()))
            restored = ckptcore.restore(path, target)
            for name, (value, _) in REPLICATED.items():
                for shard in restored[name].addressable_shards:
                    np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index], err_msg=name)
            np.testing.assert_array_equal(restored["host"], state["host"])
            np.testing.assert_array_equal(np.asarray(restored["small"].addressable_shards[0].data), np.ones((8, 8)))
    RESULT["checked"] = True


def scenario_kill() -> None:
    """The process ``victim`` dies inside its write; the others must fail, not hang."""
    COUNTING.die_in_write = ME == CONFIG["victim"]
    mesh = make_mesh(CONFIG["mesh"])
    with ckptcore.multiprocess_options(timeout_s=CONFIG["timeout_s"]):
        ckptcore.save(CONFIG["path"], make_state(mesh), format="counted")
    RESULT["saved"] = True


def scenario_subset() -> None:
    """Only the processes ``subset`` take part (primary: the last); arrays live on their devices."""
    active = CONFIG["subset"]
    if ME not in active:
        RESULT["skipped"] = True
        return
    devices = [d for d in jax.devices() if d.process_index in active]
    mesh = jax.make_mesh((len(active), len(devices) // len(active)), ("data", "model"), devices=devices)
    path = f"{CONFIG['dir']}/subset"
    with ckptcore.multiprocess_options(processes=active, primary=active[-1]):
        ckptcore.save(path, make_state(mesh, step=5))
        RESULT["subset_checked"] = check_state(ckptcore.restore(path, make_target(mesh)), mesh, step=5)


def scenario_tiny() -> None:
    """Coordination cost: the median save time of a 16-byte state, and of one KV round trip."""
    from jax._src import distributed as jd

    tiny = {"x": np.arange(4, dtype=np.float32)}
    times = []
    for k in range(CONFIG.get("repeats", 15)):
        start = time.perf_counter()
        ckptcore.save(f"{CONFIG['dir']}/tiny_{k}", tiny, format=CONFIG.get("format"))
        times.append(time.perf_counter() - start)
    RESULT["tiny_save_s"] = sorted(times)[len(times) // 2]
    client = jd.global_state.client
    start = time.perf_counter()
    for k in range(20):
        client.wait_at_barrier(f"rt{k}", 10_000)
    RESULT["barrier_s"] = (time.perf_counter() - start) / 20


def scenario_manager() -> None:
    """A CheckpointManager on every process: agreed decisions, retention by the primary, errors everywhere."""
    mesh = make_mesh(CONFIG["mesh"])
    options = ckptcore.CheckpointManagerOptions(
        max_to_keep=2, save_interval_steps=2, enable_async_checkpointing=CONFIG.get("async", False)
    )
    root = f"{CONFIG['dir']}/run"
    with ckptcore.multiprocess_options(timeout_s=20), ckptcore.CheckpointManager(root, options) as mgr:
        saved = []
        for step in range(7):
            if mgr.save(step, make_state(mesh, step=step), metrics={"loss": 1.0 / (step + 1)}):
                saved.append(step)
        mgr.wait_until_finished()
        RESULT["saved"] = saved
        RESULT["all_steps"] = mgr.all_steps()
        RESULT["latest"] = mgr.latest_step()
        RESULT["checked"] = check_state(mgr.restore(None, make_target(mesh)), mesh, step=6)
        # A bad leaf on the last process only: every process's save fails (no hang), nothing commits.
        state = make_state(mesh, step=8)
        if ME == CONFIG["processes"] - 1:
            state["bad"] = object()
        try:
            mgr.save(8, state)
            mgr.wait_until_finished()
            RESULT["bad_error"] = None
        except ckptcore.CheckpointError as exc:
            RESULT["bad_error"] = f"{type(exc).__name__}: {exc}"
        RESULT["steps_after_bad"] = mgr.all_steps()
        mgr.delete(4)
        RESULT["steps_after_delete"] = mgr.all_steps()
    RESULT["on_disk"] = sorted(n for n in os.listdir(root) if not n.startswith("."))


def scenario_manager_listing() -> None:
    """Count the directory listings (fsspec ``ls``) and stats of every process around a manager's life.

    Only the primary may list: the others get its listing (steps, metrics, root file) through
    the coordinator.
    """
    import fsspec.implementations.local as local

    root = f"{CONFIG['dir']}/run"
    counts = {"ls": 0, "info": 0}
    real_ls, real_info = local.LocalFileSystem.ls, local.LocalFileSystem.info

    def counted_ls(self: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).startswith(root):
            counts["ls"] += 1
        return real_ls(self, path, *args, **kwargs)

    def counted_info(self: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).startswith(root):
            counts["info"] += 1
        return real_info(self, path, *args, **kwargs)

    local.LocalFileSystem.ls = counted_ls  # type: ignore[method-assign]
    local.LocalFileSystem.info = counted_info  # type: ignore[method-assign]
    mesh = make_mesh(CONFIG["mesh"])
    options = ckptcore.CheckpointManagerOptions(
        max_to_keep=2, enable_async_checkpointing=False, best_fn=lambda m: m["loss"], best_mode="min"
    )
    with ckptcore.multiprocess_options(timeout_s=30):
        with ckptcore.CheckpointManager(root, options, metadata={"run": 1}) as mgr:
            for step in range(4):
                mgr.save(step, make_state(mesh, step=step), metrics={"loss": 10.0 - step})
        counts_first = dict(counts)
        # A second manager on the same directory (a resumed run): steps and metrics come from the primary.
        with ckptcore.CheckpointManager(root, options) as mgr:
            RESULT["steps"] = mgr.all_steps()
            RESULT["metrics"] = [mgr.metrics(s) for s in mgr.all_steps()]
            RESULT["best"] = mgr.best_step()
            RESULT["root_metadata"] = mgr.metadata()
            mgr.reload()
            RESULT["steps_after_reload"] = mgr.all_steps()
            RESULT["checked"] = check_state(mgr.restore(mgr.latest_step(), make_target(mesh)), mesh, step=3)
    RESULT["ls_first"], RESULT["info_first"] = counts_first["ls"], counts_first["info"]
    RESULT["ls"], RESULT["info"] = counts["ls"], counts["info"]


def scenario_preemption() -> None:
    """The last process gets SIGTERM at step 3; every process must stop at the same step."""
    import signal

    mgr = ckptcore.CheckpointManager(f"{CONFIG['dir']}/run", ckptcore.CheckpointManagerOptions(save_interval_steps=100))
    preemption.install_preemption_handler()
    RESULT["sync_manager"] = preemption.sync_manager() is not None
    stop = None
    for step in range(60):
        if step == 3 and ME == CONFIG["processes"] - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        if mgr.reached_preemption(step):
            mgr.save(step, {"step": np.int64(step)}, force=True)
            stop = step
            break
        time.sleep(0.02 * (ME + 1))  # processes run at different speeds
    mgr.close()
    RESULT["stopped_at"] = stop
    RESULT["steps"] = ckptcore.CheckpointManager(
        f"{CONFIG['dir']}/run", ckptcore.CheckpointManagerOptions(read_only=True)
    ).all_steps()


def main() -> None:
    try:
        globals()[f"scenario_{CONFIG['scenario']}"]()
    except BaseException as exc:
        RESULT["error"] = f"{type(exc).__name__}: {exc}"
        RESULT["error_type"] = type(exc).__name__
        RESULT["is_checkpoint_error"] = isinstance(exc, ckptcore.CheckpointError)
        RESULT["traceback"] = traceback.format_exc()
        emit(1)
    emit(0)


if __name__ == "__main__":
    main()
