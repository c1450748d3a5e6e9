"""The template's own tests: run them with the plugin installed (pip install -e '.[test]')."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

import ckptcore

STATE = {
    "params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b/with/slashes": np.ones(3, np.int16)},
    "bf16": np.linspace(0, 1, 6).astype(ml_dtypes.bfloat16).reshape(2, 3),
    "empty": np.zeros((0, 5), np.float64),
    "scalar": np.float64(2.5),
    "step": 7,
    "name": "template",
}


def test_the_plugin_is_found_through_its_entry_point():
    plugins = {p.name: p for p in ckptcore.list_plugins()}
    assert plugins["npy"].distribution == "ckptcore-npy"
    assert plugins["npy"].status == "loaded"


def test_save_and_restore_round_trip(tmp_path):
    ckptcore.save(str(tmp_path / "ck"), STATE, format="npy")
    back = ckptcore.restore(str(tmp_path / "ck"))
    assert np.array_equal(back["params"]["w"], STATE["params"]["w"])
    assert back["params"]["b/with/slashes"].dtype == np.int16
    assert back["bf16"].dtype == ml_dtypes.bfloat16 and np.array_equal(back["bf16"], STATE["bf16"])
    assert back["empty"].shape == (0, 5)
    assert back["step"] == 7 and back["name"] == "template"
    files = os.listdir(tmp_path / "ck" / "npy")
    assert files and all(f.endswith(".npy") for f in files)


def test_the_files_are_plain_npy_without_pickle(tmp_path):
    ckptcore.save(str(tmp_path / "ck"), {"w": np.arange(6, dtype=np.int32).reshape(2, 3)}, format="npy")
    (name,) = [f for f in os.listdir(tmp_path / "ck" / "npy")]
    assert np.array_equal(np.load(tmp_path / "ck" / "npy" / name, allow_pickle=False), np.arange(6).reshape(2, 3))


def test_partial_restore_with_a_cast(tmp_path):
    ckptcore.save(str(tmp_path / "ck"), STATE, format="npy")
    part = ckptcore.restore(str(tmp_path / "ck"), {"params": {"w": np.empty((3, 4), np.float64)}}, partial=True)
    assert part["params"]["w"].dtype == np.float64 and part["params"]["w"][2, 3] == 11


def test_the_index_names_the_plugin(tmp_path):
    ckptcore.save(str(tmp_path / "ck"), STATE, format="npy")
    info = ckptcore.info(str(tmp_path / "ck"))
    assert info.array_formats["npy"]["distribution"] == "ckptcore-npy"
    assert json.dumps(info.array_formats["npy"])  # JSON-able, as the index requires


def test_regions_spanning_several_shards_are_assembled():
    from types import SimpleNamespace

    import fsspec
    from ckptcore_npy import NpyFormat

    # The format uses only these two attributes of the location the core hands it.
    location = SimpleNamespace(fs=fsspec.filesystem("memory"), path="/npy-template-test")
    full = np.arange(40, dtype=np.float32).reshape(8, 5)
    shards = tuple(ckptcore.Shard(index=(slice(i, i + 4), slice(None)), data=full[i:i + 4]) for i in (0, 4))
    write = ckptcore.WriteRequest(key="a/b", shape=(8, 5), dtype=full.dtype, shards=shards)
    (info,) = NpyFormat().write(location, [write], {})
    assert len(info["files"]) == 2
    read = ckptcore.ReadRequest(key="a/b", shape=(8, 5), saved_dtype=full.dtype, dtype=np.dtype(np.float64),
                                info=info, regions=((slice(2, 6), slice(1, 4)), (slice(None), slice(None))))
    ((middle, whole),) = NpyFormat().read(location, [read], {})
    assert np.array_equal(middle, full[2:6, 1:4]) and middle.dtype == np.float64
    assert np.array_equal(whole, full)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__]))
