"""Side-by-side benchmark: ckptcore vs orbax-checkpoint on sharded jax.Array states (issue 3).

One process with 8 forced host devices. Two states, both sharded over a (4, 2) mesh
("data", "model") with PartitionSpec("data", "model"):

* ``1gib``: 8 leaves of 128 MiB float32 (1 GiB);
* ``5000``: 5,000 leaves of 1,024 float32 (32 x 32) in a nested dict.

For each: save and restore throughput (restore onto the saved sharding), resharding
restore (saved on (4, 2), restored onto a (2, 4) mesh), and the peak RSS of a restore,
measured in a fresh subprocess per restore, warmed up on a tiny state (peak RSS after the
restore minus before it: ``VmHWM``, as ``ru_maxrss`` carries the parent's peak over exec). Both libraries run synchronously (orbax: ``Checkpointer(StandardCheckpointHandler())``),
alternating, 1 warm-up repetition discarded, medians of 3.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_jax.py [--reps 3] [--states 1gib,5000]

Reads come from the page cache for both libraries (the files were just written). The
machine is shared: figures swing between runs; compare the two columns of one run.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pagecache import drop_page_cache  # a sibling module: the scripts run from benchmarks/

GIB = 1 << 30


# -- states and targets -------------------------------------------------------------------


def shapes(kind: str) -> dict[str, Any]:
    """The tree of leaf shapes of a state (nested dicts of tuples)."""
    if kind == "1gib":
        return {f"layer{i}": (8192, 4096) for i in range(8)}
    if kind == "5000":
        return {f"block{b}": {f"p{i}": (32, 32) for i in range(100)} for b in range(50)}
    raise ValueError(kind)


def sharding(mesh_shape: tuple[int, int]) -> Any:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh(mesh_shape, ("data", "model"))
    return NamedSharding(mesh, P("data", "model"))


def make_state(kind: str) -> Any:
    import jax

    s = sharding((4, 2))
    key = jax.random.key(0)
    made: dict[tuple[int, ...], Any] = {}

    def leaf(shape: tuple[int, ...], i: list[int]) -> Any:
        if shape not in made:
            made[shape] = jax.jit(
                lambda k, shape=shape: jax.random.normal(k, shape, "float32"), out_shardings=s
            )
        i[0] += 1
        return made[shape](jax.random.fold_in(key, i[0]))

    counter = [0]
    return jax.tree.map(lambda shape: leaf(shape, counter), shapes(kind), is_leaf=lambda x: isinstance(x, tuple))


def abstract(kind: str, mesh_shape: tuple[int, int]) -> Any:
    import jax

    s = sharding(mesh_shape)
    return jax.tree.map(
        lambda shape: jax.ShapeDtypeStruct(shape, "float32", sharding=s), shapes(kind),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def nbytes(kind: str) -> int:
    import math

    import jax

    return sum(4 * math.prod(s) for s in jax.tree.leaves(shapes(kind), is_leaf=lambda x: isinstance(x, tuple)))


def block(tree: Any) -> None:
    import jax

    for x in jax.tree.leaves(tree):
        x.block_until_ready()


# -- the two libraries ----------------------------------------------------------------------


def save(lib: str, path: Path, state: Any) -> None:
    if lib == "ckptcore":
        import ckptcore

        ckptcore.save(path, state)
    else:
        import orbax.checkpoint as ocp

        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            ckptr.save(path, args=ocp.args.StandardSave(state))


def restore(lib: str, path: Path, target: Any) -> Any:
    if lib == "ckptcore":
        import ckptcore

        return ckptcore.restore(path, target)
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        return ckptr.restore(path, args=ocp.args.StandardRestore(target))


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rss_child(lib: str, path: str, kind: str, mesh: str) -> None:
    """Run in a fresh process: the peak RSS a restore adds, in bytes."""
    import jax
    import numpy as np

    target = abstract(kind, tuple(int(n) for n in mesh.split("x")))  # type: ignore[arg-type]
    # Warm up the runtime and the library (imports, plugins, thread pools) on a tiny state first.
    tiny = {"x": jax.device_put(np.ones(1 << 16, np.float32), jax.devices()[1])}
    with tempfile.TemporaryDirectory() as tmp:
        save(lib, Path(tmp) / "tiny", tiny)
        spec = {"x": jax.ShapeDtypeStruct(tiny["x"].shape, tiny["x"].dtype, sharding=tiny["x"].sharding)}
        block(restore(lib, Path(tmp) / "tiny", spec))
    before = peak_rss_kib()
    result = restore(lib, Path(path), target)
    block(result)
    after = peak_rss_kib()
    print(json.dumps({"peak_bytes": (after - before) * 1024}))


def peak_rss_kib() -> int:
    """This process's peak RSS in KiB.

    ``ru_maxrss`` survives ``execve`` on Linux: a child forked from this (large) benchmark
    process starts with the parent's peak and would show no growth at all. ``VmHWM`` is the
    high-water mark of the child's own address space; ``ru_maxrss`` elsewhere.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss(lib: str, path: Path, kind: str, mesh: str) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", lib, str(path), kind, mesh],
        capture_output=True, text=True, check=True, env=os.environ.copy(),
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


# -- the run ----------------------------------------------------------------------------------




COLD = True  # restores read from disk (page cache dropped first), as in bench_local.py; --warm turns it off


def run_state(kind: str, reps: int, root: Path) -> dict[str, dict[str, list[float]]]:
    state = make_state(kind)
    block(state)
    size = nbytes(kind)
    same, other = abstract(kind, (4, 2)), abstract(kind, (2, 4))
    results: dict[str, dict[str, list[float]]] = {lib: {} for lib in ("ckptcore", "orbax")}
    for rep in range(reps + 1):  # rep 0 is the warm-up
        order = ("ckptcore", "orbax") if rep % 2 == 0 else ("orbax", "ckptcore")
        for lib in order:
            path = root / f"{kind}-{lib}-{rep}"
            t_save = timed(lambda lib=lib, path=path: save(lib, path, state))
            if COLD:
                drop_page_cache()
            t_restore = timed(lambda lib=lib, path=path: block(restore(lib, path, same)))
            if COLD:
                drop_page_cache()
            t_reshard = timed(lambda lib=lib, path=path: block(restore(lib, path, other)))
            if rep > 0:
                r = results[lib]
                r.setdefault("save GB/s", []).append(size / t_save / 1e9)
                r.setdefault("restore GB/s", []).append(size / t_restore / 1e9)
                r.setdefault("reshard GB/s", []).append(size / t_reshard / 1e9)
                r.setdefault("save s", []).append(t_save)
                r.setdefault("restore s", []).append(t_restore)
                r.setdefault("reshard s", []).append(t_reshard)
            if rep == reps:  # memory: one fresh process per restore, on the last checkpoint of each
                r = results[lib]
                r["restore peak RSS / state"] = [peak_rss(lib, path, kind, "4x2") / size]
                r["reshard peak RSS / state"] = [peak_rss(lib, path, kind, "2x4") / size]
            if rep < reps:
                shutil.rmtree(path, ignore_errors=True)
        print(f"  {kind}: repetition {rep}{' (warm-up)' if rep == 0 else ''} done", file=sys.stderr, flush=True)
    for lib in ("ckptcore", "orbax"):
        shutil.rmtree(root / f"{kind}-{lib}-{reps}", ignore_errors=True)
    return results


def table(kind: str, size: int, results: dict[str, dict[str, list[float]]]) -> str:
    lines = [
        f"### {kind} state ({size / GIB:.3g} GiB)" if size >= GIB // 4 else f"### {kind} state ({size / 2**20:.3g} MiB)",
        "",
        "| metric | ckptcore | orbax | ckptcore / orbax |",
        "|---|---:|---:|---:|",
    ]
    for metric in results["ckptcore"]:
        a, b = statistics.median(results["ckptcore"][metric]), statistics.median(results["orbax"][metric])
        ratio = (b / a if metric.endswith(" s") else a / b) if a > 0 and b > 0 else float("nan")
        fmt = "{:.3f}" if metric.endswith("GB/s") else "{:.2f}"
        note = " (speed-up)" if metric.endswith(" s") else ""
        lines.append(f"| {metric} | {fmt.format(a)} | {fmt.format(b)} | {ratio:.2f}x{note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warm", action="store_true", help="restore from the page cache instead of from disk")
    parser.add_argument("--states", default="1gib,5000")
    parser.add_argument("--dir", default=None, help="where to write checkpoints (default: a temporary directory)")
    parser.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global COLD
    COLD = not args.warm
    if COLD and not drop_page_cache():
        print("warning: cannot drop the page cache (not root?): restores read warm", file=sys.stderr)
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    import jax

    assert len(jax.devices()) >= 8, "needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8"
    root = Path(tempfile.mkdtemp(prefix="bench_jax_", dir=args.dir))
    try:
        for kind in args.states.split(","):
            results = run_state(kind, args.reps, root)
            print(f"restores: {'cold (page cache dropped before each)' if COLD else 'warm (from the page cache)'}")
            print(table(kind, nbytes(kind), results), flush=True)
            print(flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
