"""``ckptcore demo``: a real (small) training run that is interrupted, resumed, and checked.

A NumPy MLP learns a fixed random "teacher" network with Adam. Its whole training state
(parameters, Adam moments, step counter, data-sampling RNG state) is a pytree of arrays
saved by a :class:`ckptcore.CheckpointManager` every few steps, with the loss as metric
and the run's config as a ``Json`` item. The run is stopped mid-way (the manager is
closed, as a preempted job would be), a fresh manager resumes from ``latest_step()``, and
the final state is compared bit for bit with a run that was never interrupted.

Needs only NumPy and the installed plugins (no JAX).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

D_IN = 32
BATCH = 64
TOTAL_STEPS = 300
SAVE_EVERY = 25
INTERRUPT_AT = 160
LEARNING_RATE = 1e-3
SEED = 7


def _hidden_units(size_mb: int) -> int:
    # params + two Adam moments, float32: 3 * 4 bytes * (D_IN + 2) per hidden unit
    return max(16, int(size_mb * 2**20 / (12 * (D_IN + 2))))


def _pack_rng(rng: np.random.Generator) -> np.ndarray:
    """PCG64's 128-bit state and increment as four uint64 words (exact, no pickling)."""
    s = rng.bit_generator.state
    mask = (1 << 64) - 1
    words = [s["state"]["state"] >> 64, s["state"]["state"] & mask, s["state"]["inc"] >> 64, s["state"]["inc"] & mask]
    return np.array([*words, s["has_uint32"], s["uinteger"]], dtype=np.uint64)


def _unpack_rng(packed: np.ndarray) -> np.random.Generator:
    w = [int(x) for x in packed]
    bit_generator = np.random.PCG64()
    bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": (w[0] << 64) | w[1], "inc": (w[2] << 64) | w[3]},
        "has_uint32": w[4], "uinteger": w[5],
    }
    return np.random.Generator(bit_generator)


def init_state(hidden: int) -> dict[str, Any]:
    init = np.random.default_rng(SEED)
    params = {
        "w1": (init.standard_normal((D_IN, hidden)) / np.sqrt(D_IN)).astype(np.float32),
        "b1": np.zeros(hidden, np.float32),
        "w2": (init.standard_normal((hidden, 1)) / np.sqrt(hidden)).astype(np.float32),
        "b2": np.zeros(1, np.float32),
    }
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    return {
        "params": params,
        "opt": {"m": zeros, "v": {k: np.zeros_like(v) for k, v in params.items()}, "count": np.zeros((), np.int64)},
        "step": np.zeros((), np.int64),
        "rng": _pack_rng(np.random.default_rng(SEED + 1)),
    }


def _teacher() -> tuple[np.ndarray, np.ndarray]:
    t = np.random.default_rng(SEED + 2)
    w = t.standard_normal((D_IN, 16)) / np.sqrt(D_IN)
    v = t.standard_normal((16, 1)) / np.sqrt(16)
    return w.astype(np.float32), v.astype(np.float32)


def train_step(state: dict[str, Any], teacher: tuple[np.ndarray, np.ndarray]) -> tuple[dict[str, Any], float]:
    """One Adam step on a fresh batch; returns a new state (the input is not modified)."""
    rng = _unpack_rng(state["rng"])
    x = rng.standard_normal((BATCH, D_IN)).astype(np.float32)
    y = np.tanh(x @ teacher[0]) @ teacher[1]
    p = state["params"]
    h_pre = x @ p["w1"] + p["b1"]
    h = np.maximum(h_pre, 0)
    err = h @ p["w2"] + p["b2"] - y
    loss = float(np.mean(err**2))
    g_out = (2.0 / BATCH) * err
    g_h = (g_out @ p["w2"].T) * (h_pre > 0)
    grads = {"w1": x.T @ g_h, "b1": g_h.sum(0), "w2": h.T @ g_out, "b2": g_out.sum(0)}
    count = state["opt"]["count"] + 1
    b1, b2, eps = np.float32(0.9), np.float32(0.999), np.float32(1e-8)
    m = {k: b1 * state["opt"]["m"][k] + (1 - b1) * g for k, g in grads.items()}
    v = {k: b2 * state["opt"]["v"][k] + (1 - b2) * g * g for k, g in grads.items()}
    scale = np.float32(LEARNING_RATE * np.sqrt(1 - 0.999 ** int(count)) / (1 - 0.9 ** int(count)))
    params = {k: p[k] - scale * m[k] / (np.sqrt(v[k]) + eps) for k in p}
    new = {"params": params, "opt": {"m": m, "v": v, "count": count}, "step": state["step"] + 1,
           "rng": _pack_rng(rng)}
    return new, loss


def _leaves(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        out: dict[str, np.ndarray] = {}
        for k, v in tree.items():
            out.update(_leaves(v, f"{prefix}/{k}"))
        return out
    return {prefix: np.asarray(tree)}


def bulk_round_trip(root: str, bulk_mb: int, *, progress: bool = True) -> bool:
    """Save and restore a ``bulk_mb`` MiB model-sized state with progress bars; print throughput."""
    from ckptcore import Checkpointer

    rng = np.random.default_rng(SEED)
    n_arrays = 8
    per_array = max(1, bulk_mb * 2**20 // n_arrays // 4)
    layers = [{"w": rng.standard_normal(per_array, dtype=np.float32)} for _ in range(n_arrays)]
    state = {"layers": layers, "step": 1}
    nbytes = n_arrays * per_array * 4
    path = os.path.join(root, "bulk")
    ckpt = Checkpointer()
    with ckpt:
        t0 = time.perf_counter()
        ckpt.save(path, state, progress=progress)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        back = ckpt.restore(path, progress=progress)
        restore_s = time.perf_counter() - t0
    same = all(np.array_equal(a["w"], b["w"]) for a, b in zip(layers, back["layers"], strict=True))
    print(f"5. bulk state of {nbytes / 2**20:.0f} MiB ({n_arrays} float32 arrays): saved (fsync'd, atomic) in "
          f"{save_s:.2f} s ({nbytes / save_s / 2**30:.2f} GiB/s), restored in {restore_s:.2f} s "
          f"({nbytes / restore_s / 2**30:.2f} GiB/s); identical: {'YES' if same else 'NO'}")
    return same


def run_demo(directory: str | None = None, size_mb: int = 1, bulk_mb: int = 256) -> int:
    """Train, interrupt, resume, verify; then a bulk save/restore. Print what happened; return the exit status."""
    from ckptcore import CheckpointManager, CheckpointManagerOptions, Composite, Json

    own_dir = directory is None
    root = tempfile.mkdtemp(prefix="ckptcore-demo-") if directory is None else directory
    run_dir = os.path.join(root, "run")
    hidden = _hidden_units(size_mb)
    teacher = _teacher()
    config = {"d_in": D_IN, "hidden": hidden, "batch": BATCH, "lr": LEARNING_RATE, "seed": SEED}
    options = CheckpointManagerOptions(max_to_keep=3, save_interval_steps=SAVE_EVERY, enable_async_checkpointing=True)
    state0 = init_state(hidden)
    nbytes = sum(a.nbytes for a in _leaves(state0).values())
    print(f"ckptcore demo: NumPy MLP {D_IN}->{hidden}->1 with Adam, state {nbytes / 2**20:.1f} MiB "
          f"(params, Adam moments, step, RNG state), {TOTAL_STEPS} steps, checkpoint every {SAVE_EVERY} steps "
          f"(max_to_keep=3, async) in {run_dir}")
    try:
        # 1. Train until "preempted" at INTERRUPT_AT.
        t0 = time.perf_counter()
        save_blocking = 0.0
        first_loss = float("nan")
        saves = 0
        state = state0
        with CheckpointManager(run_dir, options, metadata={"demo": "mlp-regression"}) as mgr:
            if mgr.all_steps():
                print(f"{run_dir} already holds steps {mgr.all_steps()} (an earlier demo?): give an empty --directory")
                return 2
            for step in range(1, INTERRUPT_AT + 1):
                state, loss = train_step(state, teacher)
                first_loss = loss if step == 1 else first_loss
                t = time.perf_counter()
                if mgr.save(step, Composite(state=state, config=Json(config)), metrics={"loss": loss}):
                    saves += 1
                save_blocking += time.perf_counter() - t
            t = time.perf_counter()
        close_wait = time.perf_counter() - t
        first_part = time.perf_counter() - t0
        print(f"1. trained steps 1..{INTERRUPT_AT} in {first_part:.2f} s; {saves} saves blocked training "
              f"{save_blocking * 1e3:.0f} ms in total ({save_blocking / max(saves, 1) * 1e3:.1f} ms each), "
              f"waiting for the last one at close {close_wait * 1e3:.0f} ms; loss {first_loss:.4f} -> {loss:.4f}")
        print(f"   interrupted at step {INTERRUPT_AT}: the {INTERRUPT_AT % SAVE_EVERY} steps since the last save are lost")

        # 2. A fresh process would do exactly this: open the directory, restore the latest step.
        t0 = time.perf_counter()
        with CheckpointManager(run_dir, options) as mgr:
            start = mgr.latest_step()
            kept = mgr.all_steps()
            assert start is not None
            restored = mgr.restore(start, Composite(state=init_state(hidden)))
            restore_s = time.perf_counter() - t0
            print(f"2. resumed: steps on disk {kept} (metrics of {start}: {mgr.metrics(start)}), restored step "
                  f"{start} in {restore_s * 1e3:.0f} ms; run metadata {mgr.metadata()}")
            state = restored.state
            assert int(state["step"]) == start
            t0 = time.perf_counter()
            for step in range(start + 1, TOTAL_STEPS + 1):
                state, loss = train_step(state, teacher)
                mgr.save(step, Composite(state=state, config=Json(config)), metrics={"loss": loss})
            resumed_s = time.perf_counter() - t0
            final_steps = None
        with CheckpointManager(run_dir, CheckpointManagerOptions(read_only=True)) as reader:
            final_steps = reader.all_steps()
            saved_config = reader.restore(None, Composite(config=None)).config
        print(f"3. trained steps {start + 1}..{TOTAL_STEPS} in {resumed_s:.2f} s; loss {loss:.4f}; steps kept "
              f"{final_steps}; config item round-trips: {saved_config == config}")

        # 3. The reference: the same training, never interrupted, never saved.
        t0 = time.perf_counter()
        reference = state0
        for _ in range(TOTAL_STEPS):
            reference, _ = train_step(reference, teacher)
        reference_s = time.perf_counter() - t0
        ours, theirs = _leaves(state), _leaves(reference)
        identical = ours.keys() == theirs.keys() and all(
            ours[k].dtype == theirs[k].dtype and ours[k].tobytes() == theirs[k].tobytes() for k in ours
        )
        print(f"4. uninterrupted reference run: {reference_s:.2f} s; resumed run bit-identical to it "
              f"({len(ours)} arrays: params, Adam moments, step, RNG state): {'YES' if identical else 'NO'}")
        if not identical:
            differing = [k for k in ours if k not in theirs or ours[k].tobytes() != theirs[k].tobytes()]
            print(f"   differing arrays: {differing}")
            return 1
        if bulk_mb > 0 and not bulk_round_trip(root, bulk_mb):
            return 1
        return 0
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
