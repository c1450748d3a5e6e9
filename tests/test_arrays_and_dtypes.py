"""The dtype and layout matrix of array leaves, through real TensorStore, in both formats (issue 2, items 2 and 5)."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

import ckptcore
from ckptcore.io.index import INDEX_FILE

FORMATS = ["ocdbt", "zarr3"]

DTYPES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
    "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz",
    "int4", "uint4", "int2", "float8_e4m3", "float8_e3m4", "float6_e2m3fn", "float4_e2m1fn",
    # kinds newer ml_dtypes releases added (0.7: float8_e5m3fnu), tested where installed
    *[name for name in ("float8_e5m3fnu",) if hasattr(ml_dtypes, name)],
]


def _dtype(name: str) -> np.dtype:
    found = getattr(ml_dtypes, name, None)
    return np.dtype(found if found is not None else name)


def _sample(dtype: np.dtype, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.integers(0, 2, n).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
    if dtype.kind == "c":
        return (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(n).astype(dtype)
    # ml_dtypes: draw raw values from the small-integer or float range the type can hold
    if "int" in dtype.name:
        info = ml_dtypes.iinfo(dtype)
        return rng.integers(int(info.min), int(info.max), n, endpoint=True).astype(dtype)
    return (rng.standard_normal(n) * 2).astype(dtype)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape
    assert b.flags.c_contiguous
    assert np.ascontiguousarray(a).tobytes() == b.tobytes()


def test_the_dtype_list_covers_every_ml_dtype():
    # A new ml_dtypes release adding a kind should show up here, not silently go untested.
    names = {n for n in dir(ml_dtypes) if isinstance(getattr(ml_dtypes, n), type) and n not in ("finfo", "iinfo")}
    untested = names - set(DTYPES) - {"float6_e3m2fn", "bcomplex32", "complex32", "int1", "uint1", "uint2", "float8_e8m0fnu"}
    assert not untested


@pytest.mark.parametrize("fmt", FORMATS)
def test_dtype_matrix_small_packed_and_large(tmp_path, fmt):
    state, expected = {}, {}
    for name in DTYPES:
        dtype = _dtype(name)
        small = _sample(dtype, 37, seed=1)
        large = _sample(dtype, (80 << 10) // dtype.itemsize + 3, seed=2)  # > 64 KiB: its own array, not packed
        state[name] = {"small": small, "large": large.reshape(-1, 1) if name == "int8" else large,
                       "scalar0d": np.asarray(small[0]), "empty": np.zeros((0, 3), dtype)}
        expected[name] = state[name]
    ckptcore.save(tmp_path / "ck", state, format=fmt)
    doc = json.loads((tmp_path / "ck" / INDEX_FILE).read_text())
    records = {item["key"]: item["value"] for item in doc["tree"]["items"]}
    for name in DTYPES:
        leaves = {i["key"]: i["value"] for i in records[name]["items"]}
        assert leaves["small"]["format"] == fmt and leaves["small"]["dtype"] == name
        assert "packed" in leaves["small"]["format_info"]
        assert "packed" not in leaves["large"]["format_info"]
        assert leaves["large"]["checksum"].startswith("crc32c:")
    back = ckptcore.restore(tmp_path / "ck")
    for name in DTYPES:
        for kind, array in expected[name].items():
            _bits_equal(array, back[name][kind])
    meta = ckptcore.metadata(tmp_path / "ck")
    assert meta["bfloat16"]["large"].dtype == _dtype("bfloat16")
    assert meta["float16"]["empty"].shape == (0, 3) and meta["float16"]["scalar0d"].shape == ()


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_contiguous_and_big_endian_inputs(tmp_path, fmt):
    base = np.arange(200 * 300, dtype=np.float32).reshape(200, 300)
    state = {
        "strided": base[::3, 1::2],
        "transposed": base.T,
        "fortran": np.asfortranarray(base),
        "negative_stride": base[::-1, ::-7],
        "big_endian": np.arange(40_000, dtype=">i4").reshape(200, 200),
        "big_endian_small": np.array([1.5, -2.25], dtype=">f8"),
        "big_endian_complex": np.array([1 + 2j], dtype=">c16"),
        "broadcast": np.broadcast_to(np.arange(5, dtype=np.int16), (20_000, 5)),
        "readonly": np.frombuffer(bytes(range(256)) * 400, dtype=np.uint8),
    }
    ckptcore.save(tmp_path / "ck", state, format=fmt)
    back = ckptcore.restore(tmp_path / "ck")
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
        assert back[key].dtype == value.dtype.newbyteorder("=")
        assert back[key].dtype.isnative
    assert back["transposed"].shape == (300, 200)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("compression", ["auto", "zstd", "none"])
def test_chunk_bytes_and_compression(tmp_path, fmt, compression):
    compressible = np.ones((512, 256), np.float32)  # 512 KiB of ones (zeros would not be stored: fill value)
    noise = np.random.default_rng(0).standard_normal((300, 200)).astype(np.float64)  # ~470 KiB
    state = {"zeros": compressible, "noise": noise}
    ckptcore.save(tmp_path / "ck", state, format=fmt, format_options={"chunk_bytes": 64 << 10, "compression": compression})
    doc = json.loads((tmp_path / "ck" / INDEX_FILE).read_text())
    info = {item["key"]: item["value"]["format_info"] for item in doc["tree"]["items"]}
    for key, value in state.items():
        chunks = info[key]["chunks"]
        assert np.prod(chunks) * value.itemsize <= 64 << 10
        n_chunks = np.prod([-(-s // c) for s, c in zip(value.shape, chunks, strict=True)])
        assert n_chunks >= 4, (key, chunks)
    expected = {"auto": ("zstd", "none"), "zstd": ("zstd", "zstd"), "none": ("none", "none")}[compression]
    assert (info["zeros"]["compression"], info["noise"]["compression"]) == expected
    if fmt == "zarr3":
        chunk_files = [f for _, _, files in os.walk(tmp_path / "ck" / "zarr3" / "zeros") for f in files if f != "zarr.json"]
        assert len(chunk_files) >= 4
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "ck" / "zarr3" / "zeros") for f in fs)
        if compression == "none":
            assert size >= compressible.nbytes
        else:
            assert size < compressible.nbytes // 10
    back = ckptcore.restore(tmp_path / "ck")
    for key, value in state.items():
        _bits_equal(value, back[key])


def test_invalid_compression_option_fails_before_commit(tmp_path):
    with pytest.raises(ckptcore.CheckpointError, match="compression"):
        ckptcore.save(tmp_path / "ck", {"a": np.ones(100_000)}, format_options={"compression": "lz77"})
    assert os.listdir(tmp_path) == []


def test_unknown_format_name_is_a_missing_plugin(tmp_path):
    with pytest.raises(ckptcore.errors.MissingPluginError, match="no-such-format"):
        ckptcore.save(tmp_path / "ck", {"a": np.ones(3)}, format="no-such-format")
    assert os.listdir(tmp_path) == []
