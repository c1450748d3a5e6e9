"""Checkpoints written by ckptcore 0.1.0 still restore exactly (tests/data/v0_1_0).

The fixtures were written by ckptcore 0.1.0 (see tests/data/v0_1_0/README.md and
make_fixtures.py); the expected values are recomputed here from the same formulas
(tests/data/v0_1_0/expected.py). Only the public API is used: ``import ckptcore``.
Every fixture is copied to ``tmp_path`` first: nothing is written under tests/data.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptcore

DATA = Path(__file__).resolve().parent / "data" / "v0_1_0"


def _load_expected() -> Any:
    name = "ckptcore_compat_v0_1_0_expected"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DATA / "expected.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ under tests/data
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = saved
    return module


E = _load_expected()


def copy_fixture(name: str, tmp_path: Path) -> Path:
    dest = tmp_path / name
    shutil.copytree(DATA / name, dest)
    return dest


# -- exact comparison ------------------------------------------------------------------------


def is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def assert_array_exact(actual: Any, expected: np.ndarray, where: str) -> None:
    assert type(actual) is np.ndarray, f"{where}: {type(actual)} is not a numpy array"
    assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
    # bit for bit: -0.0, inf, nan and bfloat16 included
    assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes(), (
        f"{where}: values differ:\n{actual!r}\n!=\n{expected!r}"
    )


def assert_same(actual: Any, expected: Any, where: str = "root", *, same_namedtuple_class: bool = False) -> None:
    """Equal values, dtypes, shapes, container types, key types and key order."""
    if isinstance(expected, np.ndarray):
        assert_array_exact(actual, expected, where)
    elif isinstance(expected, np.generic):
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        assert actual.tobytes() == expected.tobytes(), f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, dict):
        assert type(actual) is dict, f"{where}: {type(actual)} is not a dict"
        assert [(type(k), k) for k in actual] == [(type(k), k) for k in expected], (
            f"{where}: keys {list(actual)} != {list(expected)}"
        )
        for k in expected:
            assert_same(actual[k], expected[k], f"{where}[{k!r}]", same_namedtuple_class=same_namedtuple_class)
    elif is_namedtuple(expected):
        if same_namedtuple_class:
            assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        else:
            assert is_namedtuple(actual), f"{where}: {type(actual)} is not a namedtuple"
            assert type(actual).__name__ == type(expected).__name__, f"{where}: {type(actual).__name__}"
        assert actual._fields == expected._fields, f"{where}: fields {actual._fields} != {expected._fields}"
        for field in expected._fields:
            assert_same(getattr(actual, field), getattr(expected, field), f"{where}.{field}",
                        same_namedtuple_class=same_namedtuple_class)
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{i}]", same_namedtuple_class=same_namedtuple_class)
    elif expected is None:
        assert actual is None, f"{where}: {actual!r} is not None"
    elif isinstance(expected, float):
        assert type(actual) is float and actual.hex() == expected.hex(), f"{where}: {actual!r} != {expected!r}"
    else:  # int, bool, str, bytes
        assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r} != {expected!r}"


def assert_metadata(meta: Any, expected: Any, where: str = "root") -> None:
    """The metadata tree has the saved structure; each array leaf its shape and dtype."""
    if isinstance(expected, np.ndarray):
        assert tuple(meta.shape) == expected.shape, f"{where}: shape {meta.shape} != {expected.shape}"
        assert np.dtype(meta.dtype) == expected.dtype, f"{where}: dtype {meta.dtype} != {expected.dtype}"
    elif isinstance(expected, dict):
        assert type(meta) is dict and [(type(k), k) for k in meta] == [(type(k), k) for k in expected], where
        for k in expected:
            assert_metadata(meta[k], expected[k], f"{where}[{k!r}]")
    elif is_namedtuple(expected):
        assert is_namedtuple(meta) and meta._fields == expected._fields, where
        for field in expected._fields:
            assert_metadata(getattr(meta, field), getattr(expected, field), f"{where}.{field}")
    elif isinstance(expected, (list, tuple)):
        assert type(meta) is type(expected) and len(meta) == len(expected), where
        for i, (m, e) in enumerate(zip(meta, expected, strict=True)):
            assert_metadata(m, e, f"{where}[{i}]")
    elif expected is None:
        assert meta is None, where
    # inline scalars: the metadata carries their values (checked through restore)


# -- NumPy, zarr3 ----------------------------------------------------------------------------


def test_numpy_fixture_restores_exactly(tmp_path: Path) -> None:
    path = copy_fixture("numpy", tmp_path)
    expected = E.numpy_tree()
    assert_same(ckptcore.restore(path), expected)
    assert_same(ckptcore.restore(str(path)), expected)
    # With a target (the expected tree itself): the target's own namedtuple class comes back.
    assert_same(ckptcore.restore(path, target=E.numpy_tree()), expected, same_namedtuple_class=True)
    meta = ckptcore.metadata(path)
    assert_metadata(meta, expected)
    assert meta["f32"].dtype == np.float32 and meta["bf16"].shape == (4, 4) and meta["empty"].shape == (0, 3)


def test_numpy_fixture_partial_restore(tmp_path: Path) -> None:
    path = copy_fixture("numpy", tmp_path)
    expected = E.numpy_tree()
    part = ckptcore.restore(path, target={"u64": np.empty((6,), np.uint64),
                                          "nested": {"c/d": {"e.f/g": np.empty((2, 2), np.float16)}}}, partial=True)
    assert_array_exact(part["u64"], expected["u64"], "u64")
    assert_array_exact(part["nested"]["c/d"]["e.f/g"], expected["nested"]["c/d"]["e.f/g"], "e.f/g")


def test_zarr3_fixture_restores_exactly(tmp_path: Path) -> None:
    path = copy_fixture("zarr3", tmp_path)
    expected = E.zarr3_tree()
    assert_same(ckptcore.restore(path), expected)
    meta = ckptcore.metadata(path)
    assert_metadata(meta, expected)
    assert meta["f32"].format == "zarr3"


def _flip_byte(path: Path, position: int) -> None:
    """Flip every bit of byte ``position`` of the checkpoint's (one) array data file."""
    data_files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != "ckptcore_index.json"
                        and p.name != "manifest.ocdbt")
    assert len(data_files) == 1, data_files
    raw = bytearray(data_files[0].read_bytes())
    raw[position] ^= 0xFF
    data_files[0].write_bytes(bytes(raw))


# Byte positions inside array data in the 0.1.0 data file: the first leaf ("f32") and the
# middle of "u64" (0.1.0 packs small arrays into one value; the gaps between them are padding).
@pytest.mark.parametrize(("fixture", "position"), [("numpy", 0), ("numpy", 309), ("zarr3", 0), ("zarr3", 197)])
def test_flipped_byte_in_0_1_0_data_is_detected(tmp_path: Path, fixture: str, position: int) -> None:
    """The checksums 0.1.0 stored are still verified: damage raises, never returns wrong data."""
    path = copy_fixture(fixture, tmp_path)
    _flip_byte(path, position)
    with pytest.raises((ckptcore.errors.ChecksumMismatchError, ckptcore.errors.CorruptCheckpointError)) as info:
        ckptcore.restore(path)
    assert isinstance(info.value, ckptcore.errors.CheckpointError)


# -- JAX -----------------------------------------------------------------------------------------


@pytest.fixture
def jax8() -> Any:
    jax = pytest.importorskip("jax")
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return jax


def assert_jax_exact(actual: Any, expected: np.ndarray, where: str, *, mesh_shape: dict[str, int] | None = None,
                     spec: Any = None) -> None:
    import jax

    assert isinstance(actual, jax.Array), f"{where}: {type(actual)} is not a jax.Array"
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (where, actual.dtype, actual.shape)
    if mesh_shape is not None:
        assert isinstance(actual.sharding, jax.sharding.NamedSharding), (where, actual.sharding)
        assert dict(actual.sharding.mesh.shape) == mesh_shape, (where, actual.sharding)
        assert tuple(actual.sharding.spec) == tuple(spec), (where, actual.sharding.spec)
    for shard in actual.addressable_shards:
        assert_array_exact(np.asarray(shard.data), expected[shard.index], f"{where} shard {shard.index}")
    assert_array_exact(np.asarray(actual), expected, where)


def test_jax_sharded_fixture_restores_on_saved_and_other_mesh(tmp_path: Path, jax8: Any) -> None:
    jax = jax8
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    path = copy_fixture("jax_sharded", tmp_path)
    key = E.prng_key(jax)
    saved_mesh = {"data": 4, "model": 2}

    # No target: the saved (4, 2) mesh and partition specs.
    back = ckptcore.restore(path)
    assert list(back) == ["w", "half", "replicated", "key", "step"]
    assert_jax_exact(back["w"], E.sharded_w(), "w", mesh_shape=saved_mesh, spec=P("data", "model"))
    assert_jax_exact(back["half"], E.sharded_half(), "half", mesh_shape=saved_mesh, spec=P("data", None))
    assert_jax_exact(back["replicated"], E.sharded_replicated(), "replicated", mesh_shape=saved_mesh, spec=P())
    assert jax.dtypes.issubdtype(back["key"].dtype, jax.dtypes.prng_key), back["key"].dtype
    assert str(jax.random.key_impl(back["key"])) == str(jax.random.key_impl(key))
    assert_array_exact(np.asarray(jax.random.key_data(back["key"])), np.asarray(jax.random.key_data(key)), "key")
    assert type(back["step"]) is int and back["step"] == 5

    # Onto the saved mesh, given explicitly.
    mesh42 = jax.make_mesh((4, 2), ("data", "model"))
    target42 = {
        "w": jax.ShapeDtypeStruct((8, 16), np.float32, sharding=NamedSharding(mesh42, P("data", "model"))),
        "half": jax.ShapeDtypeStruct((8, 4), E.sharded_half().dtype, sharding=NamedSharding(mesh42, P("data", None))),
        "replicated": jax.ShapeDtypeStruct((3, 5), np.int32, sharding=NamedSharding(mesh42, P())),
        "key": None,
        "step": None,
    }
    back42 = ckptcore.restore(path, target42)
    assert_jax_exact(back42["w"], E.sharded_w(), "w@4x2", mesh_shape=saved_mesh, spec=P("data", "model"))
    assert_jax_exact(back42["half"], E.sharded_half(), "half@4x2", mesh_shape=saved_mesh, spec=P("data", None))

    # Onto a different (2, 4) mesh, other specs too.
    mesh24 = jax.make_mesh((2, 4), ("data", "model"))
    other = {"data": 2, "model": 4}
    target24 = {
        "w": jax.ShapeDtypeStruct((8, 16), np.float32, sharding=NamedSharding(mesh24, P("data", "model"))),
        "half": jax.ShapeDtypeStruct((8, 4), E.sharded_half().dtype, sharding=NamedSharding(mesh24, P(None, "model"))),
        "replicated": jax.ShapeDtypeStruct((3, 5), np.int32, sharding=NamedSharding(mesh24, P())),
        "key": key,
        "step": None,
    }
    back24 = ckptcore.restore(path, target24)
    assert_jax_exact(back24["w"], E.sharded_w(), "w@2x4", mesh_shape=other, spec=P("data", "model"))
    assert_jax_exact(back24["half"], E.sharded_half(), "half@2x4", mesh_shape=other, spec=P(None, "model"))
    assert_jax_exact(back24["replicated"], E.sharded_replicated(), "replicated@2x4", mesh_shape=other, spec=P())
    assert_array_exact(np.asarray(jax.random.key_data(back24["key"])), np.asarray(jax.random.key_data(key)), "key")

    # Metadata: shapes, dtypes, logical sharding.
    meta = ckptcore.metadata(path)
    assert (meta["w"].shape, np.dtype(meta["w"].dtype)) == ((8, 16), np.float32)
    assert (meta["half"].shape, np.dtype(meta["half"].dtype)) == ((8, 4), E.sharded_half().dtype)
    assert (meta["replicated"].shape, np.dtype(meta["replicated"].dtype)) == ((3, 5), np.int32)
    assert meta["w"].sharding["type"] == "named"
    assert list(meta["w"].sharding["spec"]) == ["data", "model"]
    assert dict(zip(meta["w"].sharding["mesh"]["axis_names"], meta["w"].sharding["mesh"]["axis_sizes"],
                    strict=True)) == saved_mesh
    assert list(meta["half"].sharding["spec"]) == ["data", None]
    assert list(meta["replicated"].sharding["spec"]) == []
    assert meta["step"] == 5


def test_multiprocess_fixture_restores_in_one_process(tmp_path: Path, jax8: Any) -> None:
    jax = jax8
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    path = copy_fixture("multiprocess", tmp_path)
    # written by 2 processes: one data directory per process (the 0.1.0 layout)
    assert (path / "ocdbt" / "process_0").is_dir() and (path / "ocdbt" / "process_1").is_dir()
    saved_mesh = {"data": 4, "model": 2}
    back = ckptcore.restore(path)
    assert list(back) == ["w", "b", "r", "host", "step"]
    assert_jax_exact(back["w"], E.mp_w(), "w", mesh_shape=saved_mesh, spec=P("data", "model"))
    assert_jax_exact(back["b"], E.mp_b(), "b", mesh_shape=saved_mesh, spec=P("model"))
    assert_jax_exact(back["r"], E.mp_r(), "r", mesh_shape=saved_mesh, spec=P())
    assert_array_exact(back["host"], E.mp_host(), "host")
    assert type(back["step"]) is int and back["step"] == 2

    mesh24 = jax.make_mesh((2, 4), ("data", "model"))
    target = {
        "w": jax.ShapeDtypeStruct((16, 8), np.float32, sharding=NamedSharding(mesh24, P("model", "data"))),
        "b": jax.ShapeDtypeStruct((8,), np.int32, sharding=NamedSharding(mesh24, P("model"))),
        "r": jax.ShapeDtypeStruct((3, 3), np.float32, sharding=NamedSharding(mesh24, P())),
        "host": np.zeros(6, np.int64),
        "step": None,
    }
    other = ckptcore.restore(path, target)
    assert_jax_exact(other["w"], E.mp_w(), "w@2x4", mesh_shape={"data": 2, "model": 4}, spec=P("model", "data"))
    assert_jax_exact(other["b"], E.mp_b(), "b@2x4", mesh_shape={"data": 2, "model": 4}, spec=P("model"))
    assert_jax_exact(other["r"], E.mp_r(), "r@2x4", mesh_shape={"data": 2, "model": 4}, spec=P())
    assert_array_exact(other["host"], E.mp_host(), "host")

    meta = ckptcore.metadata(path)
    assert (meta["w"].shape, np.dtype(meta["w"].dtype)) == ((16, 8), np.float32)
    assert (meta["b"].shape, np.dtype(meta["b"].dtype)) == ((8,), np.int32)
    assert (meta["r"].shape, np.dtype(meta["r"].dtype)) == ((3, 3), np.float32)
    assert (meta["host"].shape, np.dtype(meta["host"].dtype)) == ((6,), np.int64)
    assert list(meta["w"].sharding["spec"]) == ["data", "model"]


# -- manager root ----------------------------------------------------------------------------


def _check_manager_steps(mgr: Any) -> None:
    for step in E.MANAGER_STEPS:
        assert mgr.metrics(step) == E.manager_metrics(step), step
        for name, value in E.manager_metrics(step).items():
            assert type(mgr.metrics(step)[name]) is float and mgr.metrics(step)[name].hex() == value.hex()
        restored = mgr.restore(step)
        if step == E.MANAGER_COMPOSITE_STEP:
            item = E.manager_item(step)
            assert isinstance(restored, ckptcore.Composite), type(restored)
            assert sorted(restored) == ["meta", "state"]
            assert_same(restored["state"], item["state"], f"step {step} state")
            assert_same(restored.meta, item["meta"], f"step {step} meta")
            only_meta = mgr.restore(step, ckptcore.Composite(meta=None))
            assert list(only_meta) == ["meta"]
            assert_same(only_meta["meta"], item["meta"], f"step {step} meta only")
        else:
            assert not isinstance(restored, ckptcore.Composite)
            assert_same(restored, E.manager_state(step), f"step {step}")


def test_manager_root_fixture(tmp_path: Path) -> None:
    root = copy_fixture("manager_root", tmp_path)
    opts = ckptcore.CheckpointManagerOptions(read_only=True)
    with ckptcore.CheckpointManager(root, opts) as mgr:
        assert mgr.all_steps() == list(E.MANAGER_STEPS)
        assert mgr.latest_step() == E.MANAGER_STEPS[-1]
        assert mgr.metadata() == E.MANAGER_METADATA
        _check_manager_steps(mgr)
        latest = mgr.restore()  # the latest step, 30: the composite one
        assert isinstance(latest, ckptcore.Composite)
        assert_same(latest["state"], E.manager_state(E.MANAGER_STEPS[-1]), "latest")
        target = {"params": {"w": np.empty((3, 4), np.float32), "b": np.empty(4, np.int32)}, "step": 0, "tag": ""}
        assert_same(mgr.restore(10, target), E.manager_state(10), "step 10 with target")


def test_manager_root_fixture_continues_with_new_steps(tmp_path: Path) -> None:
    """Today's manager keeps writing into a 0.1.0 root without harming its steps."""
    root = copy_fixture("manager_root", tmp_path)
    opts = ckptcore.CheckpointManagerOptions(max_to_keep=1000, enable_async_checkpointing=False)
    with ckptcore.CheckpointManager(root, opts) as mgr:
        assert mgr.all_steps() == list(E.MANAGER_STEPS)
        assert mgr.save(40, E.manager_state(40), metrics=E.manager_metrics(40))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [*E.MANAGER_STEPS, 40]
    with ckptcore.CheckpointManager(root, ckptcore.CheckpointManagerOptions(read_only=True)) as mgr:
        assert mgr.all_steps() == [*E.MANAGER_STEPS, 40]
        _check_manager_steps(mgr)
        assert_same(mgr.restore(40), E.manager_state(40), "step 40")
        assert mgr.metrics(40) == E.manager_metrics(40)


# -- object store ---------------------------------------------------------------------------------


def _upload(s3_server: Any, bucket: str, *, skip: tuple[str, ...] = (), prefix: str = "") -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    base = DATA / "object_store"
    keys = []
    for file in sorted(p for p in base.rglob("*") if p.is_file()):
        if file.name in skip:
            continue
        key = prefix + file.relative_to(base).as_posix()
        client.put_object(Bucket=bucket, Key=key, Body=file.read_bytes())
        keys.append(key)
    return keys


def test_object_store_fixture_restores_from_s3(s3_server: Any, s3_bucket: str) -> None:
    keys = _upload(s3_server, s3_bucket)
    assert "run/ckpt/ckptcore_commit.json" in keys, keys
    url = f"s3://{s3_bucket}/run/ckpt"
    expected = E.object_store_tree()
    assert_same(ckptcore.restore(url), expected)
    meta = ckptcore.metadata(url)
    assert_metadata(meta, expected)
    assert (meta["w"].shape, np.dtype(meta["w"].dtype)) == ((8, 8), np.float32)
    assert (meta["bf16"].shape, np.dtype(meta["bf16"].dtype)) == ((10,), expected["bf16"].dtype)


def test_object_store_fixture_without_commit_marker_is_not_restored(s3_server: Any, s3_bucket: str) -> None:
    """0.1.0 committed an object-store checkpoint with its marker: without it there is no checkpoint."""
    _upload(s3_server, s3_bucket, skip=("ckptcore_commit.json",))
    with pytest.raises((ckptcore.errors.NotCommittedError, ckptcore.errors.CheckpointNotFoundError)):
        ckptcore.restore(f"s3://{s3_bucket}/run/ckpt")


def test_fixtures_are_small_and_hold_no_pickle() -> None:
    files = [p for p in DATA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in files) < 2 * 1024 * 1024
    assert not [p for p in files if p.suffix in (".pkl", ".pickle", ".npy", ".npz")]
