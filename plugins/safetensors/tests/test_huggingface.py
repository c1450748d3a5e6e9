"""Hugging Face safetensors files and directories: read through ckptcore's restore, written by ``convert --to safetensors``."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import ckptcore_safetensors
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ckptcore
from ckptcore.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidOptionError,
    MissingPluginError,
    TransformError,
    UnsupportedLeafError,
)


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.embed_tokens.weight": rng.standard_normal((32, 16)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((16, 16)).astype(np.float16),
        "model.layers.0.mlp.bias": rng.standard_normal(16).astype(ml_dtypes.bfloat16),
        "model.layers.1.self_attn.q_proj.weight": rng.standard_normal((16, 16)).astype(np.float16),
        "model.layers.1.mlp.bias": rng.standard_normal(16).astype(ml_dtypes.bfloat16),
        "model.norm.count": np.arange(5, dtype=np.int64),
        "lm_head.weight": rng.standard_normal((32, 16)).astype(np.float32),
    }


def _bits_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


@pytest.fixture
def single(tmp_path):
    weights = _weights()
    (tmp_path / "hf").mkdir()
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt", "note": "single"})
    return tmp_path / "hf", weights


def _save_sharded(directory, weights, parts=3) -> dict:
    directory.mkdir(exist_ok=True)
    names = list(weights)
    shards = [names[i::parts] for i in range(parts)]
    weight_map = {}
    for i, members in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        save_file({n: weights[n] for n in members}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in members})
    index = {"metadata": {"total_size": sum(int(w.nbytes) for w in weights.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


@pytest.fixture
def sharded(tmp_path):
    weights = _weights(1)
    index = _save_sharded(tmp_path / "hf", weights)
    return tmp_path / "hf", weights, index


# -- reading -------------------------------------------------------------------------------


def test_single_file_directory_restores_flat(single):
    path, weights = single
    back = ckptcore.restore(path)
    assert isinstance(back, dict) and set(back) == set(weights)
    for name, w in weights.items():
        _bits_equal(w, back[name])
    info = ckptcore.info(path)
    assert info.layout == "huggingface" and "Hugging Face" in info.layout_description
    assert info.metadata == {"format": "pt", "note": "single"}
    meta = ckptcore.metadata(path)
    assert meta["model.embed_tokens.weight"].shape == (32, 16)
    assert meta["model.layers.0.mlp.bias"].dtype == ml_dtypes.bfloat16


def test_a_single_file_path(single):
    path, weights = single
    back = ckptcore.restore(path / "model.safetensors")  # read from the file's directory
    for name, w in weights.items():
        _bits_equal(w, back[name])
    other = path.parent / "loose"
    other.mkdir()
    save_file({"x": np.ones(3, np.int8)}, str(other / "adapter weights.safetensors"))
    np.testing.assert_array_equal(ckptcore.restore(other / "adapter weights.safetensors")["x"], np.ones(3, np.int8))
    assert ckptcore.info(other / "adapter weights.safetensors").layout == "huggingface"


def test_metadata_reads_headers_only(single, monkeypatch):
    path, _ = single
    from ckptcore_safetensors import fileio

    def no_data(*args, **kwargs):
        raise AssertionError("metadata() read array data")

    monkeypatch.setattr(fileio.LocalReader, "read", no_data)
    meta = ckptcore.metadata(path)
    assert len(meta) == 7


def test_sharded_directory_with_index(sharded):
    path, weights, index = sharded
    back = ckptcore.restore(path)
    assert list(back) == list(index["weight_map"])  # the index's order
    for name, w in weights.items():
        _bits_equal(w, back[name])
    assert ckptcore.info(path).metadata == {"format": "pt", "total_size": index["metadata"]["total_size"]}


def test_directory_of_loose_files(tmp_path):
    (tmp_path / "d").mkdir()
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "d" / "adapter_model.safetensors"))
    save_file({"b": np.zeros(3, np.int32)}, str(tmp_path / "d" / "extra.safetensors"))
    back = ckptcore.restore(tmp_path / "d")
    assert set(back) == {"a", "b"}
    save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "d" / "again.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="'a' is in both"):
        ckptcore.restore(tmp_path / "d")


def test_not_recognised(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "readme.txt").write_text("hi")
    with pytest.raises(CheckpointNotFoundError):
        ckptcore.restore(tmp_path / "plain")
    # ckptcore's own safetensors-format checkpoint stays ckptcore's
    ckptcore.save(tmp_path / "own", {"w": np.ones(3)}, format="safetensors")
    assert ckptcore.info(tmp_path / "own").layout == "ckptcore"


def test_targets_partial_and_casts(single):
    path, weights = single
    target = {"lm_head.weight": np.empty((32, 16), np.float64), "model.layers.0.mlp.bias": np.empty(16, np.float32)}
    part = ckptcore.restore(path, target=target, partial=True)
    assert set(part) == set(target) and part["lm_head.weight"].dtype == np.float64
    np.testing.assert_array_equal(part["lm_head.weight"], weights["lm_head.weight"].astype(np.float64))
    np.testing.assert_array_equal(part["model.layers.0.mlp.bias"], weights["model.layers.0.mlp.bias"].astype(np.float32))
    with pytest.raises(ckptcore.errors.TargetMismatchError, match="shape"):
        ckptcore.restore(path, target={"lm_head.weight": np.empty((16, 32), np.float32)}, partial=True)


def _nested_target(weights, dtype=None):
    def like(name):
        w = weights[name]
        return np.empty(w.shape, dtype or w.dtype)

    layers = [{"self_attn": {"q_proj": {"weight": like(f"model.layers.{i}.self_attn.q_proj.weight")}},
               "mlp": {"bias": like(f"model.layers.{i}.mlp.bias")}} for i in range(2)]
    return {"model": {"embed_tokens": {"weight": like("model.embed_tokens.weight")}, "layers": layers,
                      "norm": {"count": like("model.norm.count")}},
            "lm_head": {"weight": like("lm_head.weight")}}


@pytest.mark.parametrize("fixture", ["single", "sharded"])
def test_nested_target_through_nest(fixture, request):
    path, weights, *_ = request.getfixturevalue(fixture)
    target = _nested_target(weights)
    back, report = ckptcore.restore(path, target=target, transforms=ckptcore_safetensors.nest(path), report=True)
    assert isinstance(back["model"]["layers"], list)  # the target decides the containers
    _bits_equal(weights["model.layers.1.self_attn.q_proj.weight"], back["model"]["layers"][1]["self_attn"]["q_proj"]["weight"])
    _bits_equal(weights["lm_head.weight"], back["lm_head"]["weight"])
    assert report.warnings == []
    # casts through the same planner; only part of the model
    del target["lm_head"]
    target["model"]["embed_tokens"]["weight"] = np.empty((32, 16), np.float64)
    part = ckptcore.restore(path, target=target, transforms=ckptcore_safetensors.nest(ckptcore.metadata(path)))
    assert "lm_head" not in part and part["model"]["embed_tokens"]["weight"].dtype == np.float64


def test_nested_helper(single):
    path, weights = single
    tree = ckptcore_safetensors.nested(ckptcore.restore(path))
    _bits_equal(weights["model.layers.0.mlp.bias"], tree["model"]["layers"]["0"]["mlp"]["bias"])
    assert set(ckptcore_safetensors.nested(ckptcore.metadata(path))["model"]) == {"embed_tokens", "layers", "norm"}
    with pytest.raises(TransformError, match="prefix"):
        ckptcore_safetensors.nested({"a": 1, "a.b": 2})
    with pytest.raises(TransformError, match="prefix"):
        ckptcore_safetensors.nested({"a.b": 2, "a": 1})
    with pytest.raises(TransformError, match="sep"):
        ckptcore_safetensors.nest(path, sep="/")


def test_resharding_jax_target(tmp_path):
    jax = pytest.importorskip("jax")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 host devices (the root conftest sets them)")
    host = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    src_mesh, dst_mesh = jax.make_mesh((4, 2), ("x", "y")), jax.make_mesh((2, 4), ("x", "y"))
    # a ckptcore checkpoint saved on a (4, 2) mesh, converted to HF files, restored onto (2, 4)
    state = {"w": jax.device_put(host, NamedSharding(src_mesh, P("x", "y"))), "b": jax.device_put(host[0], NamedSharding(src_mesh, P("y")))}
    ckptcore.save(tmp_path / "ck", state)
    ckptcore.convert(tmp_path / "ck", tmp_path / "hf", to="safetensors", progress=False)
    target = {"w": jax.ShapeDtypeStruct((64, 32), np.float32, sharding=NamedSharding(dst_mesh, P("x", "y"))),
              "b": jax.ShapeDtypeStruct((32,), ml_dtypes.bfloat16, sharding=NamedSharding(dst_mesh, P("y")))}
    back = ckptcore.restore(tmp_path / "hf", target=target)
    assert back["w"].sharding == target["w"].sharding and back["b"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(back["w"]), host)
    np.testing.assert_array_equal(np.asarray(back["b"]), host[0].astype(ml_dtypes.bfloat16))
    for shard in back["w"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])


# -- writing: convert --to safetensors ------------------------------------------------------


def _state():
    rng = np.random.default_rng(3)
    return {
        "params": {"encoder": {"layers": [{"kernel": rng.standard_normal((64, 32)).astype(np.float32)},
                                          {"kernel": rng.standard_normal((64, 32)).astype(np.float32)}]},
                   "embed": rng.standard_normal((128, 32)).astype(ml_dtypes.bfloat16),
                   "mask": rng.integers(0, 2, (7,)).astype(bool), "ids": np.arange(9, dtype=np.uint64),
                   "empty": np.zeros((0, 3), np.float16), "scalar": np.full((), 2.5, np.float32)},
        "step": 1000, "seed": np.int32(4), "lr": 3e-4, "name": "run-7", "done": False, "none": None, "extra": {},
    }


NAMES = {"params.encoder.layers.0.kernel": ("params", "encoder", "layers", 0, "kernel"),
         "params.encoder.layers.1.kernel": ("params", "encoder", "layers", 1, "kernel"),
         "params.embed": ("params", "embed"), "params.mask": ("params", "mask"), "params.ids": ("params", "ids"),
         "params.empty": ("params", "empty"), "params.scalar": ("params", "scalar")}


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def test_convert_to_a_single_file(tmp_path):
    state = _state()
    ckptcore.save(tmp_path / "ck", state, metadata={"run": 7})
    report = ckptcore.convert(tmp_path / "ck", tmp_path / "hf", to="safetensors", progress=False)
    assert report.format == "safetensors" and report.leaves == 7
    assert sorted(os.listdir(tmp_path / "hf")) == ["model.safetensors"]
    loaded = load_file(str(tmp_path / "hf" / "model.safetensors"))  # any safetensors reader
    assert set(loaded) == set(NAMES)
    back = ckptcore.restore(tmp_path / "hf")
    for name, path in NAMES.items():
        _bits_equal(_at(state, path), loaded[name])
        _bits_equal(_at(state, path), back[name])
    # non-array leaves in __metadata__ as text
    assert ckptcore.info(tmp_path / "hf").metadata == {"format": "pt", "step": "1000", "seed": "4", "lr": "0.0003",
                                                        "name": "run-7", "done": "false"}
    # and back onto the original nested tree
    target = {"params": {k: v for k, v in state["params"].items()}}
    nested = ckptcore.restore(tmp_path / "hf", target=target, transforms=ckptcore_safetensors.nest(tmp_path / "hf"))
    _bits_equal(state["params"]["encoder"]["layers"][1]["kernel"], nested["params"]["encoder"]["layers"][1]["kernel"])


def test_convert_to_shards_streaming(tmp_path):
    state = _state()
    ckptcore.save(tmp_path / "ck", state)
    # 4 KiB shards, 8 KiB in flight: the 8 KiB kernels and the embedding arrive in row blocks
    report = ckptcore.convert(tmp_path / "ck", tmp_path / "hf", to="safetensors", progress=False,
                              max_bytes_in_flight=8 << 10, export_options={"max_shard_bytes": 4 << 10})
    assert report.batches > 3
    files = sorted(os.listdir(tmp_path / "hf"))
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3 and all(f.startswith("model-") and f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    assert set(index["weight_map"]) == set(NAMES) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(int(_at(state, p).nbytes) for p in NAMES.values())
    loaded = {}
    for f in shards:
        loaded.update(load_file(str(tmp_path / "hf" / f)))
    back = ckptcore.restore(tmp_path / "hf")
    for name, path in NAMES.items():
        _bits_equal(_at(state, path), loaded[name])
        _bits_equal(_at(state, path), back[name])


def test_convert_hf_to_hf_and_to_ckptcore(sharded, tmp_path):
    path, weights, _ = sharded
    ckptcore.convert(path, tmp_path / "again", to="safetensors", progress=False)
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    for name, w in weights.items():
        _bits_equal(w, again[name])
    ckptcore.convert(path, tmp_path / "own", progress=False)  # into ckptcore's layout (ocdbt)
    own = ckptcore.restore(tmp_path / "own")
    for name, w in weights.items():
        _bits_equal(w, own[name])


@pytest.mark.parametrize("leaf, match", [
    (np.ones(3, np.complex128), "complex128, which safetensors has no dtype"),
    (np.ones(3, ml_dtypes.int4), "int4"),
    (b"raw", "bytes value"),
    (1 + 2j, "complex value"),
])
def test_convert_refuses_what_hf_files_cannot_hold(tmp_path, leaf, match):
    ckptcore.save(tmp_path / "ck", {"ok": np.ones(2), "bad": {"leaf": leaf}})
    with pytest.raises(UnsupportedLeafError, match=match) as err:
        ckptcore.convert(tmp_path / "ck", tmp_path / "hf", to="safetensors", progress=False)
    assert "bad" in str(err.value) and "leaf" in str(err.value)
    assert not (tmp_path / "hf").exists() and os.listdir(tmp_path) == ["ck"]


def test_convert_refuses_colliding_names_and_bad_options(tmp_path):
    ckptcore.save(tmp_path / "ck", {"a.b": np.ones(2), "a": {"b": np.zeros(2)}})
    with pytest.raises(UnsupportedLeafError, match=r"'a\.b'"):
        ckptcore.convert(tmp_path / "ck", tmp_path / "hf", to="safetensors", progress=False)
    ckptcore.save(tmp_path / "ck2", {"w": np.ones(2)})
    with pytest.raises(InvalidOptionError, match="unknown export option"):
        ckptcore.convert(tmp_path / "ck2", tmp_path / "hf", to="safetensors", export_options={"shard": 1}, progress=False)
    with pytest.raises(InvalidOptionError, match="format="):
        ckptcore.convert(tmp_path / "ck2", tmp_path / "hf", to="safetensors", format="ocdbt", progress=False)
    with pytest.raises(MissingPluginError, match="checkpoint exporter 'nope'"):
        ckptcore.convert(tmp_path / "ck2", tmp_path / "hf", to="nope", progress=False)
    assert not (tmp_path / "hf").exists()


def test_cli_convert_to_safetensors(tmp_path):
    state = _state()
    ckptcore.save(tmp_path / "ck", state)
    out = subprocess.run([sys.executable, "-m", "ckptcore", "convert", str(tmp_path / "ck"), str(tmp_path / "hf"),
                          "--to", "safetensors", "--max-shard-bytes", "10KB", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "layout safetensors" in out.stdout
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    back = ckptcore.restore(tmp_path / "hf")
    _bits_equal(state["params"]["embed"], back["params.embed"])


def test_convert_to_an_object_store(cloud, tmp_path):
    import importlib.util

    plugin = "ckptcore_gcs" if cloud.scheme == "gs" else "ckptcore_s3"
    if importlib.util.find_spec(plugin) is None:
        pytest.skip(f"{plugin} is not installed")
    state = _state()
    ckptcore.save(tmp_path / "ck", state)
    url = cloud.url("hf")
    ckptcore.convert(tmp_path / "ck", url, to="safetensors", progress=False, export_options={"max_shard_bytes": 4 << 10})
    back = ckptcore.restore(url)
    for name, path in NAMES.items():
        _bits_equal(_at(state, path), back[name])
    assert ckptcore.info(url).layout == "huggingface"


# -- bad input ------------------------------------------------------------------------------


def _header(file) -> tuple[int, dict]:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def _rewrite_header(file, edit) -> None:
    """Replace the JSON header of ``file`` by ``edit(header)``, keeping the data section."""
    n, doc = _header(file)
    edit(doc)
    raw = json.dumps(doc).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "rb") as f:
        f.seek(8 + n)
        data = f.read()
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def _fails(path, *match, error=CorruptCheckpointError):
    for call in (ckptcore.metadata, ckptcore.restore):  # found when the headers are read, before any array
        with pytest.raises(error) as err:
            call(path)
        for m in match:
            assert m in str(err.value), str(err.value)


def test_truncated_file(single):
    path, _ = single
    file = path / "model.safetensors"
    os.truncate(file, os.path.getsize(file) - 10)
    _fails(path, "model.safetensors", "truncated")


def test_bit_flip_in_the_header(single):
    path, _ = single
    file = path / "model.safetensors"
    with open(file, "r+b") as f:
        f.seek(8)
        byte = f.read(1)
        f.seek(8)
        f.write(bytes([byte[0] ^ 0x40]))  # '{' -> ';'
    _fails(path, "model.safetensors", "not valid JSON")


def test_header_claims_more_than_the_file(single):
    path, _ = single
    file = path / "model.safetensors"
    with open(file, "r+b") as f:
        f.write(struct.pack("<Q", os.path.getsize(file)))
    _fails(path, "model.safetensors", "claims")


def test_header_over_a_sane_size(single):
    path, _ = single
    with open(path / "model.safetensors", "r+b") as f:
        f.write(struct.pack("<Q", 1 << 40))
    _fails(path, "model.safetensors", "over the")


def test_out_of_range_offsets(single):
    path, _ = single
    file = path / "model.safetensors"

    def edit(doc):
        entry = doc["lm_head.weight"]
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        entry["data_offsets"] = [10**9, 10**9 + size]

    _rewrite_header(file, edit)
    _fails(path, "model.safetensors", "'lm_head.weight'", "past the end")


def test_overlapping_offsets(single):
    path, _ = single

    def edit(doc):
        doc["model.layers.0.mlp.bias"]["data_offsets"] = [0, 32]  # onto another tensor's bytes
        first = min((v for k, v in doc.items() if k != "__metadata__"), key=lambda e: e["data_offsets"][0])
        if first is doc["model.layers.0.mlp.bias"]:
            doc["model.layers.0.mlp.bias"]["data_offsets"] = [4, 36]

    _rewrite_header(path / "model.safetensors", edit)
    _fails(path, "model.safetensors", "overlaps")


def test_weight_map_escaping_the_directory(sharded):
    path, _, index = sharded
    index["weight_map"]["lm_head.weight"] = "../x.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path.parent / "x.safetensors").write_bytes(b"")
    _fails(path, "model.safetensors.index.json", "'lm_head.weight'", "'../x.safetensors'", "escape")


def test_index_naming_a_missing_shard(sharded):
    path, _, _ = sharded
    os.remove(path / "model-00002-of-00003.safetensors")
    _fails(path, "model-00002-of-00003.safetensors", "missing", "maps tensor")


def test_index_naming_a_tensor_its_shard_lacks(sharded):
    path, _, index = sharded
    index["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    _fails(path, "model-00001-of-00003.safetensors", "'ghost.weight'")


def test_index_not_json(sharded):
    path, _, _ = sharded
    (path / "model.safetensors.index.json").write_text("{not json")
    _fails(path, "model.safetensors.index.json", "not valid JSON")


def test_unreadable_dtype(tmp_path):
    (tmp_path / "d").mkdir()
    save_file({"w": np.ones(4, np.float32)}, str(tmp_path / "d" / "model.safetensors"))
    _rewrite_header(tmp_path / "d" / "model.safetensors", lambda doc: doc["w"].update(dtype="F4", shape=[32]))
    _fails(tmp_path / "d", "'w'", "bit-packed", error=UnsupportedLeafError)


def test_nothing_in_a_header_is_executed(tmp_path):
    (tmp_path / "d").mkdir()
    save_file({"w": np.ones(4, np.float32)}, str(tmp_path / "d" / "model.safetensors"))
    marker = tmp_path / "pwned"
    _rewrite_header(tmp_path / "d" / "model.safetensors",
                    lambda doc: doc["w"].update(dtype=f"__import__('os').system('touch {marker}')"))
    _fails(tmp_path / "d", "'w'", "unknown safetensors dtype")
    assert not marker.exists()


def test_bit_flip_in_data_is_not_detectable(single):
    """Hugging Face files carry no checksums (the README says so): a flipped data bit comes back flipped."""
    path, weights = single
    file = path / "model.safetensors"
    n, doc = _header(file)
    start = 8 + n + doc["lm_head.weight"]["data_offsets"][0]
    with open(file, "r+b") as f:
        f.seek(start)
        byte = f.read(1)
        f.seek(start)
        f.write(bytes([byte[0] ^ 1]))
    back = ckptcore.restore(path)
    assert not np.array_equal(back["lm_head.weight"], weights["lm_head.weight"])
