"""Restore transformations (issue 15, item 1): renames, value_fn, multi_value_fn, missing, unused, reports.

Real checkpoints on local disk; reads are observed by wrapping the restore's wave reader
(``ckptcore.io.restore._read_wave``), so "never read" and "read once" are checked on what
the array format was actually asked for.
"""

from __future__ import annotations

import hashlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import ckptcore
from ckptcore.errors import TargetMismatchError, TransformError
from ckptcore.io import restore as restore_mod
from ckptcore.tree.keys import key_path_text

T = ckptcore.Transforms


@pytest.fixture
def reads(monkeypatch):
    """The storage keys of every array read, one entry per read request."""
    seen: list[str] = []
    real = restore_mod._read_wave

    def observed(fmt, location, name, wave):
        seen.extend(r.request.key for r in wave)
        return real(fmt, location, name, wave)

    monkeypatch.setattr(restore_mod, "_read_wave", observed)
    return seen


def digest(path) -> str:
    """Every file name and byte under ``path``: a restore must change none."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            full = os.path.join(root, f)
            h.update(full.encode())
            with open(full, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def pretrained() -> dict:
    rng = np.random.default_rng(0)
    return {
        "encoder": {
            f"layer_{i}": {"kernel": rng.normal(size=(8, 8)).astype(np.float32), "bias": rng.normal(size=8).astype(np.float32)}
            for i in range(2)
        },
        "head": {"kernel": rng.normal(size=(8, 3)).astype(np.float32)},
        "opt": {"mu": rng.normal(size=(64, 64)), "count": 12},
        "step": 1000,
    }


@pytest.fixture
def ck(tmp_path):
    path = tmp_path / "pretrained"
    state = pretrained()
    ckptcore.save(path, state)
    return path, state


def bigger_target() -> dict:
    """A 4-layer model with a 5-class head: layers 2, 3 and the new head columns are initialised here."""
    return {
        "encoder": {
            "blocks": {
                str(i): {"kernel": np.full((8, 8), 0.5, np.float32), "bias": np.full(8, 0.25, np.float32)} for i in range(4)
            }
        },
        "head": {"kernel": np.zeros((8, 5), np.float32)},
        "step": 0,
    }


def pad_to(saved: np.ndarray, target) -> np.ndarray:
    out = np.zeros(target.shape, target.dtype)
    out[tuple(slice(0, n) for n in saved.shape)] = saved
    return out


FINE_TUNE = dict(
    rename={r"^encoder/layer_(\d+)/(.*)": r"encoder/blocks/\1/\2"},
    value_fn={"head/kernel": pad_to},
    missing="from_target",
)


def test_fine_tuning_smaller_pretrained_into_bigger_renamed_model(ck, reads):
    path, state = ck
    target = bigger_target()
    out, report = ckptcore.restore(path, target, transforms=T(**FINE_TUNE), report=True)

    for i in range(2):  # renamed from the checkpoint
        np.testing.assert_array_equal(out["encoder"]["blocks"][str(i)]["kernel"], state["encoder"][f"layer_{i}"]["kernel"])
        np.testing.assert_array_equal(out["encoder"]["blocks"][str(i)]["bias"], state["encoder"][f"layer_{i}"]["bias"])
    for i in (2, 3):  # kept from the target
        assert out["encoder"]["blocks"][str(i)]["kernel"] is target["encoder"]["blocks"][str(i)]["kernel"]
    head = out["head"]["kernel"]
    assert head.shape == (8, 5) and head.dtype == np.float32
    np.testing.assert_array_equal(head[:, :3], state["head"]["kernel"])
    assert not head[:, 3:].any()
    assert out["step"] == 1000  # an inline scalar, restored plainly

    assert report.renamed == {
        f"encoder/layer_{i}/{leaf}": f"encoder/blocks/{i}/{leaf}" for i in range(2) for leaf in ("kernel", "bias")
    }
    assert sorted(report.from_target) == sorted(f"encoder/blocks/{i}/{leaf}" for i in (2, 3) for leaf in ("kernel", "bias"))
    assert report.computed == {"head/kernel": ["head/kernel"]}
    assert sorted(report.unused) == ["opt/count", "opt/mu"]
    assert report.warnings == []
    assert ckptcore.last_restore_report() is report
    # The optimizer state nobody asked for was never read; everything else exactly once.
    assert "opt/mu" not in reads
    assert sorted(reads) == sorted(["encoder/layer_0/kernel", "encoder/layer_0/bias", "encoder/layer_1/kernel",
                                    "encoder/layer_1/bias", "head/kernel"])
    assert report.leaves_read == 5 and report.bytes_read == 2 * (8 * 8 + 8) * 4 + 8 * 3 * 4


def test_each_source_read_once_even_when_several_transforms_use_it(ck, reads):
    path, state = ck
    target = {"a": np.empty((8, 8), np.float32), "b": np.empty((8, 8), np.float32), "mean": np.empty((8, 8), np.float64)}
    out = ckptcore.restore(path, target, transforms=T(
        rename={"^encoder/layer_0/kernel$": "a"},
        value_fn={"a": lambda saved, t: saved * 2},
        multi_value_fn={
            "b": (lambda saved, t: saved["encoder/layer_0/kernel"] + 1, ["encoder/layer_0/kernel"]),
            "mean": (lambda saved, t: sum(saved.values()) / len(saved), [r"encoder/layer_\d+/kernel"]),
        },
    ))
    k0, k1 = state["encoder"]["layer_0"]["kernel"], state["encoder"]["layer_1"]["kernel"]
    np.testing.assert_array_equal(out["a"], k0 * 2)
    np.testing.assert_array_equal(out["b"], k0 + 1)
    np.testing.assert_allclose(out["mean"], (k0 + k1) / 2)
    assert out["mean"].dtype == np.float64  # cast to the target's dtype
    assert sorted(reads) == ["encoder/layer_0/kernel", "encoder/layer_1/kernel"]  # layer_0 once for three consumers
    report = ckptcore.last_restore_report()
    assert report.computed["mean"] == ["encoder/layer_0/kernel", "encoder/layer_1/kernel"]


def test_multi_value_fn_from_nothing_and_scalar_sources(ck):
    path, _ = ck
    out = ckptcore.restore(path, {"fresh": np.empty(3, np.int32), "next_step": 0}, transforms=T(multi_value_fn={
        "fresh": (lambda saved, t: np.arange(t.shape[0]), []),
        "next_step": (lambda saved, t: saved["step"] + 1, ["step"]),
    }))
    np.testing.assert_array_equal(out["fresh"], [0, 1, 2])
    assert out["fresh"].dtype == np.int32
    assert out["next_step"] == 1001


def test_key_path_text_form():
    assert key_path_text(("encoder", "layer_0", "kernel")) == "encoder/layer_0/kernel"
    assert key_path_text(("opt", 0, "mu")) == "opt/0/mu"
    assert key_path_text(("a/b", "c\\d")) == "a\\/b/c\\\\d"
    assert key_path_text(()) == ""


def test_keys_with_slashes_lists_and_tuples(tmp_path):
    path = tmp_path / "ck"
    ckptcore.save(path, {"a/b": np.ones(2), "opt": [np.zeros(2), (np.full(2, 3.0),)]})
    out, report = ckptcore.restore(path, {"x": np.empty(2), "opt": [np.empty(2), (np.empty(2),)]},
                                   transforms=T(rename={r"^a\\/b$": "x"}), report=True)
    np.testing.assert_array_equal(out["x"], [1, 1])
    np.testing.assert_array_equal(out["opt"][1][0], [3, 3])
    assert isinstance(out["opt"][1], tuple)
    assert report.renamed == {"a\\/b": "x"}


def test_renames_that_swap_keys_are_fine(ck):
    path, state = ck
    target = {"encoder": {"layer_0": {"kernel": np.empty((8, 8), np.float32)}, "layer_1": {"kernel": np.empty((8, 8), np.float32)}}}
    out = ckptcore.restore(path, target, transforms=T(rename={"layer_0": "layer_1", "layer_1": "layer_0"}))
    np.testing.assert_array_equal(out["encoder"]["layer_0"]["kernel"], state["encoder"]["layer_1"]["kernel"])
    np.testing.assert_array_equal(out["encoder"]["layer_1"]["kernel"], state["encoder"]["layer_0"]["kernel"])


def test_plain_restore_leaves_a_plain_report(ck):
    path, _ = ck
    ckptcore.restore(path)
    report = ckptcore.last_restore_report()
    assert report.renamed == {} and report.computed == {} and report.leaves_read == 6
    assert report.url.endswith("pretrained")


# -- bad input ---------------------------------------------------------------------------


def test_a_transform_that_raises_names_the_key_and_changes_nothing(ck):
    path, _ = ck
    before = digest(path)

    def broken(saved, target):
        raise RuntimeError("boom")

    with pytest.raises(TransformError, match=r"value_fn of head/kernel raised RuntimeError: boom") as info:
        ckptcore.restore(path, bigger_target(), transforms=T(**{**FINE_TUNE, "value_fn": {"head/kernel": broken}}))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert digest(path) == before


def test_a_transform_returning_the_wrong_shape_names_the_key(ck):
    path, _ = ck
    with pytest.raises(TransformError, match=r"value_fn of head/kernel returned shape \(8, 3\), the target asks for \(8, 5\)"):
        ckptcore.restore(path, bigger_target(), transforms=T(**{**FINE_TUNE, "value_fn": {"head/kernel": lambda s, t: s}}))


def test_a_regex_matching_nothing_warns_and_is_an_error_with_unused_error(ck):
    path, _ = ck
    rename = {**FINE_TUNE["rename"], r"^decoder/(.*)": r"dec/\1"}
    _, report = ckptcore.restore(path, bigger_target(), transforms=T(**{**FINE_TUNE, "rename": rename}), report=True)
    assert report.warnings == [f"the rename pattern '^decoder/(.*)' matched nothing in {report.url}"]

    target = {k: v for k, v in pretrained().items() if k != "opt"} | {"opt": {"mu": np.empty((64, 64)), "count": 0}}
    target["encoder"] = pretrained()["encoder"]
    with pytest.raises(TransformError, match=r"with unused='error' these are errors:\n.*'\^decoder/\(\.\*\)' matched nothing"):
        ckptcore.restore(path, target, transforms=T(rename={r"^decoder/(.*)": r"dec/\1"}, unused="error"))


def test_unused_error_lists_the_saved_keys_the_target_does_not_use(ck):
    path, _ = ck
    with pytest.raises(TargetMismatchError, match=r"saved keys the target does not use.*\n  opt/mu\n  opt/count"):
        ckptcore.restore(path, bigger_target(), transforms=T(**FINE_TUNE, unused="error"))


def test_two_saved_keys_renamed_onto_one_is_an_error_naming_both(ck):
    path, _ = ck
    with pytest.raises(TransformError) as info:
        ckptcore.restore(path, bigger_target(), transforms=T(rename={r"layer_\d+": "layer"}))
    message = str(info.value)
    assert "encoder/layer_0/kernel and encoder/layer_1/kernel -> encoder/layer/kernel" in message
    assert "encoder/layer_0/bias and encoder/layer_1/bias -> encoder/layer/bias" in message


def test_missing_keys_are_listed_with_near_matches(ck):
    path, _ = ck
    target = bigger_target()
    with pytest.raises(TargetMismatchError) as info:
        ckptcore.restore(path, target, transforms=T(rename=FINE_TUNE["rename"], value_fn=FINE_TUNE["value_fn"]))
    message = str(info.value)
    assert re.search(r"encoder/blocks/2/kernel \(did you mean [^)]*encoder/blocks/0/kernel", message)
    assert "encoder/blocks/3/bias" in message and "missing='from_target'" in message


def test_from_target_needs_a_value_not_an_abstract_leaf(ck):
    path, _ = ck
    target = {"new": jax.ShapeDtypeStruct((3,), jnp.float32), "step": 0}
    with pytest.raises(TargetMismatchError, match=r"lacks whose target leaf is abstract.*\n  new"):
        ckptcore.restore(path, target, transforms=T(missing="from_target"))


def test_invalid_transforms_are_refused_when_built(ck):
    with pytest.raises(TransformError, match=r"'\(' is not a valid regular expression"):
        T(rename={"(": "x"})
    with pytest.raises(TransformError, match="missing='sometimes'"):
        T(missing="sometimes")
    with pytest.raises(TransformError, match="unused="):
        T(unused="warn")
    with pytest.raises(TransformError, match="must map a key path to"):
        T(multi_value_fn={"a": (lambda s, t: s, "b")})
    with pytest.raises(TransformError, match="in both value_fn and multi_value_fn"):
        T(value_fn={"a": lambda s, t: s}, multi_value_fn={"a": (lambda s, t: s, [])})
    path, _ = ck
    with pytest.raises(TransformError, match="needs a target"):
        ckptcore.restore(path, transforms=T())


def test_value_fn_key_not_in_the_target_is_a_warning(ck):
    path, _ = ck
    _, report = ckptcore.restore(path, bigger_target(), transforms=T(**{**FINE_TUNE, "value_fn": {
        **FINE_TUNE["value_fn"], "head/kernal": lambda s, t: s}}), report=True)
    assert report.warnings == ["the value_fn key 'head/kernal' is not a key path of the target"]


def test_shape_mismatch_of_a_renamed_leaf_names_the_target_key(ck):
    path, _ = ck
    target = bigger_target()
    target["encoder"]["blocks"]["0"]["kernel"] = np.empty((4, 8), np.float32)
    with pytest.raises(TargetMismatchError, match=re.escape("['encoder']['blocks']['0']['kernel']")):
        ckptcore.restore(path, target, transforms=T(**FINE_TUNE))


# -- JAX: any mesh, fallback sharding, pytree nodes ---------------------------------------


def test_jax_targets_on_another_mesh_with_padding_and_fallback_sharding(tmp_path, reads):
    saved_mesh = jax.make_mesh((4, 2), ("data", "model"), devices=jax.devices()[:8])
    rng = np.random.default_rng(1)
    w0, w1, head = (rng.normal(size=(64, 32)).astype(np.float32) for _ in range(3))
    state = {
        "layer_0": {"w": jax.device_put(w0, NamedSharding(saved_mesh, P("data", "model")))},
        "layer_1": {"w": jax.device_put(w1, NamedSharding(saved_mesh, P("data")))},
        "head": jax.device_put(head, NamedSharding(saved_mesh, P(None, "model"))),
        "unused": jax.device_put(np.ones((128, 128), np.float32), NamedSharding(saved_mesh, P("data"))),
    }
    path = tmp_path / "jax"
    ckptcore.save(path, state)
    reads.clear()

    new_mesh = jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices()[::-1])
    sharded = NamedSharding(new_mesh, P("data", "model"))
    fallback = NamedSharding(new_mesh, P("model"))
    target = {
        "blocks": [{"w": jax.ShapeDtypeStruct((64, 32), jnp.bfloat16, sharding=sharded)},
                   {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32)}],  # no sharding: the fallback
        "head": jax.ShapeDtypeStruct((64, 48), jnp.float32, sharding=sharded),
        "extra": jax.ShapeDtypeStruct((8,), jnp.float32),  # computed; no sharding: the fallback
    }
    out, report = ckptcore.restore(path, target, report=True, transforms=T(
        rename={r"^layer_(\d+)/w$": r"blocks/\1/w"},
        value_fn={"head": lambda saved, t: np.pad(saved, ((0, 0), (0, t.shape[1] - saved.shape[1])))},
        multi_value_fn={"extra": (lambda saved, t: np.full(t.shape, saved["layer_0/w"][0, 0]), ["layer_0/w"])},
        fallback_sharding=fallback,
    ))
    b0, b1 = out["blocks"]
    assert isinstance(b0["w"], jax.Array) and b0["w"].sharding == sharded and b0["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(b0["w"]), w0.astype(jnp.bfloat16))
    assert b1["w"].sharding == fallback
    np.testing.assert_array_equal(np.asarray(b1["w"]), w1)
    assert out["head"].sharding == sharded and out["head"].shape == (64, 48)
    np.testing.assert_array_equal(np.asarray(out["head"])[:, :32], head)
    assert not np.asarray(out["head"])[:, 32:].any()
    assert out["extra"].sharding == fallback
    np.testing.assert_array_equal(np.asarray(out["extra"]), np.full(8, w0[0, 0]))
    assert report.unused == ["unused"]
    assert "unused" not in reads  # never read
    assert reads.count("layer_0/w") == 2  # the plain resharding read onto the target + once, whole, for the multi_value_fn


def test_jax_without_fallback_a_computed_leaf_lands_on_one_device(tmp_path):
    path = tmp_path / "ck"
    ckptcore.save(path, {"w": np.arange(4.0)})
    out = ckptcore.restore(path, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}, transforms=T(value_fn={"w": lambda s, t: s + 1}))
    assert isinstance(out["w"], jax.Array) and isinstance(out["w"].sharding, SingleDeviceSharding)
    np.testing.assert_array_equal(np.asarray(out["w"]), [1, 2, 3, 4])


def test_pytree_node_targets(tmp_path):
    import dataclasses

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Model:
        encoder: dict
        head: jax.Array
        step: int

    path = tmp_path / "node"
    saved = Model(encoder={"l0": jnp.ones((4, 4))}, head=jnp.arange(4.0), step=3)
    ckptcore.save(path, saved)
    target = Model(encoder={"block0": jax.ShapeDtypeStruct((4, 4), jnp.float32)},
                   head=jax.ShapeDtypeStruct((6,), jnp.float32), step=0)
    out = ckptcore.restore(path, target, transforms=T(
        rename={"^encoder/l0$": "encoder/block0"}, value_fn={"head": lambda s, t: np.concatenate([s, np.zeros(2)])}))
    assert isinstance(out, Model)
    np.testing.assert_array_equal(np.asarray(out.encoder["block0"]), np.ones((4, 4)))
    np.testing.assert_array_equal(np.asarray(out.head), [0, 1, 2, 3, 0, 0])
    assert int(out.step) == 3


# -- the manager, another layout ----------------------------------------------------------


def test_manager_restore_with_transforms(tmp_path):
    root = tmp_path / "run"
    opts = ckptcore.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ckptcore.CheckpointManager(root, opts) as mgr:
        mgr.save(5, pretrained())
        mgr.save(6, ckptcore.Composite(state=pretrained(), config=ckptcore.Json({"lr": 1})))
        out = mgr.restore(5, bigger_target(), transforms=T(**FINE_TUNE))
        assert out["head"]["kernel"].shape == (8, 5)
        assert ckptcore.last_restore_report().renamed["encoder/layer_1/bias"] == "encoder/blocks/1/bias"

        both = mgr.restore(6, ckptcore.Composite(state=bigger_target(), config=None),
                           transforms={"state": T(**FINE_TUNE)})
        assert both.config == {"lr": 1} and both.state["head"]["kernel"].shape == (8, 5)
        report = ckptcore.last_restore_report()
        assert report.computed == {"state/head/kernel": ["state/head/kernel"]}
        assert "state/opt/mu" in report.unused


def test_orbax_written_checkpoint_through_the_layout_plugin(tmp_path):
    pytest.importorskip("ckptcore_orbax")
    ocp = pytest.importorskip("orbax.checkpoint")
    path = tmp_path / "orbax"
    state = {"layer_0": {"kernel": np.arange(12.0, dtype=np.float32).reshape(3, 4)}, "head": np.ones(3, np.float32)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, state)
        ckptr.wait_until_finished()
    target = {"blocks": {"0": {"kernel": np.empty((3, 4), np.float32)}}, "head": np.empty(5, np.float32)}
    out, report = ckptcore.restore(path, target, report=True, transforms=T(
        rename={r"^layer_(\d+)/": r"blocks/\1/"}, value_fn={"head": lambda s, t: np.pad(s, (0, 2))}))
    np.testing.assert_array_equal(out["blocks"]["0"]["kernel"], state["layer_0"]["kernel"])
    np.testing.assert_array_equal(out["head"], [1, 1, 1, 0, 0])
    assert report.renamed == {"layer_0/kernel": "blocks/0/kernel"}
