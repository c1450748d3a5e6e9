"""NumPy-only users are unaffected by pytree support (issue 11, item 8).

With JAX blocked (``sys.modules["jax"] = None``: importing it raises ImportError) the core's
own containers save and restore, and a checkpoint of Flax/NNX nodes reads back as plain
dicts of NumPy arrays: a checkpoint can be inspected anywhere, without JAX.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _run_blocked(code: str) -> str:
    prelude = 'import sys\nsys.modules["jax"] = None\nsys.modules["jaxlib"] = None\n'
    out = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_core_containers_save_and_restore_with_jax_blocked(tmp_path):
    out = _run_blocked(
        f"""
        import collections
        import numpy as np, ckptcore
        Pair = collections.namedtuple("Pair", ["a", "b"])
        state = {{"d": {{"w": np.arange(6.0).reshape(2, 3), 1: "one"}}, "l": [np.int8(3), None, []],
                 "t": (1.5, b"x", {{}}), "nt": Pair(np.ones(2, np.float32), True)}}
        path = {str(tmp_path / "ck")!r}
        ckptcore.save(path, state)
        back = ckptcore.restore(path)
        assert back["d"][1] == "one" and back["l"][0] == np.int8(3) and back["l"][1:] == [None, []]
        assert back["t"] == (1.5, b"x", {{}}) and back["nt"].b is True and type(back["nt"]).__name__ == "Pair"
        np.testing.assert_array_equal(back["d"]["w"], state["d"]["w"])
        target = {{"d": {{"w": np.zeros((2, 3), np.float32), 1: ""}}, "l": [0, None, []], "t": (0.0, b"", {{}}),
                  "nt": Pair(np.zeros(2, np.float32), False)}}
        again = ckptcore.restore(path, target=target)
        assert again["d"]["w"].dtype == np.float32 and isinstance(again["nt"], Pair)
        ckptcore.metadata(path)
        print(sys.modules.get("jax"))
        """
    )
    assert out.strip() == "None"


def test_a_train_state_checkpoint_reads_back_as_plain_dicts_without_jax(tmp_path):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    pytest.importorskip("flax")
    import flax.linen as nn
    from flax.training import train_state

    import ckptcore

    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jax.numpy.ones((1, 2)))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3))
    ckptcore.save(tmp_path / "ck", state)
    out = _run_blocked(
        f"""
        import numpy as np, ckptcore
        back = ckptcore.restore({str(tmp_path / "ck")!r})
        assert type(back) is dict and list(back) == ["step", "params", "opt_state"]
        kernel = back["params"]["params"]["kernel"]
        assert type(kernel) is np.ndarray and kernel.shape == (2, 3)
        print(ckptcore.metadata({str(tmp_path / "ck")!r}).node_type)
        """
    )
    assert out.strip() == "flax.training.train_state.TrainState"
