"""jax.Array leaves: sharded save, resharding restore, dtype casts, partial restore, metadata (issue 3).

The array format is the real TensorStore ``ocdbt`` format, wrapped by an in-process plugin
that records every write and read request: real storage, just observed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import ckptcore
from ckptcore.errors import ChecksumMismatchError, TargetMismatchError
from ckptcore.io import jax_leaves as jax_arrays
from ckptcore.io import save as saving
from ckptcore.io.index import INDEX_FILE
from ckptcore.plugins.hookspecs import hookimpl
from ckptcore.plugins.registrations import ArrayFormatRegistration

SHAPE = (256, 256)  # 256 KiB of float32: above SMALL_GATHER_BYTES, so shards are written and read one by one


class RecordingFormat:
    """Delegates to the real TensorStore format and keeps every request it is handed."""

    def __init__(self) -> None:
        from ckptcore_zarr3.tensorstore_format import TensorStoreFormat

        self.real = TensorStoreFormat(ocdbt=True)
        self.writes: list = []
        self.reads: list[list] = []  # one list of requests per read call (a wave)

    def write(self, location, requests, options):
        self.writes.extend(requests)
        return self.real.write(location, requests, options)

    def read(self, location, requests, options):
        self.reads.append(list(requests))
        return self.real.read(location, requests, options)

    def read_requests(self) -> list:
        return [r for wave in self.reads for r in wave]


class _Plugin:
    def __init__(self, fmt: RecordingFormat) -> None:
        self.fmt = fmt

    @hookimpl
    def ckptcore_array_formats(self):
        return [ArrayFormatRegistration(name="recorded", format=self.fmt, version=1)]


@pytest.fixture
def rec():
    fmt = RecordingFormat()
    name = ckptcore.register_plugin(_Plugin(fmt), name="recording-format")
    yield fmt
    ckptcore.unregister_plugin(name)


def mesh(shape: tuple[int, ...], names: tuple[str, ...], devices=None):
    devices = devices if devices is not None else jax.devices()[: math.prod(shape)]
    return jax.make_mesh(shape, names, devices=devices)


def data(shape=SHAPE, dtype=np.float32) -> np.ndarray:
    return np.arange(math.prod(shape), dtype=np.float64).reshape(shape).astype(dtype)


def region_key(index) -> tuple:
    return tuple((s.start, s.stop) for s in index)


def expected_regions(sharding, shape) -> set:
    return {
        tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))
        for index in sharding.addressable_devices_indices_map(shape).values()
    }


M42 = ((4, 2), ("data", "model"))
SAVE_SHARDINGS = {
    "2d": lambda: NamedSharding(mesh(*M42), P("data", "model")),
    "2d_partial": lambda: NamedSharding(mesh(*M42), P("data")),
    "2d_replicated": lambda: NamedSharding(mesh(*M42), P()),
    "1d": lambda: NamedSharding(mesh((8,), ("x",)), P(None, "x")),
    "single": lambda: SingleDeviceSharding(jax.devices()[3]),
}


@pytest.fixture
def saved(tmp_path, rec):
    state = {"w": jax.device_put(data(), NamedSharding(mesh(*M42), P("data", "model"))), "b": data((4, 4)), "step": 3}
    path = tmp_path / "ck"
    ckptcore.save(path, state, format="recorded")
    rec.writes.clear()
    return SimpleNamespace(path=path, state=state)


# -- save -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SAVE_SHARDINGS))
def test_each_distinct_shard_written_once_with_shard_chunks(tmp_path, rec, kind):
    sharding = SAVE_SHARDINGS[kind]()
    value = jax.device_put(data(), sharding)
    ckptcore.save(tmp_path / "ck", {"w": value}, format="recorded")
    (request,) = rec.writes
    indices = [region_key(s.index) for s in request.shards]
    assert len(indices) == len(set(indices))  # no replica written twice
    assert set(indices) == expected_regions(sharding, SHAPE)
    assert sum(s.data.size for s in request.shards) == math.prod(SHAPE)  # each element exactly once
    for shard in request.shards:
        np.testing.assert_array_equal(shard.data, data()[shard.index])
    whole = len(indices) == 1
    assert request.chunk_hint == (None if whole else tuple(sharding.shard_shape(SHAPE)))
    back = ckptcore.restore(tmp_path / "ck")
    np.testing.assert_array_equal(np.asarray(back["w"]), data())


def test_index_records_logical_sharding_never_device_ids(tmp_path):
    m = mesh(*M42)
    state = {
        "named": jax.device_put(data(), NamedSharding(m, P(("data", "model"), None))),
        "partial": jax.device_put(data(), NamedSharding(m, P(None, "model"))),
        "single": jax.device_put(data((3,)), jax.devices()[5]),
    }
    ckptcore.save(tmp_path / "ck", state)
    meta = ckptcore.metadata(tmp_path / "ck")
    assert meta["named"].kind == "jax_array" and meta["named"].shape == SHAPE and meta["named"].dtype == np.float32
    assert meta["named"].sharding == {
        "type": "named",
        "mesh": {"axis_names": ["data", "model"], "axis_sizes": [4, 2], "axis_types": ["Explicit", "Explicit"]},
        "spec": [["data", "model"], None],
    }
    assert meta["partial"].sharding["spec"] == [None, "model"]
    assert meta["single"].sharding == {"type": "single_device"}
    text = (tmp_path / "ck" / INDEX_FILE).read_text()
    assert "cpu" not in text.lower() and "device_id" not in text and '"id"' not in text


def test_metadata_reads_no_array_data(saved, rec):
    meta = ckptcore.metadata(saved.path)
    assert meta["w"].sharding["spec"] == ["data", "model"]
    assert rec.reads == []


# -- resharding restore -----------------------------------------------------------------


def _targets():
    devs = jax.devices()
    return {
        "8_swapped_2x4": lambda: NamedSharding(mesh((2, 4), ("model", "data")), P("data", "model")),
        "8_transposed_spec": lambda: NamedSharding(mesh(*M42), P("model", "data")),
        "8_replicated": lambda: NamedSharding(mesh(*M42), P()),
        "8_partial": lambda: NamedSharding(mesh(*M42), P(None, "model")),
        "8_1d_cols": lambda: NamedSharding(mesh((8,), ("x",)), P(None, "x")),
        "4_1d": lambda: NamedSharding(mesh((4,), ("x",)), P("x")),
        "4_2x2_last_devices": lambda: NamedSharding(mesh((2, 2), ("a", "b"), devs[4:8]), P("b", "a")),
        "2_1d": lambda: NamedSharding(mesh((2,), ("x",), devs[6:8]), P(None, "x")),
        "1_mesh": lambda: NamedSharding(mesh((1,), ("x",), devs[2:3]), P("x")),
        "1_single": lambda: SingleDeviceSharding(devs[7]),
    }


@pytest.mark.parametrize("name", sorted(_targets()))
def test_restore_onto_other_meshes_reads_each_region_once(saved, rec, name):
    sharding = _targets()[name]()
    target = {"w": jax.ShapeDtypeStruct(SHAPE, jnp.float32, sharding=sharding), "b": None, "step": None}
    back = ckptcore.restore(saved.path, target)
    assert back["w"].sharding == sharding and back["w"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(back["w"]), data())
    for shard in back["w"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), data()[shard.index])
    (request,) = rec.read_requests()  # "b" (None in the target) is not read
    regions = [region_key(r) for r in request.regions]
    assert len(regions) == len(set(regions)) and set(regions) == expected_regions(sharding, SHAPE)
    read = sum(math.prod(b - a for a, b in r) for r in regions)
    assert read == math.prod(SHAPE)  # replicas are read once, nothing else is read


@pytest.mark.parametrize("kind", sorted(SAVE_SHARDINGS))
def test_any_saved_sharding_restores_onto_2x4(tmp_path, kind):
    value = jax.device_put(data(), SAVE_SHARDINGS[kind]())
    ckptcore.save(tmp_path / "ck", {"w": value})
    sharding = NamedSharding(mesh((2, 4), ("a", "b")), P("b", "a"))
    back = ckptcore.restore(tmp_path / "ck", {"w": jax.ShapeDtypeStruct(SHAPE, jnp.float32, sharding=sharding)})
    assert back["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(back["w"]), data())


def test_existing_arrays_as_target(saved):
    sharding = NamedSharding(mesh((4,), ("x",)), P(None, "x"))
    target = {"w": jax.device_put(np.zeros(SHAPE, np.float32), sharding), "b": np.empty((4, 4), np.float32), "step": 0}
    back = ckptcore.restore(saved.path, target)
    assert back["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(back["w"]), data())
    assert isinstance(back["b"], np.ndarray) and back["step"] == 3


def test_dtype_cast_per_region_in_the_format(saved, rec):
    sharding = NamedSharding(mesh((2, 4), ("model", "data")), P("data"))
    target = {"w": jax.ShapeDtypeStruct(SHAPE, jnp.bfloat16, sharding=sharding)}
    back = ckptcore.restore(saved.path, target, partial=True)
    assert back["w"].dtype == jnp.bfloat16 and back["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(back["w"]), data().astype(jnp.bfloat16))
    (request,) = rec.read_requests()
    # The format is asked for bfloat16 regions: the float32 array is never materialised whole.
    assert request.dtype == np.dtype(jnp.bfloat16) and request.saved_dtype == np.float32
    assert len(request.regions) == 4


def test_small_arrays_are_written_and_read_whole(tmp_path, rec):
    sharding = NamedSharding(mesh(*M42), P("data", "model"))
    small = jax.device_put(data((16, 16)), sharding)
    ckptcore.save(tmp_path / "ck", {"s": small}, format="recorded")
    (request,) = rec.writes
    assert len(request.shards) == 1 and request.shards[0].data.shape == (16, 16)
    back = ckptcore.restore(tmp_path / "ck", {"s": jax.ShapeDtypeStruct((16, 16), jnp.float32, sharding=sharding)})
    assert back["s"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(back["s"]), data((16, 16)))


def test_scalars_empty_and_other_dtypes(tmp_path):
    m = mesh(*M42)
    state = {
        "scalar": jnp.float32(2.5),
        "empty": jax.device_put(np.zeros((0, 8), np.int32), NamedSharding(m, P(None, "data"))),
        "bools": jax.device_put(np.arange(64 * 1024) % 3 == 0, NamedSharding(m, P("data"))),
        "ints": jax.device_put(np.arange(32 * 1024, dtype=np.int64).reshape(64, 512), NamedSharding(m, P("model"))),
        "bf16": jax.device_put(data((128, 512), jnp.bfloat16), NamedSharding(m, P("data", "model"))),
    }
    ckptcore.save(tmp_path / "ck", state)
    back = ckptcore.restore(tmp_path / "ck")
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(np.asarray(back[key]), np.asarray(value))
        assert back[key].sharding.is_equivalent_to(value.sharding, value.ndim) or key == "scalar", key


# -- impossible targets -----------------------------------------------------------------


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: NamedSharding(mesh((8,), ("x",)), P(None, "x")), "divide"),  # 6 columns over 8 devices
        (lambda: NamedSharding(mesh((8,), ("x",)), P("x")), "divide"),  # 12 rows over 8 devices
        (lambda: NamedSharding(mesh((4, 2), ("a", "b")), P(None, ("a", "b"))), "divide"),  # 6 columns over 4x2
    ],
)
def test_impossible_target_sharding_is_a_clear_error(tmp_path, make, words):
    value = data((12, 6))
    ckptcore.save(tmp_path / "ck", {"w": jax.device_put(value)})
    before = sorted(str(p) for p in (tmp_path / "ck").rglob("*"))
    target = {"w": jax.ShapeDtypeStruct((12, 6), jnp.float32, sharding=make())}
    with pytest.raises(TargetMismatchError) as err:
        ckptcore.restore(tmp_path / "ck", target)
    message = str(err.value)
    assert "'w'" in message or "w" in message.split("mismatches:")[1]
    assert words in message and "(12, 6)" in message and "target sharding" in message
    assert sorted(str(p) for p in (tmp_path / "ck").rglob("*")) == before  # the checkpoint is intact
    np.testing.assert_array_equal(np.asarray(ckptcore.restore(tmp_path / "ck")["w"]), value)


# -- no target: the documented default ---------------------------------------------------


def test_default_restores_the_saved_logical_sharding(saved):
    back = ckptcore.restore(saved.path)
    sharding = back["w"].sharding
    assert isinstance(sharding, NamedSharding) and sharding.spec == P("data", "model")
    assert dict(sharding.mesh.shape) == {"data": 4, "model": 2}
    np.testing.assert_array_equal(np.asarray(back["w"]), data())
    assert isinstance(back["b"], np.ndarray) and back["step"] == 3
    # A ShapeDtypeStruct without a sharding gets the same default, with its dtype.
    back = ckptcore.restore(saved.path, {"w": jax.ShapeDtypeStruct(SHAPE, jnp.float16)}, partial=True)
    assert back["w"].dtype == jnp.float16 and back["w"].sharding.spec == P("data", "model")


def test_default_on_fewer_devices_is_one_local_device(tmp_path):
    ckptcore.save(tmp_path / "ck", {"w": jax.device_put(data(), NamedSharding(mesh(*M42), P("data", "model")))})
    # A process with 2 devices cannot form the saved 4x2 mesh: the array lands on its first device.
    code = textwrap.dedent(
        f"""
        import jax, numpy as np, ckptcore
        back = ckptcore.restore({str(tmp_path / "ck")!r})
        w = back["w"]
        assert len(jax.devices()) == 2
        assert w.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), w.sharding
        expected = np.arange({math.prod(SHAPE)}, dtype=np.float64).reshape({SHAPE}).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(w), expected)
        print("ok")
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# -- partial restore, waves, host copies ---------------------------------------------------


def test_partial_restore_reads_only_requested_leaves(tmp_path, rec):
    sharding = NamedSharding(mesh(*M42), P("data"))
    state = {f"l{i}": jax.device_put(data() + i, sharding) for i in range(4)}
    ckptcore.save(tmp_path / "ck", state, format="recorded")
    keys = {w.key for w in rec.writes}
    target = {"l1": jax.ShapeDtypeStruct(SHAPE, jnp.float32, sharding=sharding)}
    back = ckptcore.restore(tmp_path / "ck", target, partial=True)
    assert set(back) == {"l1"}
    assert [r.key for r in rec.read_requests()] == [next(k for k in keys if "l1" in k)]
    rec.reads.clear()
    target = {"l0": None, "l1": None, "l2": target["l1"], "l3": None}
    back = ckptcore.restore(tmp_path / "ck", target)
    assert back["l0"] is None and back["l3"] is None
    np.testing.assert_array_equal(np.asarray(back["l2"]), data() + 2)
    assert len(rec.read_requests()) == 1


def test_max_bytes_in_flight_splits_reads_into_waves(tmp_path, rec):
    sharding = NamedSharding(mesh(*M42), P("data", "model"))
    state = {f"l{i}": jax.device_put(data() * i, sharding) for i in range(6)}
    ckptcore.save(tmp_path / "ck", state, format="recorded")
    target = {k: jax.ShapeDtypeStruct(SHAPE, jnp.float32, sharding=sharding) for k in state}
    nbytes = math.prod(SHAPE) * 4
    back = ckptcore.restore(tmp_path / "ck", target, max_bytes_in_flight=2 * nbytes)
    assert [len(wave) for wave in rec.reads] == [2, 2, 2]
    for k in state:
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(state[k]))


def test_finisher_releases_host_regions(tmp_path):
    sharding = NamedSharding(mesh(*M42), P("data"))
    record = {"kind": "jax_array", "key": "w", "shape": list(SHAPE), "dtype": "float32", "nbytes": 4 * math.prod(SHAPE)}
    target = jax.ShapeDtypeStruct(SHAPE, jnp.float32, sharding=sharding)
    request, finish = jax_arrays.plan_read(("w",), record, target, SHAPE, np.dtype(np.float32))
    results = [np.ascontiguousarray(data()[r]) for r in request.regions]
    out = finish(results)
    assert results == []  # every host region was dropped once it was on its devices
    np.testing.assert_array_equal(np.asarray(out), data())


def test_corrupt_shard_is_detected_by_its_checksum(saved):
    index_file = saved.path / INDEX_FILE
    doc = json.loads(index_file.read_text())
    record = next(i["value"] for i in doc["tree"]["items"] if i["key"] == "w")
    assert len(record["shard_checksums"]) == 8
    record["shard_checksums"][3]["checksum"] = "crc32:00000000"
    index_file.write_text(json.dumps(doc))
    target = {"w": jax.ShapeDtypeStruct(SHAPE, jnp.float32, sharding=NamedSharding(mesh(*M42), P("data", "model")))}
    with pytest.raises(ChecksumMismatchError, match=r"does not match its checksum"):
        ckptcore.restore(saved.path, target, partial=True)


# -- snapshots for async saves -------------------------------------------------------------


def test_prepared_snapshot_survives_deleting_the_arrays(tmp_path):
    sharding = NamedSharding(mesh(*M42), P("data", "model"))
    value = jax.device_put(data(), sharding)
    prepared = saving.prepare({"w": value, "k": jax.random.key(1)}, copy=True)
    value.delete()  # e.g. donated to the next training step while the save runs in the background
    from ckptcore import storage

    saving.write(prepared, storage.resolve(tmp_path / "ck"))
    np.testing.assert_array_equal(np.asarray(ckptcore.restore(tmp_path / "ck")["w"]), data())


def test_start_host_copies_walks_containers_and_skips_what_it_cannot_copy():
    sharding = NamedSharding(mesh(*M42), P("data"))
    gone = jax.device_put(data(), sharding)
    gone.delete()
    state = {"a": [jax.device_put(data(), sharding), (jnp.ones(3), None)], "b": gone, "c": np.ones(2), "d": "x"}
    jax_arrays.start_host_copies(state)  # never raises: saving reports bad leaves itself
