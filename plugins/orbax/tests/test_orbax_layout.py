"""ckptcore-orbax on its own: orbax's layout built by hand (TensorStore + JSON), no orbax-checkpoint needed.

The interoperability tests against the real orbax-checkpoint (and the 0.5.21 fixtures) are
in the repository's tests/test_orbax_*.py.
"""

from __future__ import annotations

import base64
import json

import msgpack
import numpy as np
import pytest
import tensorstore as ts
from ckptcore_orbax import legacy, tree_metadata
from ckptcore_orbax.arrays import zarr_dtype
from ckptcore_orbax.layout import OrbaxLayout
from fsspec.implementations.local import LocalFileSystem

import ckptcore
from ckptcore.errors import CorruptCheckpointError, NotCommittedError, UnsupportedLeafError
from ckptcore.plugins.address import StorageAddress
from ckptcore.plugins.manager import reset_registry
from ckptcore.plugins.registrations import Location


@pytest.fixture(autouse=True)
def only_core_and_this(monkeypatch):
    monkeypatch.setenv("CKPTCORE_PLUGINS", "posix,zarr3,orbax")
    monkeypatch.delenv("CKPTCORE_BLOCK_PLUGINS", raising=False)
    monkeypatch.delenv("CKPTCORE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    reset_registry()
    yield
    reset_registry()


def entry(*keys: tuple[str, int], value_type: str, skip: bool = False) -> tuple[str, dict]:
    name = str(tuple(k for k, _ in keys))
    return name, {"key_metadata": [{"key": k, "key_type": t} for k, t in keys],
                  "value_metadata": {"value_type": value_type, "skip_deserialize": skip}}


def write_zarr(path, param: str, array: np.ndarray, chunks: tuple[int, ...]) -> None:
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": f"{path}/{param}/"},
                     "metadata": {"shape": list(array.shape), "chunks": list(chunks), "dtype": array.dtype.str,
                                  "compressor": {"id": "zstd", "level": 1}}},
                    create=True).result()
    store.write(array).result()


def orbax_item(tmp_path):
    """An orbax PyTreeCheckpointer item without OCDBT, as orbax 0.12 lays it out."""
    path = tmp_path / "item"
    path.mkdir()
    w = np.arange(32, dtype=np.float32).reshape(8, 4)
    write_zarr(path, "params.w", w, (4, 2))
    write_zarr(path, "layers.0", np.ones(3, np.int16), (3,))
    write_zarr(path, "step", np.array(5, np.int64), ())
    write_zarr(path, "key", np.array([0, 42], np.uint32), (2,))
    tree = dict([
        entry(("params", 2), ("w", 2), value_type="jax.Array"),
        entry(("layers", 2), ("0", 1), value_type="np.ndarray"),
        entry(("layers", 2), ("1", 1), value_type="None", skip=True),
        entry(("step", 2), value_type="scalar"),
        entry(("name", 2), value_type="string"),
        entry(("empty", 2), value_type="Dict", skip=True),
        entry(("key", 2), value_type="jax.Array"),
    ])
    (path / "_METADATA").write_text(json.dumps({"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False}))
    (path / "_strings.json").write_text(json.dumps({"name": "run-1"}))
    sharding = {"sharding_type": "NamedSharding", "shape": [4, 2], "axis_names": ["x", "y"],
                "axis_types": ["AxisType.Explicit", "AxisType.Explicit"], "partition_spec": ["x", "y"],
                "device_mesh": {"mesh": [[{"id": i * 2}, {"id": i * 2 + 1}] for i in range(4)]}}
    (path / "_sharding").write_text(json.dumps({base64.b64encode(b"params.w").decode(): json.dumps(sharding)}))
    (path / "array_metadatas").mkdir()
    (path / "array_metadatas" / "process_0").write_text(json.dumps({"array_metadatas": [
        {"array_metadata": {"param_name": "key", "write_shape": [2], "chunk_shape": [2],
                            "ext_metadata": {"random_key_impl": "threefry2x32"}}}]}))
    (path / "commit_success.txt").write_text("Checkpoint commit was successful")
    return path, w


def test_an_item_as_a_ckptcore_index(tmp_path):
    path, w = orbax_item(tmp_path)
    info = ckptcore.info(path)
    assert (info.layout, info.layout_description) == ("orbax", "orbax-checkpoint layout")
    meta = ckptcore.metadata(path)
    assert meta["params"]["w"].shape == (8, 4) and meta["step"] == 5 and meta["name"] == "run-1"
    assert meta["layers"][1] is None and meta["empty"] == {}
    back = ckptcore.restore(path, {"params": {"w": np.empty((8, 4), np.float64)}, "layers": [np.empty(3, np.int16), None],
                                   "step": 0, "name": "", "empty": {}, "key": None})
    np.testing.assert_array_equal(back["params"]["w"], w)
    assert back["params"]["w"].dtype == np.float64 and back["step"] == 5 and back["key"] is None


def test_sharding_and_typed_keys_in_the_records(tmp_path):
    from ckptcore.io.restore import open_checkpoint

    path, _ = orbax_item(tmp_path)
    doc = open_checkpoint(path).doc
    records = {item["key"]: item["value"] for item in doc["tree"]["items"]}
    w = records["params"]["items"][0]["value"]
    assert w["kind"] == "jax_array" and w["sharding"] == {
        "type": "named", "mesh": {"axis_names": ["x", "y"], "axis_sizes": [4, 2], "axis_types": ["Explicit", "Explicit"]},
        "spec": ["x", "y"]}
    assert "id" not in json.dumps(w["sharding"])  # never device ids
    key = records["key"]
    assert (key["kind"], key["prng_impl"], key["key_shape"], key["shape"]) == ("jax_prng_key", "threefry2x32", [], [2])


def test_recognize_is_false_for_other_directories(tmp_path):
    layout = OrbaxLayout()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("")
    fs = LocalFileSystem()

    def loc(p):
        return Location(url=str(p), scheme="file", fs=fs, path=str(p), address=StorageAddress(scheme="file", path=f"{p}/"))

    assert not layout.recognize(loc(tmp_path / "plain"))
    assert not layout.recognize(loc(tmp_path / "missing"))
    assert layout.open_step(loc(tmp_path / "plain")) is None


def test_open_step(tmp_path):
    step = tmp_path / "run" / "100"
    item, _ = orbax_item(tmp_path)
    step.mkdir(parents=True)
    item.rename(step / "state")
    (step / "config").mkdir()
    (step / "config" / "metadata").write_text(json.dumps({"lr": 0.1}))
    (step / "metrics").mkdir()
    (step / "metrics" / "metrics").write_text(json.dumps({"loss": 0.25}))
    (step / "_CHECKPOINT_METADATA").write_text(json.dumps({"commit_timestamp_nsecs": 1_700_000_000_000_000_000,
                                                           "metrics": {}}))
    fs = LocalFileSystem()
    loc = Location(url=str(step), scheme="file", fs=fs, path=str(step), address=StorageAddress(scheme="file", path=f"{step}/"))
    found = OrbaxLayout().open_step(loc)
    assert found is not None and found.committed
    assert found.items == {"state": {"kind": "pytree", "layout": "orbax"}, "config": {"kind": "json", "file": "metadata"}}
    assert found.metrics == {"loss": 0.25} and found.commit_time == 1_700_000_000.0
    gcs = Location(url=f"gs://b/{step.name}", scheme="gs", fs=fs, path=str(step),
                   address=StorageAddress(scheme="gs", bucket="b", path="run/100/"))
    assert OrbaxLayout().open_step(gcs).committed is False  # no commit_success.txt in the step on an object store
    with ckptcore.CheckpointManager(tmp_path / "run", ckptcore.CheckpointManagerOptions(read_only=True)) as mgr:
        assert mgr.all_steps() == [100] and mgr.metrics(100) == {"loss": 0.25}
        assert mgr.restore(100, ckptcore.Composite(config=None)).config == {"lr": 0.1}


def test_bad_metadata_and_unknown_types(tmp_path):
    path, _ = orbax_item(tmp_path)
    doc = json.loads((path / "_METADATA").read_text())
    doc["tree_metadata"]["('step',)"]["value_metadata"]["value_type"] = "Custom"
    (path / "_METADATA").write_text(json.dumps(doc))
    with pytest.raises(UnsupportedLeafError, match=r"'step' \(Custom\)"):
        ckptcore.metadata(path)
    (path / "_METADATA").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        ckptcore.metadata(path)
    (path / "_METADATA").write_text(json.dumps({"tree_metadata": {"x": {"key_metadata": [{"key": "a", "key_type": 7}],
                                                                        "value_metadata": {"value_type": "scalar"}}}}))
    with pytest.raises(CorruptCheckpointError, match="unknown key types"):
        ckptcore.metadata(path)


def test_tmp_directory_is_not_committed(tmp_path):
    path, _ = orbax_item(tmp_path)
    tmp = path.rename(tmp_path / "item.orbax-checkpoint-tmp-1234")
    with pytest.raises(NotCommittedError):
        ckptcore.restore(tmp)


def test_zarr_dtypes():
    assert zarr_dtype({"dtype": "<u4"}, False) == np.uint32
    assert zarr_dtype({"dtype": ">f8"}, False) == np.float64
    assert zarr_dtype({"dtype": "bfloat16"}, False).name == "bfloat16"
    assert zarr_dtype({"data_type": "float8_e4m3fn"}, True).name == "float8_e4m3fn"
    for bad in ("|O", "<U4", "os.system"):
        with pytest.raises((TypeError, CorruptCheckpointError)):
            zarr_dtype({"dtype": bad}, False)


def test_tree_metadata_lists_and_conflicts():
    raw = json.dumps({"tree_metadata": dict([entry(("a", 2), ("1", 1), value_type="scalar"),
                                             entry(("a", 2), ("0", 1), value_type="scalar")])}).encode()
    _, leaves = tree_metadata.parse(raw, "u")
    tree = tree_metadata.build_tree(leaves, lambda lf: {"type": "leaf", "kind": "str", "value": lf.param}, "u")
    assert tree["items"][0]["value"] == {"type": "list", "items": [
        {"type": "leaf", "kind": "str", "value": "a.0"}, {"type": "leaf", "kind": "str", "value": "a.1"}]}
    gap = json.dumps({"tree_metadata": dict([entry(("a", 2), ("2", 1), value_type="scalar")])}).encode()
    with pytest.raises(CorruptCheckpointError, match=r"not 0\.\.n-1"):
        tree_metadata.build_tree(tree_metadata.parse(gap, "u")[1], lambda lf: {}, "u")


def test_legacy_decoder_parses_only_data():
    array = np.arange(4, dtype=np.int8)
    packed = msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb((array.shape, "int8", array.tobytes()))),
                            "t": msgpack.ExtType(4, msgpack.packb([1, 2]))})
    out = legacy.decode(packed, "u")
    np.testing.assert_array_equal(out["a"], array)
    assert out["t"] == (1, 2)
    with pytest.raises(CorruptCheckpointError):
        legacy.decode(msgpack.packb({"x": msgpack.ExtType(42, b"")}), "u")
    assert legacy.placeholder_param("PLACEHOLDER://a.b") == "a.b" and legacy.placeholder_param("x") is None
