"""A Flax TrainState vs the same arrays in a plain dict vs orbax-checkpoint, side by side (issue 11).

Run:  python benchmarks/bench_pytrees.py [--size-mb 1024] [--repeats 3] [--warm] [--dir DIR]

The state is a ``flax.training.train_state.TrainState`` of a small transformer-shaped model
(embedding, 6 blocks of attention q/k/v/o + layer norms + MLP, final norm, head: about 100
parameters) with ``optax.adamw`` state after one update (mu and nu hold real values): about
300 leaves, ``--size-mb`` MiB in all (the model width is chosen to fit). Implementations:

* ``ckptcore TrainState``: ``ckptcore.save(path, state)``; restore onto the abstract state
  (``jax.ShapeDtypeStruct`` leaves with the saved shardings, the TrainState's own treedef);
* ``ckptcore plain dict``: the same arrays in nested dicts (optax states as dicts), restored
  onto the same kind of abstract dict;
* ``orbax StandardCheckpointer``: save (until finished) and restore onto
  ``jax.tree.map(ocp.utils.to_shape_dtype_struct, state)``.

Implementations alternate within each repetition (the order rotates), the first
repetition is a discarded warm-up, and the table shows medians with their ranges. Restores
are cold (page cache dropped first, when permitted) unless ``--warm``. The disk's
throughput swings between runs: compare the rows of one run.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import gc
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pagecache import drop_page_cache  # a sibling module: the scripts run from benchmarks/

MiB = 1 << 20
LAYERS = 6


# -- the state -----------------------------------------------------------------------------


def param_shapes(width: int) -> dict[str, Any]:
    vocab, hidden = 4 * width, 4 * width
    dense = lambda n_in, n_out: {"kernel": (n_in, n_out), "bias": (n_out,)}  # noqa: E731
    norm = {"scale": (width,), "bias": (width,)}
    blocks = {
        f"block_{i}": {
            "attention": {name: dense(width, width) for name in ("query", "key", "value", "out")},
            "norm_1": dict(norm), "norm_2": dict(norm),
            "mlp": {"dense_in": dense(width, hidden), "dense_out": dense(hidden, width)},
        }
        for i in range(LAYERS)
    }
    return {"params": {"embed": {"embedding": (vocab, width)}, **blocks, "final_norm": dict(norm),
                       "head": dense(width, vocab)}}


def width_for(size_mb: int) -> int:
    """The model width (a multiple of 64) whose TrainState with adamw holds about ``size_mb`` MiB."""
    per_width2 = 3 * 4 * (4 + 4 + LAYERS * 12)  # params + mu + nu, float32; embed, head, blocks
    return max(64, round(math.sqrt(size_mb * MiB / per_width2) / 64) * 64)


def make_state(width: int) -> Any:
    import jax
    import optax
    from flax.training import train_state

    shapes = param_shapes(width)
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
    key = jax.random.key(0)
    params = treedef.unflatten(
        [jax.random.normal(jax.random.fold_in(key, i), shape, "float32") * 0.02 for i, shape in enumerate(leaves)]
    )
    state = train_state.TrainState.create(apply_fn=_apply, params=params, tx=optax.adamw(1e-3))
    grads = jax.tree.map(lambda p: p * 0.5 + 0.01, state.params)
    state = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads)
    jax.block_until_ready(state)
    return state


def _apply(params: Any, x: Any) -> Any:  # the TrainState's apply_fn: static, never saved
    return x


def as_plain_dict(state: Any) -> dict[str, Any]:
    """The same arrays as nested dicts: the TrainState's fields, optax namedtuples as dicts."""
    return {
        "step": state.step,
        "params": state.params,
        "opt_state": {str(i): dict(s._asdict()) for i, s in enumerate(state.opt_state)},
    }


def abstract(tree: Any) -> Any:
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def count_leaves(tree: Any) -> int:
    import jax

    return len(jax.tree.leaves(tree))


def nbytes(tree: Any) -> int:
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(tree))


# -- the implementations -------------------------------------------------------------------


@dataclass
class Impl:
    name: str
    state: Any
    target: Any
    save: Callable[[str, Any], None]
    restore: Callable[[str, Any], Any]


def ckptcore_impls(state: Any) -> list[Impl]:
    import ckptcore

    plain = as_plain_dict(state)
    return [
        Impl("ckptcore TrainState", state, abstract(state), ckptcore.save, ckptcore.restore),
        Impl("ckptcore plain dict", plain, abstract(plain), ckptcore.save, ckptcore.restore),
    ]


def orbax_impl(state: Any) -> Impl:
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()

    def save(path: str, tree: Any) -> None:
        checkpointer.save(path, tree)
        checkpointer.wait_until_finished()

    return Impl(
        "orbax StandardCheckpointer", state, jax.tree.map(ocp.utils.to_shape_dtype_struct, state), save,
        lambda path, target: checkpointer.restore(path, target),
    )


def same(a: Any, b: Any) -> bool:
    import jax
    import numpy as np

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))


# -- measuring -------------------------------------------------------------------------------


def run(impls: list[Impl], root: str, repeats: int, cold: bool) -> dict[str, dict[str, list[float]]]:
    import jax

    times: dict[str, dict[str, list[float]]] = {i.name: {"save": [], "restore": []} for i in impls}
    for rep in range(repeats + 1):  # rep 0 is the warm-up
        order = impls[rep % len(impls):] + impls[: rep % len(impls)]
        paths = {}
        for impl in order:
            path = os.path.join(root, f"{rep}-{impl.name.replace(' ', '_')}")
            gc.collect()
            t = time.perf_counter()
            impl.save(path, impl.state)
            elapsed = time.perf_counter() - t
            paths[impl.name] = path
            if rep:
                times[impl.name]["save"].append(elapsed)
        for impl in order:
            if cold:
                drop_page_cache()
            gc.collect()
            t = time.perf_counter()
            restored = jax.block_until_ready(impl.restore(paths[impl.name], impl.target))
            elapsed = time.perf_counter() - t
            if rep == 0:
                if jax.tree.structure(restored) != jax.tree.structure(impl.target):
                    raise SystemExit(f"{impl.name}: the restored treedef differs from the target's")
                if not same(impl.state, restored):
                    raise SystemExit(f"{impl.name}: restored different data")
            del restored
            if rep:
                times[impl.name]["restore"].append(elapsed)
        for path in paths.values():
            shutil.rmtree(path, ignore_errors=True)
        print(f"  repetition {rep}{' (warm-up)' if rep == 0 else ''}: "
              + ", ".join(f"{n} {t['save'][-1]:.3f}/{t['restore'][-1]:.3f} s" for n, t in times.items() if rep),
              file=sys.stderr, flush=True)
    return times


def tree_walk_ms(impl: Impl, runs: int = 20) -> tuple[float, float]:
    """Median milliseconds of the tree work alone (no I/O): encoding the tree for a save, planning a restore."""
    from ckptcore.io.restore_plan import Planner
    from ckptcore.tree.nodes import encode_tree

    def record(path: Any, value: Any) -> dict[str, Any]:
        key = "/".join(str(k) for k in path) or "~root"
        return {"kind": "ndarray", "shape": list(value.shape), "dtype": str(value.dtype), "nbytes": int(value.nbytes),
                "key": key.replace("[", "").replace("]", "").replace("'", "")}

    encode, plan = [], []
    for _ in range(runs):
        t = time.perf_counter()
        tree = encode_tree(impl.state, record)
        encode.append(time.perf_counter() - t)
        planner = Planner(partial=False)
        t = time.perf_counter()
        planner.plan(tree, impl.target, (), True)
        plan.append(time.perf_counter() - t)
    return statistics.median(encode) * 1e3, statistics.median(plan) * 1e3


def print_table(size: int, leaves: int, times: dict[str, dict[str, list[float]]], cold: bool) -> None:
    n = len(next(iter(times.values()))["save"])
    print(f"\nFlax TrainState with adamw: {leaves} leaves, {size / MiB:.0f} MiB; median of {n} [min-max]; "
          f"restores {'cold' if cold else 'warm'}")
    print(f"| {'implementation':<28} | {'save s':>20} | {'save GB/s':>9} | {'restore s':>20} | {'restore GB/s':>12} |")
    print(f"|{'-' * 30}|{'-' * 21}:|{'-' * 10}:|{'-' * 21}:|{'-' * 13}:|")
    for name, t in times.items():
        s, r = statistics.median(t["save"]), statistics.median(t["restore"])
        s_range, r_range = f"[{min(t['save']):.3f}-{max(t['save']):.3f}]", f"[{min(t['restore']):.3f}-{max(t['restore']):.3f}]"
        print(f"| {name:<28} | {s:>6.3f} {s_range:>13} | {size / s / 1e9:>9.3f} | {r:>6.3f} {r_range:>13} | "
              f"{size / r / 1e9:>12.3f} |")
    ours = "ckptcore TrainState"
    for ref in times:
        if ref == ours:
            continue
        s = statistics.median(times[ref]["save"]) / statistics.median(times[ours]["save"])
        r = statistics.median(times[ref]["restore"]) / statistics.median(times[ours]["restore"])
        print(f"TrainState speed / {ref}: save {s:.2f}x, restore {r:.2f}x")


def print_walks(impls: list[Impl]) -> None:
    print("\ntree work alone (no I/O), median of 20: encode for a save / plan a restore onto the target")
    for impl in impls:
        if impl.name.startswith("ckptcore"):
            encode, plan = tree_walk_ms(impl)
            print(f"  {impl.name:<28} {encode:7.2f} ms / {plan:7.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the TrainState with its adamw state (MiB)")
    parser.add_argument("--repeats", type=int, default=3, help="measured repetitions (after one warm-up)")
    parser.add_argument("--warm", action="store_true", help="restore from the page cache instead of from disk")
    parser.add_argument("--no-orbax", action="store_true", help="leave orbax-checkpoint out")
    parser.add_argument("--dir", default=None, help="where to write checkpoints (default: a temporary directory)")
    args = parser.parse_args()
    cold = not args.warm
    if cold and not drop_page_cache():
        print("warning: cannot drop the page cache (not root?): restores read warm", file=sys.stderr)
        cold = False
    state = make_state(width_for(args.size_mb))
    impls = ckptcore_impls(state) + ([] if args.no_orbax else [orbax_impl(state)])
    root = tempfile.mkdtemp(prefix="bench_pytrees_", dir=args.dir)
    try:
        times = run(impls, root, args.repeats, cold)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(nbytes(state), count_leaves(state), times, cold)
    print_walks(impls)


if __name__ == "__main__":
    main()
