"""ckptcore vs orbax-checkpoint vs plain NumPy on local disk, side by side in one process.

Run:  python benchmarks/bench_local.py [--size-mb 1024] [--repeats 3] [--dir DIR]

Workloads (same data for every implementation):

* ``big``:   ``--size-mb`` MiB of float32 random normal arrays (8 arrays by default):
             save until durable, then a cold restore (page cache dropped first when permitted).
* ``small``: 5,000 float32 arrays of 1,024 elements in a nested dict: save and restore.
* ``import``: ``import ckptcore`` in a fresh interpreter; checks jax/tensorstore stay unimported.

Implementations alternate within each repetition (the order rotates between repetitions),
the first repetition is a discarded warm-up, and the table shows medians. The disk's
throughput swings between runs, so only the ratios within one run mean much.
"""

from __future__ import annotations

import argparse
import gc
import os
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


# -- cache control ---------------------------------------------------------------------




def fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- implementations ---------------------------------------------------------------------


class Impl:
    name = ""

    def save(self, path: str, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def restore(self, path: str, state: dict[str, Any]) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Ckptcore(Impl):
    def __init__(self, fmt: str | None) -> None:
        import ckptcore

        self.ckptcore = ckptcore
        self.format = fmt
        self.name = f"ckptcore ({fmt or 'ocdbt'})"

    def save(self, path: str, state: dict[str, Any]) -> None:
        self.ckptcore.save(path, state, format=self.format)

    def restore(self, path: str, state: dict[str, Any]) -> Any:
        return self.ckptcore.restore(path)


class Orbax(Impl):
    name = "orbax-checkpoint"

    def __init__(self) -> None:
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.ckptr = ocp.StandardCheckpointer()

    def save(self, path: str, state: dict[str, Any]) -> None:
        self.ckptr.save(path, state)
        self.ckptr.wait_until_finished()  # durable: orbax has finalized (fsynced, renamed) the checkpoint

    def restore(self, path: str, state: dict[str, Any]) -> Any:
        return self.ckptr.restore(path, state)

    def close(self) -> None:
        self.ckptr.close()


class NumpyFiles(Impl):
    """One ``np.save`` file per leaf, each fsynced, then the directory: the practical limit."""

    name = "np.save+fsync / np.load"

    def save(self, path: str, state: dict[str, Any]) -> None:
        os.makedirs(path)
        for name, array in _flat(state):
            file = os.path.join(path, f"{name}.npy")
            with open(file, "wb") as f:
                np.save(f, array)
                f.flush()
                os.fsync(f.fileno())
        fsync_path(path, directory=True)

    def restore(self, path: str, state: dict[str, Any]) -> Any:
        return {name: np.load(os.path.join(path, f"{name}.npy")) for name, _ in _flat(state)}


class NumpyOneFile(Impl):
    """All leaves in one ``np.savez`` file, fsynced: the limit for many small leaves."""

    name = "np.savez+fsync / np.load"

    def save(self, path: str, state: dict[str, Any]) -> None:
        os.makedirs(path)
        file = os.path.join(path, "state.npz")
        with open(file, "wb") as f:
            np.savez(f, **dict(_flat(state)))
            f.flush()
            os.fsync(f.fileno())
        fsync_path(path, directory=True)

    def restore(self, path: str, state: dict[str, Any]) -> Any:
        with np.load(os.path.join(path, "state.npz")) as z:
            return {name: z[name] for name in z.files}


def _flat(tree: Any, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    if isinstance(tree, dict):
        out = []
        for k, v in tree.items():
            out += _flat(v, f"{prefix}{k}.")
        return out
    return [(prefix.rstrip("."), tree)]


def _same(a: Any, b: Any) -> bool:
    fa, fb = dict(_flat(a)), dict(_flat(b))
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], np.asarray(fb[k])) for k in fa)


# -- data ----------------------------------------------------------------------------------


def big_state(size_mb: int, count: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    n = size_mb * MiB // 4 // count
    return {f"w{i}": rng.standard_normal(n, dtype=np.float32) for i in range(count)}


def small_state(leaves: int, elements: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    state: dict[str, Any] = {}
    for i in range(leaves):
        layer = state.setdefault(f"layer{i // 100}", {}).setdefault(f"block{(i // 10) % 10}", {})
        layer[f"p{i % 10}"] = rng.standard_normal(elements, dtype=np.float32)
    return state


# -- measuring -------------------------------------------------------------------------------


def run_workload(
    label: str, state: dict[str, Any], impls: list[Impl], root: str, repeats: int, cold: bool
) -> dict[str, dict[str, list[float]]]:
    """Times ``{impl: {"save": [...], "restore": [...]}}``, warm-up excluded."""
    times: dict[str, dict[str, list[float]]] = {i.name: {"save": [], "restore": []} for i in impls}
    # Dropping the page cache also drops the libraries' code pages; restoring a tiny
    # checkpoint first reloads them, so a cold restore measures reading the data, as in a
    # long-running process (and not TensorStore's 70 MB shared library coming back from disk).
    tiny = {"a": np.zeros(16, np.float32), "b": {"c": np.ones(1000, np.float32)}}
    warm = {i.name: os.path.join(root, f"{label}-warm-{i.name.split()[0]}") for i in impls}
    for impl in impls:
        impl.save(warm[impl.name], tiny)
    for rep in range(repeats + 1):
        order = impls[rep % len(impls):] + impls[: rep % len(impls)]
        paths = {}
        for impl in order:
            path = os.path.join(root, f"{label}-{rep}-{impl.name.split()[0]}")
            gc.collect()
            t = time.perf_counter()
            impl.save(path, state)
            elapsed = time.perf_counter() - t
            paths[impl.name] = path
            if rep:
                times[impl.name]["save"].append(elapsed)
        for impl in order:
            if cold:
                drop_page_cache()
                impl.restore(warm[impl.name], tiny)
            gc.collect()
            t = time.perf_counter()
            restored = impl.restore(paths[impl.name], state)
            elapsed = time.perf_counter() - t
            if rep == 0 and not _same(state, restored):
                raise SystemExit(f"{impl.name} restored different data for {label}")
            del restored
            if rep:
                times[impl.name]["restore"].append(elapsed)
        for path in paths.values():
            shutil.rmtree(path, ignore_errors=True)
        for path in () if rep < repeats else warm.values():
            shutil.rmtree(path, ignore_errors=True)
        print(f"  {label}: repetition {rep}{' (warm-up)' if rep == 0 else ''}: "
              + ", ".join(f"{n} {t['save'][-1]:.3f}/{t['restore'][-1]:.3f} s" for n, t in times.items() if rep),
              file=sys.stderr, flush=True)
    return times


def import_time(runs: int = 7) -> tuple[float, list[str]]:
    code = (
        "import time, sys; t = time.perf_counter(); import ckptcore; t = time.perf_counter() - t; "
        "print(t); print(' '.join(m for m in ('jax', 'tensorstore', 'numpy', 'orbax') if m in sys.modules))"
    )
    samples, heavy = [], []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split("\n")
        samples.append(float(out[0]))
        heavy = out[1].split()
    return statistics.median(samples), heavy


def print_table(title: str, nbytes: int, times: dict[str, dict[str, list[float]]], ours: str, refs: list[str]) -> None:
    print(f"\n{title}  ({nbytes / MiB:.0f} MiB; median of {len(next(iter(times.values()))['save'])})")
    print(f"{'implementation':<28}{'save s':>9}{'save GB/s':>11}{'restore s':>11}{'restore GB/s':>14}")
    for name, t in times.items():
        s, r = statistics.median(t["save"]), statistics.median(t["restore"])
        print(f"{name:<28}{s:>9.3f}{nbytes / s / 1e9:>11.3f}{r:>11.3f}{nbytes / r / 1e9:>14.3f}")
    for ref in refs:
        if ref not in times:
            continue
        s = statistics.median(times[ref]["save"]) / statistics.median(times[ours]["save"])
        r = statistics.median(times[ref]["restore"]) / statistics.median(times[ours]["restore"])
        print(f"{'ckptcore speed / ' + ref:<44} save {s:6.2f}x   restore {r:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the big state (MiB)")
    parser.add_argument("--arrays", type=int, default=8, help="number of arrays in the big state")
    parser.add_argument("--small-leaves", type=int, default=5000)
    parser.add_argument("--small-elements", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="measured repetitions (after one warm-up)")
    parser.add_argument("--format", default=None, help="ckptcore array format (default: the default, ocdbt)")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--only", choices=("big", "small", "import"), action="append", help="run only these")
    parser.add_argument("--no-orbax", action="store_true", help="skip orbax-checkpoint")
    args = parser.parse_args()
    only = set(args.only or ("big", "small", "import"))

    root = tempfile.mkdtemp(prefix="ckptcore-bench-", dir=args.dir)
    cold = drop_page_cache()
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPUs, dir {root}")
    print("restores are cold (page cache dropped)" if cold else "WARNING: cannot drop the page cache: restores are warm")
    try:
        if "import" in only:
            seconds, heavy = import_time()
            bad = [m for m in heavy if m in ("jax", "tensorstore", "orbax")]
            print(f"\nimport ckptcore: {seconds * 1000:.0f} ms (median of 7 fresh interpreters); "
                  f"heavy modules imported: {', '.join(bad) or 'none'}; numpy imported: {'numpy' in heavy}")
        ours = Ckptcore(args.format)
        orbax: list[Impl] = [] if args.no_orbax else [Orbax()]
        if "big" in only:
            state = big_state(args.size_mb, args.arrays)
            nbytes = sum(a.nbytes for a in state.values())
            times = run_workload("big", state, [ours, *orbax, NumpyFiles()], root, args.repeats, cold)
            print_table(f"{args.arrays} float32 arrays, random normal", nbytes, times, ours.name,
                        ["orbax-checkpoint", NumpyFiles.name])
            del state
        if "small" in only:
            state = small_state(args.small_leaves, args.small_elements)
            nbytes = sum(a.nbytes for _, a in _flat(state))
            times = run_workload("small", state, [ours, *orbax, NumpyOneFile()], root, args.repeats, cold)
            print_table(f"{args.small_leaves} float32 arrays of {args.small_elements} elements", nbytes, times,
                        ours.name, ["orbax-checkpoint", NumpyOneFile.name])
        for impl in [ours, *orbax]:
            impl.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
