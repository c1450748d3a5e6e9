"""orbax-checkpoint's checkpoints, written here by the installed orbax-checkpoint, read by ckptcore (issue 13).

orbax-checkpoint is a test dependency only: ckptcore and ckptcore-orbax never import it.
Every checkpoint is restored by ckptcore onto other meshes and compared exactly with what
orbax saved (and, where it helps, with what orbax itself restores).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptcore
from ckptcore.errors import (
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    NotCommittedError,
    TargetMismatchError,
    UnsupportedLeafError,
)

jax = pytest.importorskip("jax")
ocp = pytest.importorskip("orbax.checkpoint")
pytest.importorskip("ckptcore_orbax")

import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DTYPES = ["float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "uint16",
          "uint32", "uint64", "bool", "complex64", "float8_e4m3fn"]


def mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> Any:
    return jax.make_mesh(shape, names, devices=jax.devices()[: int(np.prod(shape))])


def values(dtype: str, shape: tuple[int, ...] = (4, 6)) -> np.ndarray:
    import ml_dtypes

    dt = np.dtype(getattr(ml_dtypes, dtype)) if dtype in ("bfloat16", "float8_e4m3fn") else np.dtype(dtype)
    raw = np.arange(int(np.prod(shape))).reshape(shape)
    if dt == np.bool_:
        return raw % 3 == 0
    if dt.kind == "c":
        return (raw + 1j * raw[::-1]).astype(dt)
    return (raw % 100).astype(dt)


def sharded(array: np.ndarray, m: Any, spec: P) -> Any:
    return jax.device_put(jnp.asarray(array), NamedSharding(m, spec))


def numpy_state() -> dict[str, Any]:
    return {
        **{f"np_{d}": values(d) for d in DTYPES},
        "nested": {"w": np.arange(10, dtype=np.float32), "deeper": {"b": np.ones((2, 2), np.int32)}},
        "seq": [np.zeros(3, np.uint8), np.full((1, 2), 5, np.int64)],
    }


def jax_state(m: Any) -> dict[str, Any]:
    return {
        "w": sharded(np.arange(8 * 16, dtype=np.float32).reshape(8, 16), m, P("x", "y")),
        "rows": sharded(np.arange(8 * 4, dtype=np.int32).reshape(8, 4), m, P("x", None)),
        "repl": sharded(np.linspace(0, 1, 12).astype(np.float32), m, P()),
        "bf16": sharded(values("bfloat16", (8, 2)), m, P("x", None)),
        "scalar_array": jnp.float32(3.5),
        "key": jax.random.key(7),
        "old_key": jax.random.PRNGKey(9),
    }


def extras() -> dict[str, Any]:
    return {"step": 12, "lr": 0.25, "flag": True, "text": "hello, orbax", "nothing": None, "empty": {}}


def assert_same(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), (path, a, b)
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
        return
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
        return
    if a is None or isinstance(a, (str, int, float, bool)):
        assert a == b and type(a) is type(b), (path, a, b)
        return
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        assert jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key), path
        assert str(jax.random.key_impl(a)) == str(jax.random.key_impl(b)), path
        a, b = jax.random.key_data(a), jax.random.key_data(b)
    assert np.asarray(a).dtype == np.asarray(b).dtype, (path, np.asarray(a).dtype, np.asarray(b).dtype)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Checkpoints written by orbax-checkpoint: StandardCheckpointer (OCDBT), PyTreeCheckpointer (OCDBT off, zarr3)."""
    root = tmp_path_factory.mktemp("orbax")
    m = mesh((4, 2), ("x", "y"))
    arrays = {**numpy_state(), **jax_state(m)}
    full = {**arrays, **extras()}
    out: dict[str, Any] = {"arrays": arrays, "full": full, "mesh": m}
    with ocp.StandardCheckpointer() as ck:
        ck.save(root / "standard", {**arrays, "step": 12, "lr": 0.25})
    out["standard"] = root / "standard"
    for name, kwargs in {"pytree_ocdbt": {"use_ocdbt": True}, "pytree_plain": {"use_ocdbt": False},
                         "pytree_zarr3": {"use_ocdbt": False, "use_zarr3": True},
                         "pytree_ocdbt_zarr3": {"use_ocdbt": True, "use_zarr3": True}}.items():
        ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**kwargs)).save(root / name, full)
        out[name] = root / name
    return out


PYTREES = ["pytree_ocdbt", "pytree_plain", "pytree_zarr3", "pytree_ocdbt_zarr3"]


@pytest.mark.parametrize("name", ["standard", *PYTREES])
def test_restore_without_target_equals_what_orbax_saved(written, name):
    info = ckptcore.info(written[name])
    assert (info.layout, info.layout_description) == ("orbax", "orbax-checkpoint layout")
    back = ckptcore.restore(written[name])
    expected = written["full"] if name != "standard" else {**written["arrays"], "step": 12, "lr": 0.25}
    assert_same(expected, back)
    # the saved (4, 2) logical sharding comes back, without any device id from the file
    assert back["w"].sharding.spec == P("x", "y") and back["w"].sharding.mesh.axis_sizes == (4, 2)


@pytest.mark.parametrize("name", ["standard", "pytree_plain", "pytree_zarr3"])
@pytest.mark.parametrize("shape,spec", [((2, 4), P("y", "x")), ((8,), P("x", None)), ((1,), P())])
def test_restore_onto_other_meshes(written, name, shape, spec):
    names = ("x", "y")[: len(shape)]
    m = mesh(shape, names)
    arrays = written["arrays"]
    target = jax.tree.map(lambda x: x, {k: v for k, v in arrays.items() if k in ("w", "rows", "bf16", "key")})
    abstract = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(m, spec if v.ndim == 2 else P()))
        for k, v in target.items()
    }
    back = ckptcore.restore(written[name], target=abstract, partial=True)
    assert sorted(back) == sorted(abstract)
    for k, v in back.items():
        assert v.sharding == abstract[k].sharding, k
        assert_same(arrays[k], v, k)


def test_resharding_reads_only_the_regions_each_device_needs(tmp_path, monkeypatch):
    from ckptcore_orbax import arrays as orbax_arrays

    big = np.arange(1024 * 512, dtype=np.float32).reshape(1024, 512)  # above the read-whole threshold
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "big", {"w": sharded(big, mesh((4, 2), ("x", "y")), P("x", "y"))})
    seen: list[Any] = []
    original = orbax_arrays.OrbaxArrays.read

    def spy(self, location, requests, options):
        seen.extend(requests)
        return original(self, location, requests, options)

    monkeypatch.setattr(orbax_arrays.OrbaxArrays, "read", spy)
    m = mesh((2, 4), ("x", "y"))
    target = {"w": jax.ShapeDtypeStruct(big.shape, jnp.float32, sharding=NamedSharding(m, P("x", "y")))}
    back = ckptcore.restore(tmp_path / "big", target=target)
    np.testing.assert_array_equal(np.asarray(back["w"]), big)
    assert back["w"].sharding == target["w"].sharding
    (request,) = seen
    # 8 devices, one distinct (512, 128) block each: never the whole array as one read
    assert len(request.regions) == 8
    assert {tuple(s.stop - s.start for s in r) for r in request.regions} == {(512, 128)}


def test_regions_are_read_into_buffers_jax_cpu_devices_adopt(tmp_path, monkeypatch):
    from ckptcore_orbax import arrays as orbax_arrays

    big = np.arange(1024 * 512, dtype=np.float32).reshape(1024, 512)
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "big", {"w": sharded(big, mesh((4, 2), ("x", "y")), P("x", "y"))})
    results: list[Any] = []
    original = orbax_arrays.OrbaxArrays.read

    def spy(self, location, requests, options):
        out = original(self, location, requests, options)
        results.extend(a for arrays in out for a in arrays)
        return out

    monkeypatch.setattr(orbax_arrays.OrbaxArrays, "read", spy)
    target = {"w": jax.ShapeDtypeStruct(big.shape, jnp.float32,
                                        sharding=NamedSharding(mesh((4, 2), ("x", "y")), P("x", "y")))}
    back = ckptcore.restore(tmp_path / "big", target=target)
    np.testing.assert_array_equal(np.asarray(back["w"]), big)
    assert len(results) == 8
    # 64-byte aligned and C-contiguous: a CPU device adopts each as it is, no second copy
    assert all(a.ctypes.data % 64 == 0 and a.flags.c_contiguous for a in results)


def test_metadata_from_orbax_metadata_alone(written):
    meta = ckptcore.metadata(written["pytree_ocdbt"])
    assert meta["w"].shape == (8, 16) and meta["w"].dtype == np.float32
    assert meta["np_bfloat16"].dtype.name == "bfloat16" and meta["np_float8_e4m3fn"].shape == (4, 6)
    assert meta["text"] == "hello, orbax" and meta["step"] == 12 and meta["nothing"] is None and meta["empty"] == {}
    info = ckptcore.info(written["pytree_ocdbt"])
    assert info.total_bytes == sum(
        np.asarray(v).nbytes if not jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) else 8
        for v in jax.tree.leaves(written["arrays"])
    )


def test_partial_restore_casts_and_mismatches(written):
    part = ckptcore.restore(written["pytree_plain"], target={"nested": {"w": np.empty(10, np.float64)}}, partial=True)
    assert part["nested"]["w"].dtype == np.float64
    np.testing.assert_array_equal(part["nested"]["w"], np.arange(10))
    with pytest.raises(TargetMismatchError, match="shape"):
        ckptcore.restore(written["pytree_plain"], target={"nested": {"w": np.empty(11, np.float32)}}, partial=True)


def test_inspect_says_orbax_layout(written, capsys):
    from ckptcore.cli.main import main

    assert main(["inspect", str(written["standard"])]) == 0
    assert "orbax" in capsys.readouterr().out


def test_orbax_restores_the_same_values(written):
    # the reference: orbax's own restore of its checkpoint equals ckptcore's
    ours = ckptcore.restore(written["pytree_plain"])
    theirs = ocp.PyTreeCheckpointer().restore(written["pytree_plain"])
    assert_same(theirs, ours)


# -- a Flax TrainState ------------------------------------------------------------------


def test_flax_train_state_round_trip(tmp_path):
    optax = pytest.importorskip("optax")
    pytest.importorskip("flax")
    from flax import linen as nn
    from flax.training import train_state

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))

    model = MLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3))
    state = state.apply_gradients(grads=jax.tree.map(jnp.ones_like, state.params))
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "ts", state)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    ours = ckptcore.restore(tmp_path / "ts", target=abstract)
    with ocp.StandardCheckpointer() as ck:
        theirs = ck.restore(tmp_path / "ts", abstract)
    assert type(ours) is type(state) and ours.apply_fn is state.apply_fn
    for a, b, c in zip(jax.tree.leaves(state), jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(c), np.asarray(b))


# -- a CheckpointManager root -----------------------------------------------------------


def write_orbax_run(root: Path, steps: list[tuple[int, float]], **options: Any) -> None:
    opts = ocp.CheckpointManagerOptions(**options)
    with ocp.CheckpointManager(root, options=opts, item_names=("state", "config")) as mgr:
        for step, loss in steps:
            state = {"w": np.full((4, 3), step, np.float32), "step": step}
            mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   config=ocp.args.JsonSave({"step": step, "lr": 0.1})),
                     metrics={"loss": loss})
        mgr.wait_until_finished()


def test_manager_reads_an_orbax_root_and_goes_on(tmp_path):
    root = tmp_path / "run"
    write_orbax_run(root, [(1, 0.9), (2, 0.5), (3, 0.7), (4, 0.8)], max_to_keep=3, best_fn=lambda m: m["loss"],
                    best_mode="min")
    with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True)) as theirs:
        orbax_steps = list(theirs.all_steps())
    options = ckptcore.CheckpointManagerOptions(max_to_keep=3, best_fn=lambda m: m["loss"], best_mode="min",
                                                enable_async_checkpointing=False)
    with ckptcore.CheckpointManager(root, options) as mgr:
        assert mgr.all_steps() == orbax_steps == [2, 3, 4]
        assert mgr.metrics(2) == {"loss": 0.5} and mgr.best_step() == 2 and mgr.latest_step() == 4
        meta = mgr.step_metadata(4)
        assert meta.layout == "orbax" and set(meta.items) == {"state", "config"} and meta.commit_time is not None
        back = mgr.restore(4, ckptcore.Composite(state={"w": np.empty((4, 3), np.float32), "step": 0}, config=None))
        np.testing.assert_array_equal(back.state["w"], np.full((4, 3), 4, np.float32))
        assert back.state["step"] == 4 and back.config == {"step": 4, "lr": 0.1}
        assert mgr.item_metadata(3).state["w"].shape == (4, 3)
        # new steps are ckptcore's, beside orbax's; retention and best_fn rank both
        mgr.save(5, ckptcore.Composite(state={"w": np.zeros((4, 3), np.float32), "step": 5},
                                       config=ckptcore.Json({"step": 5})), metrics={"loss": 0.6})
        assert mgr.all_steps() == [2, 3, 5]  # 4 (0.8) was the worst
        assert (root / "5" / "ckptcore_step.json").exists() and not (root / "4").exists()
        mgr.save(6, ckptcore.Composite(state={"w": np.zeros((4, 3), np.float32), "step": 6},
                                       config=ckptcore.Json({"step": 6})), metrics={"loss": 0.1})
        assert mgr.all_steps() == [2, 5, 6] and mgr.best_step() == 6
    with ckptcore.CheckpointManager(root, ckptcore.CheckpointManagerOptions(read_only=True)) as again:
        assert again.all_steps() == [2, 5, 6] and again.metrics(2) == {"loss": 0.5}


def test_manager_prefixed_and_fixed_length_orbax_steps_and_uncommitted(tmp_path):
    root = tmp_path / "run"
    write_orbax_run(root, [(10, 0.5), (20, 0.4)], step_prefix="ckpt", step_format_fixed_length=6)
    assert sorted(os.listdir(root)) == ["ckpt_000010", "ckpt_000020"]
    # an interrupted orbax save on disk: never listed, never restored
    shutil.copytree(root / "ckpt_000020", root / "ckpt_000030.orbax-checkpoint-tmp")
    opts = ckptcore.CheckpointManagerOptions(step_prefix="ckpt", step_format_fixed_length=6, read_only=True)
    with ckptcore.CheckpointManager(root, opts) as mgr:
        assert mgr.all_steps() == [10, 20]
        assert mgr.restore(20, ckptcore.Composite(state=None)).state["step"] == 20
        with pytest.raises(CheckpointNotFoundError):
            mgr.restore(30)
    with pytest.raises(NotCommittedError, match="never finished"):
        ckptcore.restore(root / "ckpt_000030.orbax-checkpoint-tmp" / "state")


def test_restoring_a_step_directory_names_its_items(tmp_path):
    write_orbax_run(tmp_path / "run", [(1, 0.5)])
    with pytest.raises(CheckpointNotFoundError, match="step of an orbax-checkpoint CheckpointManager") as err:
        ckptcore.restore(tmp_path / "run" / "1")
    assert str(tmp_path / "run" / "1" / "state") in str(err.value)


# -- convert ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["standard", "pytree_plain"])
def test_convert_streams_in_batches_and_verifies(written, tmp_path, name):
    from ckptcore.progress import Recorder

    rec = Recorder()
    report = ckptcore.convert(written[name], tmp_path / "ck", max_bytes_in_flight=600, progress=rec)
    assert report.layout == "orbax" and report.batches > 3 and rec.last == (2 * report.total_bytes,) * 2
    assert ckptcore.info(tmp_path / "ck").layout == "ckptcore"
    assert_same(ckptcore.restore(written[name]), ckptcore.restore(tmp_path / "ck"))
    doc = json.loads((tmp_path / "ck" / "ckptcore_index.json").read_text())
    assert doc["plugin_metadata"]["ckptcore.convert"]["layout"] == "orbax"
    # the converted checkpoint reshards like any other
    m = mesh((2, 4), ("x", "y"))
    target = {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=NamedSharding(m, P("y", "x")))}
    np.testing.assert_array_equal(np.asarray(ckptcore.restore(tmp_path / "ck", target, partial=True)["w"]),
                                  np.asarray(written["arrays"]["w"]))


class _ReadBack:
    """The ``ocdbt`` format, recording the regions read back, and corrupting them on request.

    Stands for destination storage that hands back other bytes than it was given: the
    conversion's read-back must catch it before anything is committed.
    """

    def __init__(self, corrupt: bool) -> None:
        from ckptcore.plugins.manager import registry

        self.inner = registry().array_format("ocdbt").format
        self.corrupt = corrupt
        self.regions: list[tuple[str, Any]] = []
        self.calls = 0

    def write(self, location, requests, options):
        return self.inner.write(location, requests, options)

    def read(self, location, requests, options):
        results = self.inner.read(location, requests, options)
        self.calls += 1
        for request, arrays in zip(requests, results, strict=True):
            self.regions += [(request.key, region) for region in request.regions]
            if self.corrupt and request.key == "w":
                arrays[0] = arrays[0].copy()
                arrays[0].reshape(-1).view(np.uint8)[-1] ^= 1  # one flipped bit in the last block
        return results


@pytest.fixture
def read_back():
    from ckptcore import hookimpl
    from ckptcore.plugins.registrations import ArrayFormatRegistration

    formats: dict[str, _ReadBack] = {"recorded": _ReadBack(False), "corrupting": _ReadBack(True)}

    class Plugin:
        @hookimpl
        def ckptcore_array_formats(self):
            return [ArrayFormatRegistration(name=n, format=f, version=1) for n, f in formats.items()]

    name = ckptcore.register_plugin(Plugin(), name="read-back-formats")
    yield formats
    ckptcore.unregister_plugin(name)


def test_convert_reads_back_in_row_blocks(written, tmp_path, read_back, monkeypatch):
    from ckptcore.io import convert as convert_module

    monkeypatch.setattr(convert_module, "VERIFY_BLOCK_BYTES", 2 * 16 * 4)  # two rows of w (8, 16) float32
    ckptcore.convert(written["standard"], tmp_path / "ck", format="recorded")
    blocks = [region for key, region in read_back["recorded"].regions if key == "w"]
    assert [(r[0].start, r[0].stop) for r in blocks] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert all(r[1] == slice(0, 16) for r in blocks)
    assert_same(ckptcore.restore(written["standard"]), ckptcore.restore(tmp_path / "ck"))


def test_convert_reads_small_pieces_back_together(written, tmp_path, read_back):
    report = ckptcore.convert(written["standard"], tmp_path / "ck", format="recorded")
    assert report.batches == 1 and report.leaves > 10
    assert read_back["recorded"].calls == 1  # every leaf of the batch in one read-back call
    assert len({key for key, _ in read_back["recorded"].regions}) == report.leaves


def test_convert_commits_nothing_when_the_read_back_differs(written, tmp_path, read_back, monkeypatch):
    from ckptcore.io import convert as convert_module

    monkeypatch.setattr(convert_module, "VERIFY_BLOCK_BYTES", 2 * 16 * 4)
    with pytest.raises(ChecksumMismatchError, match=r"'w'.* read back from .* differs from the source"):
        ckptcore.convert(written["standard"], tmp_path / "out", format="corrupting")
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")], os.listdir(tmp_path)


def test_convert_cli(written, tmp_path, capsys):
    from ckptcore.cli.main import main

    assert main(["convert", str(written["pytree_zarr3"]), str(tmp_path / "ck"), "--no-progress"]) == 0
    assert "verified" in capsys.readouterr().out
    assert_same(written["full"], ckptcore.restore(tmp_path / "ck"))
    assert main(["convert", str(written["pytree_zarr3"]), str(tmp_path / "ck"), "--no-progress"]) == 2  # exists


# -- bad input --------------------------------------------------------------------------


def damaged_copy(written: dict[str, Any], name: str, tmp_path: Path) -> Path:
    path = tmp_path / f"damaged-{name}"
    shutil.copytree(written[name], path)
    return path


def assert_convert_writes_nothing(src: Path, tmp_path: Path, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ckptcore.convert(src, tmp_path / "out")
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")], os.listdir(tmp_path)


def test_missing_manifest(written, tmp_path):
    path = damaged_copy(written, "standard", tmp_path)
    (path / "manifest.ocdbt").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"manifest\.ocdbt") as err:
        ckptcore.restore(path)
    assert str(path) in str(err.value) and "Restore another step" in str(err.value)
    assert_convert_writes_nothing(path, tmp_path, CorruptCheckpointError, "manifest.ocdbt")


def test_garbage_metadata(written, tmp_path):
    path = damaged_copy(written, "pytree_plain", tmp_path)
    (path / "_METADATA").write_bytes(b"\x00garbage{")
    with pytest.raises(CorruptCheckpointError, match=r"_METADATA is not valid JSON") as err:
        ckptcore.metadata(path)
    assert str(path) in str(err.value)
    assert_convert_writes_nothing(path, tmp_path, CorruptCheckpointError, "_METADATA")


@pytest.mark.parametrize("name", ["standard", "pytree_plain"])
def test_truncated_data_file(written, tmp_path, name):
    path = damaged_copy(written, name, tmp_path)
    if name == "standard":
        data = max((p for p in path.rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)
    else:
        data = path / "w" / "0.0"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        ckptcore.restore(path)
    assert_convert_writes_nothing(path, tmp_path, CorruptCheckpointError, "damaged|corrupt|failed")


def test_unrepresentable_leaf_type(written, tmp_path):
    path = damaged_copy(written, "pytree_plain", tmp_path)
    doc = json.loads((path / "_METADATA").read_text())
    doc["tree_metadata"]["('lr',)"]["value_metadata"]["value_type"] = "my_project.CustomHandler"
    (path / "_METADATA").write_text(json.dumps(doc))
    with pytest.raises(UnsupportedLeafError, match=r"'lr' \(my_project.CustomHandler\)") as err:
        ckptcore.restore(path)
    assert str(path) in str(err.value) and "orbax-checkpoint and re-save" in str(err.value)
    assert_convert_writes_nothing(path, tmp_path, UnsupportedLeafError, "CustomHandler")


def test_uncommitted_on_object_store_layout(written, tmp_path):
    """On object stores orbax writes commit_success.txt last; without it the item is not committed."""
    from ckptcore_orbax.layout import OrbaxLayout
    from fsspec.implementations.local import LocalFileSystem

    from ckptcore.plugins.address import StorageAddress
    from ckptcore.plugins.registrations import Location

    path = damaged_copy(written, "standard", tmp_path)
    loc = Location(url=f"gs://b/{path.name}", scheme="gs", fs=LocalFileSystem(), path=str(path),
                   address=StorageAddress(scheme="gs", bucket="b", path=f"{path.name}/"))
    assert OrbaxLayout().recognize(loc)
    (path / "commit_success.txt").unlink()
    with pytest.raises(NotCommittedError, match=r"commit_success\.txt"):
        OrbaxLayout().open(loc)
