"""A small training run with a CheckpointManager, for the kill-and-resume tests (tests/test_pytrees_resume.py).

Run as a script (``python pytrees_train_worker.py linen|nnx ROOT STEPS``) it says ``ready``,
waits for a line on stdin, then trains from scratch, saving every step in the background
and printing each step number once its save is under way;
imported, :func:`run` also resumes from the manager's latest step onto an abstract target.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ckptcore


def batch(step: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(step)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(x @ np.arange(8, dtype=np.float32).reshape(4, 2))


# -- Flax linen: a TrainState with a dropout key -----------------------------------------


@functools.cache  # one jit cache per process: the reference and the resumed run compile once
def _linen() -> dict[str, Any]:
    import flax.linen as nn
    from flax.training import train_state

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x: Any, train: bool) -> Any:
            x = nn.relu(nn.Dense(16)(x))
            x = nn.Dropout(0.2, deterministic=not train)(x)
            return nn.Dense(2)(x)

    class State(train_state.TrainState):
        rng: jax.Array

    net = Net()

    def create() -> State:
        params = net.init(jax.random.key(0), jnp.ones((1, 4)), train=False)
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
        return State.create(apply_fn=net.apply, params=params, tx=tx, rng=jax.random.key(1))

    @jax.jit
    def step(state: State, x: Any, y: Any) -> State:
        rng, dropout = jax.random.split(state.rng)

        def loss(params: Any) -> Any:
            pred = state.apply_fn(params, x, train=True, rngs={"dropout": dropout})
            return jnp.mean((pred - y) ** 2)

        return state.apply_gradients(grads=jax.grad(loss)(state.params)).replace(rng=rng)

    def restore(mgr: ckptcore.CheckpointManager, at: int) -> State:
        return mgr.restore(at, target=jax.eval_shape(create))

    return {"create": create, "step": step, "saved": lambda s: s, "restore": restore}


# -- NNX: a module with a dropout stream and its nnx.Optimizer -----------------------------


@functools.cache
def _nnx() -> dict[str, Any]:
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.hidden = nnx.Linear(4, 16, rngs=rngs)
            self.dropout = nnx.Dropout(0.2, rngs=rngs)
            self.out = nnx.Linear(16, 2, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            return self.out(self.dropout(nnx.relu(self.hidden(x))))

    def create() -> tuple[Any, Any]:
        model = Net(nnx.Rngs(0, dropout=1))
        return model, nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model: Any, optimizer: Any, x: Any, y: Any) -> None:
        def loss(m: Any) -> Any:
            return jnp.mean((m(x) - y) ** 2)

        optimizer.update(model, nnx.grad(loss)(model))

    def step(pair: tuple[Any, Any], x: Any, y: Any) -> tuple[Any, Any]:
        train_step(*pair, x, y)
        return pair

    def restore(mgr: ckptcore.CheckpointManager, at: int) -> tuple[Any, Any]:
        graphdef, abstract = nnx.split(nnx.eval_shape(create))
        return nnx.merge(graphdef, mgr.restore(at, target=abstract))

    return {"create": create, "step": step, "saved": lambda pair: nnx.state(pair), "restore": restore}


FRAMEWORKS = {"linen": _linen, "nnx": _nnx}


def fingerprint(tree: Any) -> str:
    """A digest of every leaf's bytes (typed keys by their key data), in tree order."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()


def run(
    kind: str, root: str, steps: int, *, resume: bool = False, announce: bool = False, pause: float = 0.0
) -> tuple[str, int]:
    """Train to ``steps`` (from the latest saved step when ``resume``); the final state's fingerprint and the start step."""
    fw = FRAMEWORKS[kind]()
    options = ckptcore.CheckpointManagerOptions(max_to_keep=3, enable_async_checkpointing=True)
    with ckptcore.CheckpointManager(root, options) as mgr:
        start = mgr.latest_step() if resume else None
        state = fw["restore"](mgr, start) if start is not None else fw["create"]()
        for i in range(0 if start is None else start, steps):
            state = fw["step"](state, *batch(i + 1))
            mgr.save(i + 1, fw["saved"](state))
            if announce:
                print(i + 1, flush=True)
            time.sleep(pause)
        mgr.wait_until_finished()
    return fingerprint(fw["saved"](state)), start or 0


if __name__ == "__main__":
    FRAMEWORKS[sys.argv[1]]()["create"]()  # imports done: the parent's own work overlaps them
    print("ready", flush=True)
    sys.stdin.readline()
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]), announce=True, pause=0.05)
