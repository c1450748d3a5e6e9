"""ckptcore's ``safetensors`` format vs ckptcore ``ocdbt`` vs orbax-checkpoint vs NumPy, side by side in one process.

Run:  python benchmarks/bench_safetensors.py [--size-mb 1024] [--repeats 3] [--dir DIR] [--only numpy,jax,small]

Workloads (the same data for every implementation):

* ``numpy``: ``--size-mb`` MiB as 8 float32 arrays (8 x 128 MiB by default). Save until
  durable (every library fsyncs; ``np.save`` + ``fsync`` per file is the limit), restore
  with a cold page cache (dropped first, when permitted) and warm (right after the cold
  restore), and the peak RSS a restore adds, in a fresh process per implementation.
* ``jax``: the same size as 8 arrays of shape (rows, 4096), sharded over a (4, 2) mesh of
  8 host devices, saved, then restored (warm) onto a (2, 4) mesh: a resharding restore.
* ``small``: 5,000 float32 arrays of 1,024 elements: save and restore (warm).
* ``cloud`` (only with ``--only cloud``): the NumPy state saved to and restored from
  fake-gcs-server (``gs://``) and moto_server (``s3://``) on 127.0.0.1 (needs
  ckptcore-testing and the gcs/s3 plugins): safetensors vs ocdbt, with the CPU seconds
  each operation cost this process and the emulator (which side bounds it).

Implementations alternate within each repetition (the order rotates), the first
repetition is a discarded warm-up, and the tables show medians with the range (min-max)
of the measured repetitions. The disk's throughput swings between runs: compare within
one run.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
from pagecache import drop_page_cache  # a sibling module: the scripts run from benchmarks/

MiB = 1 << 20
TINY = {"a": np.zeros(16, np.float32), "b": {"c": np.ones(1000, np.float32)}}


def fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flat(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        out = []
        for k, v in tree.items():
            out += _flat(v, f"{prefix}{k}.")
        return out
    return [(prefix.rstrip("."), tree)]


# -- implementations --------------------------------------------------------------------------


class Impl:
    name = ""

    def save(self, path: str, state: Any) -> None:
        raise NotImplementedError

    def restore(self, path: str, target: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Ckptcore(Impl):
    def __init__(self, fmt: str) -> None:
        import ckptcore

        self.ckptcore = ckptcore
        self.format = fmt
        self.name = f"ckptcore {fmt}"

    def save(self, path: str, state: Any) -> None:
        self.ckptcore.save(path, state, format=self.format)

    def restore(self, path: str, target: Any) -> Any:
        if target is not None and all(isinstance(v, np.ndarray) for _, v in _flat(target)):
            target = None  # a NumPy state restores as saved: no target needed
        return self.ckptcore.restore(path, target=target)


class Orbax(Impl):
    name = "orbax StandardCheckpointer"

    def __init__(self) -> None:
        import orbax.checkpoint as ocp

        self.ckptr = ocp.StandardCheckpointer()

    def save(self, path: str, state: Any) -> None:
        self.ckptr.save(path, state)
        self.ckptr.wait_until_finished()  # durable: finalized (fsynced, renamed)

    def restore(self, path: str, target: Any) -> Any:
        return self.ckptr.restore(path, target)

    def close(self) -> None:
        self.ckptr.close()


class NumpyFiles(Impl):
    """One ``np.save`` file per leaf, each fsynced, then the directory: the limit."""

    name = "np.save+fsync / np.load"

    def save(self, path: str, state: Any) -> None:
        os.makedirs(path)
        for name, array in _flat(state):
            with open(os.path.join(path, f"{name}.npy"), "wb") as f:
                np.save(f, array)
                f.flush()
                os.fsync(f.fileno())
        fsync_path(path, directory=True)

    def restore(self, path: str, target: Any) -> Any:
        return {name: np.load(os.path.join(path, f"{name}.npy")) for name, _ in _flat(target)}


class NumpyOneFile(NumpyFiles):
    """All leaves in one ``np.savez`` file, fsynced: the limit for many small leaves."""

    name = "np.savez+fsync / np.load"

    def save(self, path: str, state: Any) -> None:
        os.makedirs(path)
        with open(os.path.join(path, "state.npz"), "wb") as f:
            np.savez(f, **dict(_flat(state)))
            f.flush()
            os.fsync(f.fileno())
        fsync_path(path, directory=True)

    def restore(self, path: str, target: Any) -> Any:
        with np.load(os.path.join(path, "state.npz")) as z:
            return {name: z[name] for name in z.files}


def make_impl(name: str) -> Impl:
    return {"safetensors": lambda: Ckptcore("safetensors"), "ocdbt": lambda: Ckptcore("ocdbt"),
            "orbax": Orbax, "numpy": NumpyFiles, "npz": NumpyOneFile}[name]()


def _same(a: Any, b: Any) -> bool:
    fa, fb = dict(_flat(a)), dict(_flat(b))
    return fa.keys() == fb.keys() and all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


def _block(tree: Any) -> Any:
    for _, leaf in _flat(tree):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return tree


# -- states ---------------------------------------------------------------------------------------


def numpy_state(size_mb: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = size_mb * MiB // 4 // 8
    return {f"w{i}": rng.standard_normal(n, dtype=np.float32) for i in range(8)}


def small_state() -> dict[str, Any]:
    rng = np.random.default_rng(1)
    state: dict[str, Any] = {}
    for i in range(5000):
        layer = state.setdefault(f"layer{i // 100}", {}).setdefault(f"block{(i // 10) % 10}", {})
        layer[f"p{i % 10}"] = rng.standard_normal(1024, dtype=np.float32)
    return state


def _sharding(mesh_shape: tuple[int, int]) -> Any:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    return NamedSharding(jax.make_mesh(mesh_shape, ("data", "model")), P("data", "model"))


def jax_shapes(size_mb: int) -> dict[str, tuple[int, int]]:
    rows = max(8, size_mb * MiB // 8 // 4 // 4096)
    return {f"layer{i}": (rows, 4096) for i in range(8)}


def jax_state(size_mb: int) -> dict[str, Any]:
    import jax

    s = _sharding((4, 2))
    out = {}
    for i, (name, shape) in enumerate(jax_shapes(size_mb).items()):
        out[name] = jax.jit(lambda k, shape=shape: jax.random.normal(k, shape, "float32"), out_shardings=s)(jax.random.key(i))
    return _block(out)


def jax_target(size_mb: int, mesh_shape: tuple[int, int]) -> dict[str, Any]:
    import jax

    s = _sharding(mesh_shape)
    return {name: jax.ShapeDtypeStruct(shape, np.float32, sharding=s) for name, shape in jax_shapes(size_mb).items()}


# -- measuring -----------------------------------------------------------------------------------


def run(label: str, state: Any, target: Any, impls: list[Impl], root: str, repeats: int,
        restores: dict[str, bool]) -> dict[str, dict[str, list[float]]]:
    """``{impl: {"save": [...], <restore kind>: [...]}}`` in seconds, warm-up excluded.

    ``restores`` maps a restore column to whether the page cache is dropped before it; a
    column that does not drop it reads what the columns before it left in the cache.
    """
    times: dict[str, dict[str, list[float]]] = {i.name: {"save": [], **{k: [] for k in restores}} for i in impls}
    cold = any(restores.values())
    # After the page cache is dropped a tiny restore reloads the libraries' code pages, so
    # a cold restore measures reading the data, as in a long-running process.
    warm_paths = {i.name: os.path.join(root, f"{label}-tiny-{k}") for k, i in enumerate(impls)}
    if cold:
        for impl in impls:
            impl.save(warm_paths[impl.name], TINY)
    for rep in range(repeats + 1):
        order = impls[rep % len(impls):] + impls[: rep % len(impls)]
        paths = {}
        for impl in order:
            path = os.path.join(root, f"{label}-{rep}-{impls.index(impl)}")
            gc.collect()
            t = time.perf_counter()
            impl.save(path, state)
            elapsed = time.perf_counter() - t
            paths[impl.name] = path
            if rep:
                times[impl.name]["save"].append(elapsed)
        # Each implementation's restores run back to back (cold, then warm): a page-cache drop
        # for the next implementation's cold restore would empty the cache a warm one needs.
        for impl in order:
            for kind, drop in restores.items():
                if drop:
                    drop_page_cache()
                    impl.restore(warm_paths[impl.name], TINY)
                gc.collect()
                t = time.perf_counter()
                restored = _block(impl.restore(paths[impl.name], target))
                elapsed = time.perf_counter() - t
                if rep == 0 and not _same(state, restored):
                    raise SystemExit(f"{impl.name} restored different data for {label}")
                del restored
                if rep:
                    times[impl.name][kind].append(elapsed)
        for path in paths.values():
            shutil.rmtree(path, ignore_errors=True)
        print(f"  {label}: repetition {rep}{' (warm-up)' if rep == 0 else ''}: " + ", ".join(
            f"{n} " + "/".join(f"{v[-1]:.3f}" for v in t.values()) for n, t in times.items() if rep), file=sys.stderr, flush=True)
    for path in warm_paths.values():
        shutil.rmtree(path, ignore_errors=True)
    return times


def peak_rss_kib() -> int:
    """This process's high-water RSS (``VmHWM``; ``ru_maxrss`` would carry a parent's peak over exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def rss_child(impl_name: str, path: str, size_mb: int) -> None:
    """In a fresh process: the peak RSS a restore of the numpy state adds, in bytes."""
    impl = make_impl(impl_name)
    n = size_mb * MiB // 4 // 8
    target: Any = {f"w{i}": None for i in range(8)}  # np.load needs only the names; ckptcore nothing
    if impl_name == "orbax":  # orbax wants a target; abstract arrays add no memory
        import jax

        target = {f"w{i}": jax.ShapeDtypeStruct((n,), np.float32) for i in range(8)}
    elif isinstance(impl, Ckptcore):
        target = None
    gc.collect()
    with tempfile.TemporaryDirectory() as tmp:
        impl.save(os.path.join(tmp, "tiny"), TINY)
        impl.restore(os.path.join(tmp, "tiny"), TINY)
    before = peak_rss_kib()
    restored = impl.restore(path, target)
    after = peak_rss_kib()
    del restored
    print(json.dumps({"peak_bytes": (after - before) * 1024}))


def peak_rss(impl_name: str, path: str, size_mb: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--rss-child", impl_name, path, str(size_mb)],
                         capture_output=True, text=True, check=True, env=os.environ.copy())
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


def _fmt(values: list[float], nbytes: int | None = None) -> str:
    m = statistics.median(values)
    text = f"{m:.3f} s ({min(values):.3f}-{max(values):.3f})"
    if nbytes:
        text += f" {nbytes / m / 1e9:.2f} GB/s"
    return text


def table(title: str, nbytes: int, times: dict[str, dict[str, list[float]]], ours: str, refs: list[str]) -> None:
    columns = list(next(iter(times.values())))
    print(f"\n### {title} ({nbytes / MiB:.0f} MiB; median (min-max) of {len(times[ours]['save'])})\n")
    print("| implementation | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, t in times.items():
        print(f"| {name} | " + " | ".join(_fmt(t[c], nbytes) for c in columns) + " |")
    for ref in refs:
        if ref in times and ref != ours:
            ratios = [statistics.median(times[ref][c]) / statistics.median(times[ours][c]) for c in columns]
            print(f"| {ours} speed / {ref} | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its children (Linux ``/proc``; 0 elsewhere)."""
    try:
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
        total = 0.0
        for p in [pid, *map(int, children)]:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total
    except OSError:
        return 0.0


def cloud_workload(size_mb: int, repeats: int, root: str) -> None:
    """safetensors vs ocdbt on the object-store emulators, alternating, warm-up discarded."""
    import boto3
    from ckptcore_testing import servers

    import ckptcore
    from ckptcore import storage

    gcs, s3 = servers.start_fake_gcs(), servers.start_moto()
    try:
        for key, value in {**servers.gcs_env(gcs.endpoint), **servers.s3_env(s3.endpoint)}.items():
            os.environ[key] = value
        servers.create_gcs_bucket(gcs.endpoint, "bench")
        boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        state = numpy_state(size_mb)
        nbytes = sum(a.nbytes for a in state.values())
        for scheme in ("gs", "s3"):
            times: dict[str, dict[str, list[float]]] = {f: {"save": [], "restore": []} for f in ("safetensors", "ocdbt")}
            # CPU seconds of this process and of the emulator per operation: which side bounds it.
            cpu: dict[tuple[str, str], list[tuple[float, float]]] = {}
            server = gcs if scheme == "gs" else s3
            for rep in range(repeats + 1):
                for fmt in (("safetensors", "ocdbt") if rep % 2 == 0 else ("ocdbt", "safetensors")):
                    url = f"{scheme}://bench/{fmt}-{rep}"
                    before = (_own_cpu(), _process_cpu(server.process.pid))
                    t = time.perf_counter()
                    ckptcore.save(url, state, format=fmt)
                    saved = time.perf_counter() - t
                    middle = (_own_cpu(), _process_cpu(server.process.pid))
                    t = time.perf_counter()
                    restored = ckptcore.restore(url)
                    elapsed = time.perf_counter() - t
                    after = (_own_cpu(), _process_cpu(server.process.pid))
                    if rep == 0 and not _same(state, restored):
                        raise SystemExit(f"{fmt} on {scheme}:// restored different data")
                    del restored
                    where = storage.resolve(url)  # the emulators keep objects in memory: 1 GiB each
                    where.fs.rm(where.path, recursive=True)
                    if rep:
                        times[fmt]["save"].append(saved)
                        times[fmt]["restore"].append(elapsed)
                        cpu.setdefault((fmt, "save"), []).append((middle[0] - before[0], middle[1] - before[1]))
                        cpu.setdefault((fmt, "restore"), []).append((after[0] - middle[0], after[1] - middle[1]))
            named = {f"ckptcore {f} ({scheme}://)": t for f, t in times.items()}
            table(f"NumPy state on the {scheme}:// emulator", nbytes, named, f"ckptcore safetensors ({scheme}://)",
                  list(named))
            print(f"\nCPU seconds (medians), this process / the emulator ({server.name}):\n")
            print("| implementation | save | restore |\n|---|---:|---:|")
            for fmt in times:
                cells = [" / ".join(f"{statistics.median(x[i] for x in cpu[(fmt, op)]):.2f}" for i in (0, 1))
                         for op in ("save", "restore")]
                print(f"| ckptcore {fmt} ({scheme}://) | " + " | ".join(cells) + " |")
    finally:
        gcs.stop()
        s3.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the big states (MiB)")
    parser.add_argument("--repeats", type=int, default=3, help="measured repetitions (after one warm-up)")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--only", default="numpy,jax,small", help="comma-separated workloads (numpy, jax, small, cloud)")
    parser.add_argument("--no-orbax", action="store_true")
    parser.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], args.rss_child[1], int(args.rss_child[2]))
        return
    only = set(args.only.split(","))
    root = tempfile.mkdtemp(prefix="bench-safetensors-", dir=args.dir)
    cold = drop_page_cache()
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPUs, dir {root}")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    if not cold:
        print("WARNING: cannot drop the page cache (not root?): 'cold' restores are warm")
    names = ["safetensors", "ocdbt", *([] if args.no_orbax else ["orbax"])]
    impls = {n: make_impl(n) for n in names}
    ours, refs = impls["safetensors"].name, [i.name for i in impls.values()]
    try:
        if "numpy" in only:
            state = numpy_state(args.size_mb)
            nbytes = sum(a.nbytes for a in state.values())
            limit = NumpyFiles()
            times = run("numpy", state, state, [*impls.values(), limit], root, args.repeats,
                        {"restore cold": cold, "restore warm": False})
            # ckptcore restores a NumPy state without a target; orbax gets the state as its target.
            table("NumPy state, 8 float32 arrays", nbytes, times, ours, [*refs, limit.name])
            rss = {}
            for key, impl in [*impls.items(), ("numpy", limit)]:
                path = os.path.join(root, f"rss-{key}")
                impl.save(path, state)
                rss[impl.name] = peak_rss(key, path, args.size_mb)
                shutil.rmtree(path, ignore_errors=True)
            print("\n| implementation | peak restore RSS added / state |\n|---|---:|")
            for name, b in rss.items():
                print(f"| {name} | {b / nbytes:.2f}x ({b / MiB:.0f} MiB) |")
            del state
        if "jax" in only:
            import jax

            assert len(jax.devices()) >= 8, "needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8"
            state = jax_state(args.size_mb)
            target = jax_target(args.size_mb, (2, 4))
            nbytes = sum(int(x.nbytes) for x in state.values())
            times = run("jax", state, target, list(impls.values()), root, args.repeats,
                        {"restore (2,4) cold": cold, "restore (2,4) warm": False})
            table("jax.Array, saved on a (4, 2) mesh, restored onto (2, 4)", nbytes, times, ours, refs)
            del state
        if "small" in only:
            state = small_state()
            nbytes = sum(a.nbytes for _, a in _flat(state))
            limit = NumpyOneFile()
            times = run("small", state, state, [*impls.values(), limit], root, args.repeats, {"restore warm": False})
            table("5,000 float32 arrays of 1,024 elements", nbytes, times, ours, [*refs, limit.name])
        if "cloud" in only:
            cloud_workload(args.size_mb, args.repeats, root)
        for impl in impls.values():
            impl.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
