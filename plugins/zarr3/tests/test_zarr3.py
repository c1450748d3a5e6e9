"""ckptcore-zarr3: layout decisions, and both formats driven directly through real TensorStore (issue 2, item 5).

Runs with only the core and this plugin: no storage plugin is used, the tests build
their own local :class:`~ckptcore.plugins.registrations.Location`.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from ckptcore_zarr3 import layout
from fsspec.implementations.local import LocalFileSystem

from ckptcore.plugins.address import StorageAddress
from ckptcore.plugins.manager import registry, reset_registry
from ckptcore.plugins.registrations import Location, ReadRequest, Shard, WriteRequest


@pytest.fixture(autouse=True)
def only_zarr3(monkeypatch):
    monkeypatch.setenv("CKPTCORE_PLUGINS", "zarr3")
    monkeypatch.delenv("CKPTCORE_BLOCK_PLUGINS", raising=False)
    monkeypatch.delenv("CKPTCORE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    reset_registry()
    yield
    reset_registry()


def _location(path) -> Location:
    path = str(path)
    os.makedirs(path, exist_ok=True)
    return Location(url=path, scheme="file", fs=LocalFileSystem(), path=path, address=StorageAddress(scheme="file", path=path + "/"))


def _whole(key, array, hint=None):
    index = tuple(slice(0, n) for n in array.shape)
    return WriteRequest(key=key, shape=array.shape, dtype=array.dtype, shards=(Shard(index, array),), chunk_hint=hint)


def _read(key, shape, saved, info, dtype=None, regions=None):
    return ReadRequest(key=key, shape=tuple(shape), saved_dtype=np.dtype(saved), dtype=np.dtype(dtype or saved),
                       info=info, regions=tuple(regions or [tuple(slice(0, n) for n in shape)]))


# -- layout -----------------------------------------------------------------------------


def test_chunk_shape():
    assert layout.chunk_shape((1024, 1024), 4, 1 << 20, None) == [512, 512]
    assert layout.chunk_shape((10,), 4, 1 << 20, None) == [10]  # small: one chunk
    assert layout.chunk_shape((0, 5), 8, 1 << 20, None) == [1, 5]  # zero-size dims still get a valid chunk
    assert layout.chunk_shape((), 8, 1 << 20, None) == []
    assert layout.chunk_shape((1000, 10), 4, 1 << 20, (250, 10)) == [250, 10]  # never larger than a shard
    chunk = layout.chunk_shape((3000, 7, 5), 8, 64 << 10, None)
    assert np.prod(chunk) * 8 <= 64 << 10 and all(c >= 1 for c in chunk)
    assert layout.chunk_shape((1 << 20,), 1, 1, None) == [1]


def test_storage_dtype():
    for name in ("bool", "int8", "uint64", "float16", "complex128", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int4"):
        dtype = np.dtype(getattr(ml_dtypes, name, None) or name)
        assert layout.storage_dtype(dtype) == (dtype, False), name
    for dtype in (np.dtype(ml_dtypes.uint4), np.dtype(ml_dtypes.float6_e2m3fn)):
        assert layout.storage_dtype(dtype) == (np.dtype(np.uint8), True)
    assert layout.stored_shape((3, 4), np.dtype(np.float64), True) == (3, 4, 8)
    assert layout.stored_shape((3, 4), np.dtype(ml_dtypes.uint4), True) == (3, 4)
    assert layout.stored_shape((3, 4), np.dtype(np.float64), False) == (3, 4)


def test_compression_probe_and_codecs():
    assert layout.worth_compressing(np.zeros(100_000, np.float32))
    assert not layout.worth_compressing(np.random.default_rng(0).integers(0, 255, 100_000, dtype=np.uint8))
    assert not layout.worth_compressing(np.zeros(4, np.uint8))  # too small to judge
    assert layout.worth_compressing(np.zeros((300, 300), np.float32)[:, ::2])  # non-contiguous input
    chain = layout.codecs(True, 3)
    assert [c["name"] for c in chain] == ["bytes", "zstd", "crc32c"] and chain[1]["configuration"]["level"] == 3
    assert [c["name"] for c in layout.codecs(False, 3)] == ["bytes", "crc32c"]


# -- the formats, through the registry ------------------------------------------------------


def test_registrations():
    assert {r.name for r in registry().array_formats()} == {"ocdbt", "zarr3"}
    assert registry().default_array_format() == "ocdbt"
    assert registry().array_format("zarr3").distribution == "ckptcore-zarr3"


@pytest.mark.parametrize("fmt", ["ocdbt", "zarr3"])
def test_write_and_read_every_kind(tmp_path, fmt):
    impl = registry().array_format(fmt).format
    loc = _location(tmp_path / fmt)
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((300, 100)).astype(np.float32),  # 120 KB: its own array
        "small": np.arange(10, dtype=np.int16),  # packed
        "zero_d": np.array(3.5),
        "empty": np.zeros((0, 4), np.float32),
        "u4": rng.integers(0, 16, 100_000).astype(ml_dtypes.uint4),  # raw bytes in storage
        "e4m3": rng.standard_normal((200, 300)).astype(ml_dtypes.float8_e4m3),
        "bf16_small": np.ones(5, ml_dtypes.bfloat16),
        "bool": rng.integers(0, 2, 70_000).astype(bool),
        "c128": (rng.standard_normal(5000) * 1j).astype(np.complex128),
    }
    requests = [_whole(k, v) for k, v in arrays.items()]
    infos = impl.write(loc, requests, {"chunk_bytes": 32 << 10})
    assert len(infos) == len(requests)
    assert "packed" in infos[1] and "packed" not in infos[0]
    reads = [_read(k, v.shape, v.dtype, info) for (k, v), info in zip(arrays.items(), infos, strict=True)]
    results = impl.read(loc, reads, {})
    for (key, value), (got,) in zip(arrays.items(), results, strict=True):
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert got.tobytes() == value.tobytes(), key
    if fmt == "zarr3":
        assert os.path.isfile(tmp_path / fmt / "f32" / "zarr.json")


@pytest.mark.parametrize("fmt", ["ocdbt", "zarr3"])
def test_sharded_write_regions_read_and_cast(tmp_path, fmt):
    impl = registry().array_format(fmt).format
    loc = _location(tmp_path / fmt)
    full = np.arange(400 * 300, dtype=np.float32).reshape(400, 300)
    shards = tuple(Shard((slice(r, r + 100), slice(c, c + 150)), full[r : r + 100, c : c + 150])
                   for r in range(0, 400, 100) for c in range(0, 300, 150))
    request = WriteRequest(key="w", shape=full.shape, dtype=full.dtype, shards=shards, chunk_hint=(100, 150))
    (info,) = impl.write(loc, [request], {"chunk_bytes": 1 << 20})
    assert info["chunks"][0] <= 100 and info["chunks"][1] <= 150  # chunks never straddle shards
    regions = ((slice(0, 400), slice(0, 300)), (slice(50, 250), slice(10, 20)), (slice(399, 400), slice(0, 0)))
    (got,) = impl.read(loc, [_read("w", full.shape, np.float32, info, np.float64, regions)], {})
    assert [g.shape for g in got] == [(400, 300), (200, 10), (1, 0)]
    assert all(g.dtype == np.float64 for g in got)
    np.testing.assert_array_equal(got[1], full[50:250, 10:20].astype(np.float64))
    np.testing.assert_array_equal(got[0], full)


@pytest.mark.parametrize("fmt", ["ocdbt", "zarr3"])
def test_many_leaves_file_counts(tmp_path, fmt):
    impl = registry().array_format(fmt).format
    loc = _location(tmp_path / fmt)
    arrays = [np.full(256, i + 1, np.float32) for i in range(60)]  # never the fill value (0): every chunk is stored
    infos = impl.write(loc, [_whole(f"leaf{i}", a) for i, a in enumerate(arrays)], {"small_bytes": 0})
    assert not any("packed" in i for i in infos)  # small_bytes=0: every leaf is its own array
    files = [f for _, _, fs in os.walk(tmp_path / fmt) for f in fs]
    if fmt == "ocdbt":
        assert len(files) < 20  # a few large files whatever the number of leaves
    else:
        assert len(files) >= 120  # zarr.json + one chunk per leaf
    results = impl.read(loc, [_read(f"leaf{i}", (256,), np.float32, info) for i, info in enumerate(infos)], {})
    assert [int(r[0][0]) for r in results] == list(range(1, 61))


@pytest.mark.parametrize("fmt", ["ocdbt", "zarr3"])
def test_reading_a_missing_array_fails(tmp_path, fmt):
    impl = registry().array_format(fmt).format
    loc = _location(tmp_path / fmt)
    impl.write(loc, [_whole("present", np.ones(100_000))], {})
    with pytest.raises(Exception) as err:
        impl.read(loc, [_read("absent", (100_000,), np.float64, {"chunks": [100_000], "compression": "none"})], {})
    assert "absent" in str(err.value) or "NOT_FOUND" in str(err.value)


def test_storage_addresses_become_tensorstore_kvstore_specs(monkeypatch):
    from ckptcore_zarr3.kvstore import kvstore_spec

    monkeypatch.delenv("TENSORSTORE_GCS_HTTP_URL", raising=False)  # a gs spec sets it; restored afterwards

    from ckptcore.errors import StorageError
    from ckptcore.plugins.address import RetryPolicy

    assert kvstore_spec(StorageAddress(scheme="file", path="/data/ck")) == {"driver": "file", "path": "/data/ck/"}
    s3 = StorageAddress(scheme="s3", bucket="b", path="run/7/", endpoint="http://127.0.0.1:9000", region="eu-west-3",
                        retry=RetryPolicy(retries=2), request_concurrency=8, credentials={"anon": True})
    spec = kvstore_spec(s3)
    assert spec["endpoint"] == "http://127.0.0.1:9000" and spec["aws_region"] == "eu-west-3"
    assert spec["context"]["s3_request_retries"]["max_retries"] == 3
    assert spec["context"]["s3_request_concurrency"] == {"limit": 8}
    assert spec["context"]["aws_credentials"] == {"type": "anonymous"}
    assert kvstore_spec(s3.child("item"))["path"] == "run/7/item/" and s3.child("item").parent() == s3
    assert "endpoint" not in kvstore_spec(StorageAddress(scheme="s3", bucket="b", path=""))
    keys = kvstore_spec(StorageAddress(scheme="s3", bucket="b", path="", credentials={"key": "K", "secret": "S"}))
    with open(keys["context"]["aws_credentials"]["credentials_file"]) as f:
        assert "aws_access_key_id = K" in f.read()
    assert "secret" not in repr(StorageAddress(scheme="s3", path="", credentials={"secret": "x"}))
    gcs = kvstore_spec(StorageAddress(scheme="gs", bucket="g", path="a/", options={"user_project": "p"}))
    assert gcs["driver"] == "gcs" and gcs["context"]["gcs_user_project"] == {"project_id": "p"}
    with pytest.raises(StorageError, match="cannot reach storage of kind 'hdfs'"):
        kvstore_spec(StorageAddress(scheme="hdfs", path="x/"))
