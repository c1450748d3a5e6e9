"""Write the ckptcore 0.1.0 compatibility fixtures beside this file (see README.md).

Run with the 0.1.0 code first on the path (a worktree of the 0.1.0 commit), e.g.::

    git worktree add /tmp/wt-v010 <0.1.0 commit>
    W=/tmp/wt-v010
    PYTHONPATH=$W:$W/plugins/posix/src:$W/plugins/zarr3/src:$W/plugins/gcs/src:$W/plugins/s3/src \\
        .venv/bin/python tests/data/v0_1_0/make_fixtures.py

It replaces numpy/, zarr3/, jax_sharded/, multiprocess/, manager_root/, object_store/ and
README.md here. Values come from the formulas in expected.py; only public ckptcore API is
used (plus ckptcore.testing.servers for moto_server). It never contacts anything but 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MP_WORKER = "--multiprocess-worker"

if len(sys.argv) > 1 and sys.argv[1] == MP_WORKER:
    os.environ.pop("XLA_FLAGS", None)
else:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
for _k, _v in {
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(_k, _v)

import expected  # noqa: E402

FIXTURES = ("numpy", "zarr3", "jax_sharded", "multiprocess", "manager_root", "object_store")
BUCKET = "ckptcore-v010-fixtures"
OBJECT_PREFIX = "run/ckpt"


def fresh(name: str) -> Path:
    path = HERE / name
    if path.exists():
        shutil.rmtree(path)
    return path


def check_code() -> str:
    """Insist on ckptcore 0.1.0 from a clean git checkout; return its commit hash."""
    import ckptcore_zarr3

    import ckptcore

    assert ckptcore.__version__ == "0.1.0", ckptcore.__version__
    root = Path(ckptcore.__file__).resolve().parent.parent
    assert Path(ckptcore_zarr3.__file__).resolve().is_relative_to(root), (ckptcore.__file__, ckptcore_zarr3.__file__)
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "ckptcore", "plugins"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert not dirty, f"the ckptcore checkout at {root} has local changes:\n{dirty}"
    print(f"ckptcore {ckptcore.__version__} from {root} at {commit}")
    return commit


# -- one process -----------------------------------------------------------------------------


def make_numpy() -> None:
    import ckptcore

    ckptcore.save(fresh("numpy"), expected.numpy_tree(), metadata={"fixture": "numpy"})


def make_zarr3() -> None:
    import ckptcore

    ckptcore.save(fresh("zarr3"), expected.zarr3_tree(), format="zarr3")


def make_jax_sharded() -> None:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import ckptcore

    assert len(jax.devices()) == 8, jax.devices()
    mesh = jax.make_mesh(expected.SHARDED_MESH, expected.MESH_AXES)
    state = {
        "w": jax.device_put(expected.sharded_w(), NamedSharding(mesh, P("data", "model"))),
        "half": jax.device_put(expected.sharded_half(), NamedSharding(mesh, P("data", None))),
        "replicated": jax.device_put(expected.sharded_replicated(), NamedSharding(mesh, P())),
        "key": expected.prng_key(jax),
        "step": 5,
    }
    ckptcore.save(fresh("jax_sharded"), state)


def make_manager_root() -> None:
    import ckptcore

    root = fresh("manager_root")
    opts = ckptcore.CheckpointManagerOptions(max_to_keep=1000)
    with ckptcore.CheckpointManager(root, opts, metadata=expected.MANAGER_METADATA) as mgr:
        for step in expected.MANAGER_STEPS:
            item = expected.manager_item(step)
            if step == expected.MANAGER_COMPOSITE_STEP:
                state = ckptcore.Composite(state=item["state"], meta=ckptcore.Json(item["meta"]))
            else:
                state = item
            assert mgr.save(step, state, metrics=expected.manager_metrics(step))
            mgr.wait_until_finished()
        assert mgr.all_steps() == list(expected.MANAGER_STEPS), mgr.all_steps()


# -- two jax.distributed processes ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def multiprocess_worker(process_id: int, port: int, path: str, done_dir: str) -> None:
    """One of the two processes: 4 CPU devices, a (4, 2) mesh over all 8, save the state."""
    import jax

    jax.config.update("jax_num_cpu_devices", expected.MP_DEVICES_PER_PROCESS)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=expected.MP_PROCESSES,
                               process_id=process_id, initialization_timeout=60, heartbeat_timeout_seconds=60)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import ckptcore

    code = 1
    try:
        assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
        mesh = jax.make_mesh(expected.MP_MESH, expected.MESH_AXES, devices=jax.devices())
        state = {}
        for name, value, spec in (("w", expected.mp_w(), P("data", "model")), ("b", expected.mp_b(), P("model")),
                                  ("r", expected.mp_r(), P())):
            state[name] = jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec),
                                                       lambda idx, v=value: v[idx])
        state["host"] = expected.mp_host()
        state["step"] = 2
        ckptcore.save(path, state)
        assert os.path.exists(f"{path}/ckptcore_index.json")
        code = 0
    except BaseException:
        import traceback

        traceback.print_exc()
    Path(done_dir, f"done-{process_id}-{code}").write_text("")
    sys.stdout.flush()
    sys.stderr.flush()
    if process_id == 0:  # the coordinator: let the other process leave first
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not list(Path(done_dir).glob("done-1-*")):
            time.sleep(0.1)
        time.sleep(0.5)
    os._exit(code)


def make_multiprocess() -> None:
    import tempfile

    path = fresh("multiprocess")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    with tempfile.TemporaryDirectory() as done_dir:
        procs = [
            subprocess.Popen([sys.executable, str(Path(__file__).resolve()), MP_WORKER, str(i), str(port), str(path),
                              done_dir], env=env)
            for i in range(expected.MP_PROCESSES)
        ]
        try:
            for proc in procs:
                proc.wait(timeout=180)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        done = sorted(p.name for p in Path(done_dir).iterdir())
    assert done == ["done-0-0", "done-1-0"], done
    for i in range(expected.MP_PROCESSES):
        assert (path / "ocdbt" / f"process_{i}").is_dir(), sorted(p.name for p in (path / "ocdbt").iterdir())


# -- object store ---------------------------------------------------------------------------------


def make_object_store() -> None:
    from ckptcore.testing import servers

    import ckptcore

    out = fresh("object_store")
    with servers.start_moto() as server:
        os.environ.update(servers.s3_env(server.endpoint))
        os.environ["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent/ckptcore-fixtures/credentials"
        os.environ["AWS_CONFIG_FILE"] = "/nonexistent/ckptcore-fixtures/config"
        import boto3

        client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        url = f"s3://{BUCKET}/{OBJECT_PREFIX}"
        ckptcore.save(url, expected.object_store_tree())
        ckptcore.restore(url)  # committed and readable
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
        assert keys, "nothing was written to the bucket"
        for key in keys:
            assert not key.endswith("/") and ".." not in key.split("/"), key
            target = out / key
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        print("object store keys:", sorted(keys))
        assert (out / OBJECT_PREFIX / "ckptcore_commit.json").is_file(), sorted(keys)


# -- README -----------------------------------------------------------------------------------------


def write_readme(commit: str) -> None:
    import importlib.metadata as md

    versions = {name: md.version(name) for name in ("jax", "jaxlib", "tensorstore", "numpy", "ml_dtypes", "moto",
                                                     "boto3")}
    sizes = {}
    for name in FIXTURES:
        files = [p for p in (HERE / name).rglob("*") if p.is_file()]
        sizes[name] = (len(files), sum(p.stat().st_size for p in files))
    lines = [
        "# Checkpoints written by ckptcore 0.1.0",
        "",
        "Fixtures for `tests/test_compat_v0_1_0.py`: they must keep restoring exactly with every later",
        "ckptcore (same values, dtypes, shapes, container and key types). Never regenerate them with a",
        "newer ckptcore: they are the on-disk format of 0.1.0. The values come from the formulas in",
        "`expected.py` (shared with the test); `make_fixtures.py` wrote everything here.",
        "",
        "Written with:",
        "",
        f"- ckptcore 0.1.0, commit `{commit}` (core and plugins from that commit)",
        f"- Python {sys.version.split()[0]}, "
        + ", ".join(f"{name} {version}" for name, version in versions.items()),
        "",
        "| directory | what | files | bytes |",
        "| --- | --- | --- | --- |",
    ]
    what = {
        "numpy": "`ckptcore.save` of `numpy_tree()` (every leaf/container kind), default format ocdbt",
        "zarr3": "`zarr3_tree()` saved with `format=\"zarr3\"`",
        "jax_sharded": "(8, 16) float32 on a (4, 2) mesh P(\"data\", \"model\"), bfloat16 P(\"data\", None), "
                       "a replicated int32 array, `jax.random.key(0)`, an int; 8 host devices",
        "multiprocess": "2 `jax.distributed` processes x 4 CPU devices, (4, 2) mesh: `ocdbt/process_<i>/` layout",
        "manager_root": "CheckpointManager root, steps 10, 20, 30 with metrics; step 30 is "
                        "`Composite(state=..., meta=Json(...))`",
        "object_store": f"`s3://{BUCKET}/{OBJECT_PREFIX}` saved on moto_server, every object downloaded with its "
                        "key as the relative path (commit marker `ckptcore_commit.json` included)",
    }
    for name in FIXTURES:
        lines.append(f"| `{name}/` | {what[name]} | {sizes[name][0]} | {sizes[name][1]} |")
    lines += [
        "",
        "Regenerate (only if a fixture is lost; same code and versions):",
        "",
        "```bash",
        f"git worktree add /tmp/wt-v010 {commit}",
        "W=/tmp/wt-v010",
        "PYTHONPATH=$W:$W/plugins/posix/src:$W/plugins/zarr3/src:$W/plugins/gcs/src:$W/plugins/s3/src \\",
        "    .venv/bin/python tests/data/v0_1_0/make_fixtures.py",
        "```",
        "",
        "Values, dtypes, shapes and trees are deterministic; a rerun differs only in timestamps,",
        "host/pid fields, commit tokens and TensorStore's random data-file names.",
        "",
        "Nothing here is pickled.",
        "",
    ]
    (HERE / "README.md").write_text("\n".join(lines))


def main() -> None:
    commit = check_code()
    make_numpy()
    make_zarr3()
    make_jax_sharded()
    make_manager_root()
    make_multiprocess()
    make_object_store()  # last: it points the AWS variables at moto_server
    for name in FIXTURES:
        for p in (HERE / name).rglob("*"):
            assert "ckptcore-tmp" not in p.name and not p.name.endswith(".pkl"), p
    write_readme(commit)
    print((HERE / "README.md").read_text())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == MP_WORKER:
        multiprocess_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        main()
