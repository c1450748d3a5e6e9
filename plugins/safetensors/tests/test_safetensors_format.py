"""The safetensors array format through ckptcore's public API: dtypes, layouts, sharding, object stores, bad input."""

from __future__ import annotations

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

import ckptcore
from ckptcore.errors import CheckpointError, CorruptCheckpointError, InvalidOptionError

DTYPES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
    "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz",
    "float8_e8m0fnu", "int4", "uint4", "int2", "uint2", "float8_e4m3", "float8_e3m4", "float6_e2m3fn",
    "float6_e3m2fn", "float4_e2m1fn",
]
NUMPY_LOADABLE = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                  "float16", "float32", "float64", "complex64"]


def _dtype(name: str) -> np.dtype:
    found = getattr(ml_dtypes, name, None)
    return np.dtype(found if found is not None else name)


def _sample(dtype: np.dtype, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if dtype == np.bool_:
        out = rng.integers(0, 2, n).astype(bool)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        out = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
    elif dtype.kind == "c":
        out = (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dtype)
    elif dtype.kind == "f":
        out = rng.standard_normal(n).astype(dtype)
    elif "int" in dtype.name:
        info = ml_dtypes.iinfo(dtype)
        out = rng.integers(int(info.min), int(info.max), n, endpoint=True).astype(dtype)
    else:
        out = (np.abs(rng.standard_normal(n)) * 2).astype(dtype)
    return out.reshape(shape)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape
    assert b.flags.c_contiguous
    assert np.ascontiguousarray(a).tobytes() == b.tobytes()


def _files(path) -> list[str]:
    return sorted(glob.glob(os.path.join(str(path), "safetensors", "**", "*.safetensors"), recursive=True))


def _index(path) -> dict:
    with open(os.path.join(str(path), "ckptcore_index.json")) as f:
        return json.load(f)


def _header(file: str) -> tuple[int, dict]:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def _rewrite_header(file: str, edit) -> None:
    """Replace the JSON header of ``file`` by ``edit(header)``, keeping its length (padded with spaces)."""
    n, doc = _header(file)
    edit(doc)
    raw = json.dumps(doc).encode()
    assert len(raw) <= n, "edited header does not fit"
    with open(file, "r+b") as f:
        f.seek(8)
        f.write(raw + b" " * (n - len(raw)))


# -- registration and round trips ---------------------------------------------------------


def test_registered_through_its_entry_point():
    plugins = {p.name: p for p in ckptcore.list_plugins()}
    assert any(p.distribution == "ckptcore-safetensors" for p in plugins.values())


def test_every_dtype_round_trips(tmp_path):
    state = {}
    for name in DTYPES:
        dtype = _dtype(name)
        state[name] = {
            "small": _sample(dtype, (37,), seed=1),
            "large": _sample(dtype, (300, 70), seed=2),
            "scalar0d": np.asarray(_sample(dtype, (1,), seed=3)[0]),
            "empty": np.zeros((0, 3), dtype),
        }
    ckptcore.save(tmp_path / "c", state, format="safetensors")
    out = ckptcore.restore(tmp_path / "c")
    for name in DTYPES:
        for kind in ("small", "large", "scalar0d", "empty"):
            _bits_equal(state[name][kind], out[name][kind])
    leaves = _index(tmp_path / "c")
    assert "safetensors" in leaves["array_formats"]
    # One file for one writer; the header is JSON, data starts on a 4 KiB boundary.
    (file,) = _files(tmp_path / "c")
    n, doc = _header(file)
    assert (8 + n) % 4096 == 0
    assert doc["__metadata__"]["format"] == "pt"
    assert doc["complex128/large"]["dtype"] == "U8" and doc["complex128/large"]["shape"] == [300, 70, 16]
    assert doc["bfloat16/large"]["dtype"] == "BF16" and doc["float8_e4m3fn/large"]["dtype"] == "F8_E4M3"
    assert doc["int4/large"]["dtype"] == "U8" and doc["int4/large"]["shape"] == [300, 70]


def test_standard_dtypes_load_with_safetensors_numpy(tmp_path):
    from safetensors.numpy import load_file

    state = {name: {"a": _sample(_dtype(name), (64, 33), seed=4), "z": np.asarray(_sample(_dtype(name), (1,))[0]),
                    "e": np.zeros((2, 0), _dtype(name))} for name in NUMPY_LOADABLE}
    state["nested"] = {"deep": {"w": np.arange(4096 * 3, dtype=np.float32).reshape(3, 4096)}}
    ckptcore.save(tmp_path / "c", state, format="safetensors")
    (file,) = _files(tmp_path / "c")
    loaded = load_file(file)
    expected = {f"{k}/{kk}": v for k, d in state.items() if k != "nested" for kk, v in d.items()}
    expected["nested/deep/w"] = state["nested"]["deep"]["w"]
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        _bits_equal(value, np.array(loaded[key], order="C"))


def test_many_small_leaves_one_file(tmp_path):
    state = {f"layer{i}": {"w": np.full((16,), i, np.float32), "b": np.int64(i) * np.ones((), np.int64)} for i in range(2000)}
    ckptcore.save(tmp_path / "c", state, format="safetensors")
    assert len(_files(tmp_path / "c")) == 1
    out = ckptcore.restore(tmp_path / "c")
    for i in (0, 1, 999, 1999):
        _bits_equal(state[f"layer{i}"]["w"], out[f"layer{i}"]["w"])
        _bits_equal(state[f"layer{i}"]["b"], out[f"layer{i}"]["b"])


def test_a_leaf_named_like_the_header_metadata(tmp_path):
    from safetensors.numpy import load_file

    state = {"__metadata__": np.arange(3, dtype=np.float32), "x": {"__metadata__": np.ones(2, np.int8)}}
    ckptcore.save(tmp_path / "c", state, format="safetensors")
    out = ckptcore.restore(tmp_path / "c")
    _bits_equal(state["__metadata__"], out["__metadata__"])
    _bits_equal(state["x"]["__metadata__"], out["x"]["__metadata__"])
    (file,) = _files(tmp_path / "c")
    assert set(load_file(file)) == {"~__metadata__", "x/__metadata__"}


def test_partial_restore_and_dtype_cast(tmp_path):
    state = {"a": np.arange(1000, dtype=np.float32).reshape(10, 100), "b": np.ones(7, np.float64),
             "c": (np.arange(6) + 1j).astype(np.complex128)}
    ckptcore.save(tmp_path / "c", state, format="safetensors")
    target = {"a": np.zeros((10, 100), np.float64), "c": np.zeros(6, np.complex64)}
    out = ckptcore.restore(tmp_path / "c", target=target, partial=True)
    assert set(out) == {"a", "c"}
    assert out["a"].dtype == np.float64 and np.array_equal(out["a"], state["a"])
    assert out["c"].dtype == np.complex64 and np.array_equal(out["c"], state["c"].astype(np.complex64))


def test_results_are_aligned_and_writable(tmp_path):
    state = {"a": np.random.default_rng(0).standard_normal((512, 300)).astype(np.float32)}
    ckptcore.save(tmp_path / "c", state, format="safetensors")
    out = ckptcore.restore(tmp_path / "c")["a"]
    assert out.ctypes.data % 64 == 0 and out.flags.writeable and out.flags.c_contiguous
    np.testing.assert_array_equal(out, state["a"])


def test_direct_io_writes_the_same_bytes_as_the_page_cache(tmp_path, monkeypatch):
    from ckptcore_safetensors import fileio

    monkeypatch.setattr(fileio, "DIRECT_STRIPE_BYTES", 3 * fileio.DIRECT_ALIGN)  # many stripes, tensors across them
    opened_direct = []
    real_open = fileio._open_direct

    def recording_open(path):
        fd = real_open(path)
        opened_direct.append(fd)
        return fd

    monkeypatch.setattr(fileio, "_open_direct", recording_open)
    rng = np.random.default_rng(3)
    state = {"big": rng.standard_normal(10_001).astype(np.float32), "odd": rng.integers(0, 255, 77, dtype=np.uint8),
             **{f"s{i}": np.full(i + 1, i, np.int16) for i in range(40)}}
    ckptcore.save(tmp_path / "direct", state, format="safetensors")
    ckptcore.save(tmp_path / "cached", state, format="safetensors", format_options={"direct_io": False})
    assert len(opened_direct) == 1  # the buffered save never tried O_DIRECT
    if opened_direct[0] is None:  # the fallback is only taken where the file system refuses O_DIRECT
        with pytest.raises(OSError):
            os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    (a,), (b,) = _files(tmp_path / "direct"), _files(tmp_path / "cached")
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()  # padding cut off, gaps zero, every byte where the header says
    out = ckptcore.restore(tmp_path / "direct")
    for k, v in state.items():
        _bits_equal(v, out[k])


def test_file_splitting_at_max_file_bytes(tmp_path):
    from safetensors.numpy import load_file

    state = {f"w{i}": np.full((1000,), i, np.float32) for i in range(10)}  # 4,000 bytes each
    state["big"] = np.arange(5000, dtype=np.float32)  # over the limit: a file of its own
    ckptcore.save(tmp_path / "c", state, format="safetensors", format_options={"max_file_bytes": 10_000})
    files = _files(tmp_path / "c")
    assert len(files) == 6 and all(os.path.basename(f).startswith("data-") for f in files)
    assert os.path.basename(files[0]) == "data-00001-of-00006.safetensors"
    seen = {}
    for f in files:
        seen.update(load_file(f))
    assert set(seen) == set(state)
    out = ckptcore.restore(tmp_path / "c")
    for k, v in state.items():
        _bits_equal(v, out[k])


def test_unknown_or_bad_format_options(tmp_path):
    with pytest.raises(InvalidOptionError, match="max_file_byte"):
        ckptcore.save(tmp_path / "a", {"a": np.ones(3)}, format="safetensors", format_options={"max_file_byte": 1})
    with pytest.raises(InvalidOptionError, match="align"):
        ckptcore.save(tmp_path / "b", {"a": np.ones(3)}, format="safetensors", format_options={"align": 100})


# -- the format object directly: shards and regions ------------------------------------------


def _location(path):
    import dataclasses

    import fsspec

    # The core's Location is changing (kvstore -> a format-neutral address); fill whichever it has.
    fields = {f.name for f in dataclasses.fields(ckptcore.Location)}
    extra: dict = {}
    if "address" in fields:
        from ckptcore.plugins.address import StorageAddress

        extra["address"] = StorageAddress(scheme="file", path=str(path).rstrip("/") + "/")
    if "kvstore" in fields:
        extra["kvstore"] = {"driver": "file", "path": str(path).rstrip("/") + "/"}
    return ckptcore.Location(url=str(path), scheme="file", fs=fsspec.filesystem("file"), path=str(path), **extra)


def _format():
    from ckptcore_safetensors.safetensors_format import SafetensorsFormat

    return SafetensorsFormat()


@pytest.mark.parametrize("dtype", ["float32", "int4", "complex128", "bfloat16"])
def test_shards_and_regions_read_only_what_is_asked(tmp_path, dtype, monkeypatch):
    from ckptcore_safetensors import fileio

    dt = _dtype(dtype)
    full = _sample(dt, (64, 48, 5), seed=7)
    shards = tuple(
        ckptcore.Shard(index=(slice(r, r + 16), slice(c, c + 24), slice(0, 5)), data=full[r : r + 16, c : c + 24])
        for r in range(0, 64, 16) for c in range(0, 48, 24)
    )
    req = ckptcore.WriteRequest(key="x/w", shape=full.shape, dtype=dt, shards=shards + shards[:1])  # a replica too
    (info,) = _format().write(_location(tmp_path), [req], {})
    assert len(info["shards"]) == 8
    regions = (
        (slice(0, 64), slice(0, 48), slice(0, 5)),  # all of it
        (slice(8, 40), slice(10, 40), slice(1, 4)),  # across shards, short runs
        (slice(16, 32), slice(24, 48), slice(0, 5)),  # exactly one shard
        (slice(5, 6), slice(0, 48), slice(0, 5)),  # one row across two shards
        (slice(3, 3), slice(0, 48), slice(0, 5)),  # empty
    )
    read = ckptcore.ReadRequest(key="x/w", shape=full.shape, saved_dtype=dt, dtype=dt, info=info, regions=regions)
    calls = []
    real = fileio._preadv_all
    monkeypatch.setattr(fileio, "_preadv_all", lambda fd, bufs, off, path: (calls.append(sum(map(len, bufs))), real(fd, bufs, off, path)))
    (got,) = _format().read(_location(tmp_path), [read], {})
    for region, array in zip(regions, got, strict=True):
        _bits_equal(full[region], array)
    # Reading only one shard's region reads that shard's bytes and nothing else.
    calls.clear()
    (got,) = _format().read(_location(tmp_path), [read.__class__(**{**read.__dict__, "regions": (regions[2],)})], {})
    assert sum(calls) == full[regions[2]].nbytes


def test_neighbouring_tensors_are_read_in_one_call(tmp_path, monkeypatch):
    from ckptcore_safetensors import fileio

    arrays = [np.full((100,), i, np.float32) for i in range(300)]
    reqs = [ckptcore.WriteRequest(key=f"k{i}", shape=a.shape, dtype=a.dtype, shards=(ckptcore.Shard((slice(0, 100),), a),))
            for i, a in enumerate(arrays)]
    infos = _format().write(_location(tmp_path), reqs, {})
    calls = []
    real = fileio._preadv_all
    monkeypatch.setattr(fileio, "_preadv_all", lambda fd, bufs, off, path: (calls.append(len(bufs)), real(fd, bufs, off, path)))
    reads = [ckptcore.ReadRequest(key=r.key, shape=r.shape, saved_dtype=r.dtype, dtype=r.dtype, info=i, regions=((slice(0, 100),),))
             for r, i in zip(reqs, infos, strict=True)]
    got = _format().read(_location(tmp_path), reads, {})
    assert len(calls) == 1 and calls[0] == 300  # one preadv, one buffer per leaf: no intermediate copy
    for a, (b,) in zip(arrays, got, strict=True):
        _bits_equal(a, b)


# -- jax.Array: sharded save, resharded restore ------------------------------------------


def test_sharded_jax_array_restored_onto_another_mesh(tmp_path):
    jax = pytest.importorskip("jax")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    src_mesh = jax.make_mesh((4, 2), ("x", "y"))
    dst_mesh = jax.make_mesh((2, 4), ("x", "y"))
    host = np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32)
    state = {
        "w": jax.device_put(host, NamedSharding(src_mesh, P("x", "y"))),
        "b": jax.device_put(host[0].astype(ml_dtypes.bfloat16), NamedSharding(src_mesh, P("y"))),
        "r": jax.device_put(host[:8, :8], NamedSharding(src_mesh, P())),  # replicated
    }
    ckptcore.save(tmp_path / "c", state, format="safetensors")
    (file,) = _files(tmp_path / "c")
    _, doc = _header(file)
    assert sum(name.startswith("w@") for name in doc) == 8 and "r" in doc
    target = {
        "w": jax.ShapeDtypeStruct((256, 512), np.float32, sharding=NamedSharding(dst_mesh, P("x", "y"))),
        "b": jax.ShapeDtypeStruct((512,), np.float32, sharding=NamedSharding(dst_mesh, P("y"))),
        "r": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=NamedSharding(dst_mesh, P(None, "y"))),
    }
    out = ckptcore.restore(tmp_path / "c", target=target)
    assert out["w"].sharding == target["w"].sharding
    np.testing.assert_array_equal(np.asarray(out["w"]), host)
    np.testing.assert_array_equal(np.asarray(out["b"]), host[0].astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(out["r"]), host[:8, :8])
    for shard in out["w"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])


# -- object stores -------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["tensorstore", "fsspec"])
def test_object_store_round_trip(cloud, tmp_path, via, monkeypatch):
    import importlib.util

    from ckptcore_safetensors import tensorstore_io
    from safetensors.numpy import load_file

    plugin = "ckptcore_gcs" if cloud.scheme == "gs" else "ckptcore_s3"
    if importlib.util.find_spec(plugin) is None:  # this plugin's tests also run beside the core alone
        pytest.skip(f"{plugin} is not installed")
    if via == "tensorstore" and importlib.util.find_spec("ckptcore_zarr3") is None:
        pytest.skip("ckptcore-zarr3 (TensorStore) is not installed")
    opened = []
    real_open = tensorstore_io.open_kvstore

    def open_kvstore(location):
        kv = real_open(location) if via == "tensorstore" else None
        opened.append(kv)
        return kv

    monkeypatch.setattr(tensorstore_io, "open_kvstore", open_kvstore)

    rng = np.random.default_rng(1)
    state = {"big": rng.standard_normal((512, 1024)).astype(np.float32), "c": (np.arange(10) * 1j).astype(np.complex128),
             "small": {f"s{i}": np.full((3,), i, np.int32) for i in range(50)}, "z": np.zeros((0,), np.float32)}
    url = cloud.url("st")
    ckptcore.save(url, state, format="safetensors", format_options={"max_file_bytes": 1 << 20})
    out = ckptcore.restore(url)
    _bits_equal(state["big"], out["big"])
    _bits_equal(state["c"], out["c"])
    _bits_equal(state["z"], out["z"])
    for i in range(50):
        _bits_equal(state["small"][f"s{i}"], out["small"][f"s{i}"])
    part = ckptcore.restore(url, target={"big": np.zeros((512, 1024), np.float64)}, partial=True)
    np.testing.assert_array_equal(part["big"], state["big"])
    # The objects are plain safetensors files, split at max_file_bytes.
    if cloud.scheme == "gs":
        import gcsfs

        fs = gcsfs.GCSFileSystem(endpoint_url=cloud.server.endpoint, token="anon", project="test")
    else:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=cloud.server.endpoint, key="testing", secret="testing")
    names = sorted(p for p in fs.find(f"{cloud.bucket}/st") if p.endswith(".safetensors"))
    assert len(names) == 2, names
    loaded = {}
    for name in names:
        local = str(tmp_path / os.path.basename(name))
        fs.get(name, local)
        loaded.update(load_file(local))
    np.testing.assert_array_equal(loaded["big"], state["big"])
    np.testing.assert_array_equal(loaded["small/s7"], state["small"]["s7"])
    assert len(opened) >= 3 and all((kv is not None) == (via == "tensorstore") for kv in opened)  # save + 2 restores
    # A truncated object is found, whichever client reads it.
    biggest = max(names, key=lambda n: fs.info(n)["size"])
    fs.pipe_file(biggest, fs.cat_file(biggest)[: -4096])
    with pytest.raises(CorruptCheckpointError, match=r"safetensors|truncated|fewer bytes"):
        ckptcore.restore(url)


# -- bad input ------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    state = {"a": np.arange(4096, dtype=np.float32).reshape(64, 64), "b": np.arange(100, dtype=np.int64)}
    ckptcore.save(tmp_path / "c", state, format="safetensors")
    (file,) = _files(tmp_path / "c")
    return tmp_path / "c", file


def _restore_fails(path, *match):
    with pytest.raises(CorruptCheckpointError) as err:
        ckptcore.restore(path)
    for m in match:
        assert m in str(err.value), str(err.value)
    return err.value


def test_truncated_file(saved):
    path, file = saved
    os.truncate(file, os.path.getsize(file) - 100)
    _restore_fails(path, file)
    os.truncate(file, 5)
    _restore_fails(path, file, "truncated")


def test_header_over_the_size_limit(saved):
    path, file = saved
    with open(file, "r+b") as f:
        f.write(struct.pack("<Q", 200_000_000))
    _restore_fails(path, file, "limit")


def test_header_claims_more_than_the_file(saved):
    path, file = saved
    with open(file, "r+b") as f:
        f.write(struct.pack("<Q", os.path.getsize(file) + 10))
    _restore_fails(path, file, "truncated")


def test_data_offsets_out_of_range(saved):
    path, file = saved
    size = os.path.getsize(file)

    def edit(doc):
        doc["b"]["data_offsets"] = [size, size + 800]

    _rewrite_header(file, edit)
    _restore_fails(path, file, "'b'", "past the end")


def test_overlapping_data_offsets(saved):
    path, file = saved

    def edit(doc):
        doc["b"]["data_offsets"] = [0, 800]  # "a" starts at 0

    _rewrite_header(file, edit)
    _restore_fails(path, file, "overlaps")


def test_tensor_name_not_in_the_header(saved):
    path, file = saved

    def edit(doc):
        doc["renamed"] = doc.pop("b")

    _rewrite_header(file, edit)
    _restore_fails(path, file, "'b'")


def test_dtype_or_shape_not_matching_the_index(saved):
    path, file = saved

    def edit(doc):
        doc["b"]["dtype"] = "F64"

    _rewrite_header(file, edit)
    _restore_fails(path, file, "'b'", "F64")

    def edit_shape(doc):
        doc["b"]["dtype"] = "I64"
        doc["b"]["shape"] = [50, 2]

    _rewrite_header(file, edit_shape)
    _restore_fails(path, file, "'b'", "[50, 2]")


def test_header_not_json_and_nothing_executed(saved):
    path, file = saved
    with open(file, "r+b") as f:
        f.seek(8)
        f.write(b"__import__('os').system('touch /tmp/pwned')" + b" " * 10)
    _restore_fails(path, file, "not valid JSON")
    assert not os.path.exists("/tmp/pwned")


def test_index_naming_a_file_outside_the_directory(saved):
    path, _ = saved
    index_file = os.path.join(str(path), "ckptcore_index.json")
    raw = open(index_file).read()
    assert '"file": "data.safetensors"' in raw or '"file":"data.safetensors"' in raw
    open(index_file, "w").write(raw.replace("data.safetensors", "../../../etc/passwd.safetensors", 1))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        ckptcore.restore(path)


def test_bit_flip_in_data_is_a_checksum_error(saved):
    path, file = saved
    n, doc = _header(file)
    with open(file, "r+b") as f:
        f.seek(8 + n + doc["a"]["data_offsets"][0] + 123)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CheckpointError):
        ckptcore.restore(path)
