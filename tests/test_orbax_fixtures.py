"""Checkpoints written by orbax-checkpoint 0.5.21 stay readable (tests/data/orbax_0_5_21/, made by generate.py there).

Nothing here needs orbax-checkpoint: the fixtures are committed, with the script and the
pinned versions that wrote them. Also the older msgpack ``checkpoint`` file, built from
the same fixture the way orbax and Flax wrote it.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest

import ckptcore
from ckptcore.errors import CorruptCheckpointError

pytest.importorskip("ckptcore_orbax")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DATA = Path(__file__).with_name("data") / "orbax_0_5_21"


def _generator():
    spec = importlib.util.spec_from_file_location("orbax_0_5_21_generate", DATA / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()


def test_fixtures_are_small_and_pinned():
    size = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert size < 1 << 20, size
    assert "orbax-checkpoint==0.5.21" in (DATA / "requirements.txt").read_text()


def assert_tree_equal(expected, actual, path=""):
    if isinstance(expected, dict):
        assert sorted(expected) == sorted(actual), path
        for k in expected:
            assert_tree_equal(expected[k], actual[k], f"{path}.{k}")
    elif isinstance(expected, list):
        assert len(expected) == len(actual), path
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_tree_equal(e, a, f"{path}[{i}]")
    else:
        assert np.asarray(actual).dtype == expected.dtype, path
        np.testing.assert_array_equal(np.asarray(actual), expected, err_msg=path)


@pytest.mark.parametrize("name", ["pytree_ocdbt", "pytree_no_ocdbt"])
def test_0_5_21_items(name):
    assert ckptcore.info(DATA / name).layout == "orbax"
    back = ckptcore.restore(DATA / name)
    assert_tree_equal(GEN.expected_numpy(), {k: back[k] for k in GEN.expected_numpy()})
    np.testing.assert_array_equal(np.asarray(back["sharded"]), GEN.sharded_values())
    np.testing.assert_array_equal(np.asarray(back["key"]), np.asarray([0, 3], np.uint32))  # PRNGKey(3)
    assert np.asarray(back["bf16"]).dtype.name == "bfloat16"
    assert back["int_scalar"] == 7 and type(back["int_scalar"]) is int
    assert back["float_scalar"] == 2.5 and back["text"] == "hello orbax" and back["nothing"] is None
    assert back["nested"]["empty"] == {}


@pytest.mark.parametrize("name", ["pytree_ocdbt", "pytree_no_ocdbt"])
def test_0_5_21_sharded_onto_another_mesh(name):
    jax = pytest.importorskip("jax")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("a", "b"))
    target = {"sharded": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=NamedSharding(mesh, P("b", "a")))}
    back = ckptcore.restore(DATA / name, target, partial=True)
    assert back["sharded"].sharding == target["sharded"].sharding
    np.testing.assert_array_equal(np.asarray(back["sharded"]), GEN.sharded_values())
    meta = ckptcore.metadata(DATA / name)
    assert meta["sharded"].shape == (8, 8)


def test_0_5_21_manager_root(tmp_path):
    root = tmp_path / "run"
    shutil.copytree(DATA / "manager", root)
    opts = ckptcore.CheckpointManagerOptions(max_to_keep=2, best_fn=lambda m: m["loss"], best_mode="min",
                                             enable_async_checkpointing=False)
    with ckptcore.CheckpointManager(root, opts) as mgr:
        assert mgr.all_steps() == [2, 3] and mgr.metrics(3) == {"loss": 0.7} and mgr.best_step() == 2
        back = mgr.restore(3)
        assert back.extra == {"step": 3, "note": "x"} and back.state["step"] == 3
        np.testing.assert_array_equal(back.state["w"], np.full((2, 3), 3, np.float32))
        mgr.save(4, ckptcore.Composite(state={"w": np.zeros((2, 3), np.float32), "step": 4}), metrics={"loss": 0.6})
        assert mgr.all_steps() == [2, 4]


def test_0_5_21_convert(tmp_path):
    report = ckptcore.convert(DATA / "pytree_ocdbt", tmp_path / "ck", max_bytes_in_flight=128)
    assert report.batches > 2
    back = ckptcore.restore(tmp_path / "ck")
    assert_tree_equal(GEN.expected_numpy(), {k: back[k] for k in GEN.expected_numpy()})
    assert back["text"] == "hello orbax"


# -- the older msgpack ``checkpoint`` file ----------------------------------------------------


def _nd(array: np.ndarray) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb((array.shape, array.dtype.name, array.tobytes()), use_bin_type=True))


def legacy_item(tmp_path: Path, tree: dict) -> Path:
    """An item of the layout before ``_METADATA``: the tree in msgpack, arrays as placeholders of zarr arrays."""
    path = tmp_path / "legacy"
    shutil.copytree(DATA / "pytree_aggregate", path)
    (path / "_METADATA").unlink()
    (path / "checkpoint").write_bytes(msgpack.packb(tree, use_bin_type=True))
    return path


def test_legacy_msgpack_checkpoint(tmp_path):
    inline = np.arange(6, dtype=np.int16).reshape(2, 3)
    path = legacy_item(tmp_path, {
        "a": "PLACEHOLDER://a", "s": 3, "f": 0.25, "t": "agg", "n": {"x": "PLACEHOLDER://n.x"},
        "inline": _nd(inline), "np_scalar": msgpack.ExtType(3, _nd(np.array(1.5, np.float32)).data),
        "c": msgpack.ExtType(2, msgpack.packb((1.0, -2.0))), "none": None, "empty": {},
    })
    back = ckptcore.restore(path)
    np.testing.assert_array_equal(back["a"], np.arange(4, dtype=np.int32))
    np.testing.assert_array_equal(back["n"]["x"], np.ones(2, np.float32))
    np.testing.assert_array_equal(back["inline"], inline)
    assert back["s"] == 3 and back["f"] == 0.25 and back["t"] == "agg" and back["np_scalar"] == 1.5
    assert back["c"] == complex(1, -2) and back["none"] is None and back["empty"] == {}
    part = ckptcore.restore(path, {"inline": np.empty((2, 3), np.float64)}, partial=True)
    assert part["inline"].dtype == np.float64
    ckptcore.convert(path, tmp_path / "ck")
    np.testing.assert_array_equal(ckptcore.restore(tmp_path / "ck")["inline"], inline)


@pytest.mark.parametrize("bad", [
    msgpack.ExtType(99, b"anything"),  # an unknown extension type: never interpreted
    msgpack.ExtType(1, msgpack.packb(((2,), "object", b"\x00" * 16))),  # object arrays are refused
    msgpack.ExtType(1, msgpack.packb(((2,), "__import__('os')", b""))),  # a dtype name is never evaluated
])
def test_legacy_msgpack_refuses_anything_but_data(tmp_path, bad):
    path = legacy_item(tmp_path, {"a": "PLACEHOLDER://a", "bad": bad})
    with pytest.raises(CorruptCheckpointError, match="msgpack 'checkpoint' file") as err:
        ckptcore.restore(path)
    assert str(path) in str(err.value)
    with pytest.raises(CorruptCheckpointError):
        ckptcore.convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
