"""Local tensors of 1 MiB and more are restored as copy-on-write mappings of their file: no copy, no fresh memory.

Whether a result is a mapping is read from the kernel (``/proc/self/maps``), not from
ckptcore: the address of the array's data must lie in a mapping of the checkpoint's file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import struct

import numpy as np
import pytest
from ckptcore_safetensors import fileio

import ckptcore
from ckptcore.errors import CorruptCheckpointError

pytestmark = pytest.mark.skipif(not fileio.CAN_POPULATE, reason="mapping needs Linux 5.14+ (MADV_POPULATE_READ); tensors are read there")

BIG = (1024, 512)  # 2 MiB of float32: mapped
SMALL = (64, 64)  # 16 KiB: copied into an arena


def _mapped_file(address: int) -> str | None:
    """The file whose mapping holds ``address`` in this process, or None (anonymous memory)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5].strip() if len(fields) == 6 and fields[5].startswith("/") else None
    return None


def _file(path) -> str:
    (file,) = glob.glob(os.path.join(path, "**", "*.safetensors"), recursive=True)
    return os.path.realpath(file)


def _state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"big": rng.standard_normal(BIG).astype(np.float32), "small": rng.standard_normal(SMALL).astype(np.float32)}


@pytest.fixture
def saved(tmp_path):
    state = _state()
    ckptcore.save(tmp_path / "c", state, format="safetensors")
    return tmp_path / "c", state


def _evict(file: str) -> None:
    """Drop the file's pages from the page cache (they are clean: the save fsynced them)."""
    fd = os.open(file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_large_tensor_is_a_writable_mapping_of_its_file(saved):
    path, state = saved
    out = ckptcore.restore(path)
    assert _mapped_file(out["big"].ctypes.data) == _file(path)
    assert _mapped_file(out["small"].ctypes.data) is None  # small leaves share arenas of their own memory
    for key in state:
        np.testing.assert_array_equal(out[key], state[key])
        assert out[key].flags.writeable and out[key].flags.c_contiguous and out[key].ctypes.data % 64 == 0


def test_writing_a_mapped_result_never_changes_the_file(saved):
    path, state = saved
    before = hashlib.sha256(open(_file(path), "rb").read()).hexdigest()
    out = ckptcore.restore(path)
    out["big"] += 1.0
    np.testing.assert_array_equal(out["big"], state["big"] + 1.0)
    assert hashlib.sha256(open(_file(path), "rb").read()).hexdigest() == before
    np.testing.assert_array_equal(ckptcore.restore(path)["big"], state["big"])
    ckptcore.verify(path)


def test_a_mapped_result_outlives_its_checkpoint(saved):
    path, state = saved
    out = ckptcore.restore(path)
    shutil.rmtree(path)
    _ = np.arange(1 << 20)  # other memory in use meanwhile
    np.testing.assert_array_equal(out["big"], state["big"])


def test_a_file_not_in_the_page_cache_is_read_through_the_mapping(saved, monkeypatch):
    path, state = saved
    populated: list[int] = []
    real = fileio._populate
    monkeypatch.setattr(fileio, "_populate", lambda m, fd, a, b, p: (populated.append(b - a), real(m, fd, a, b, p)))
    _evict(_file(path))
    out = ckptcore.restore(path)
    assert sum(populated) == state["big"].nbytes  # the mapped tensor's bytes, faulted in up front
    assert _mapped_file(out["big"].ctypes.data) == _file(path)
    np.testing.assert_array_equal(out["big"], state["big"])


def test_mapping_off_copies_every_tensor(saved, monkeypatch):
    path, state = saved
    monkeypatch.setenv(fileio.MAP_ENV, "0")
    out = ckptcore.restore(path)
    assert _mapped_file(out["big"].ctypes.data) is None
    np.testing.assert_array_equal(out["big"], state["big"])


def test_a_bit_flip_in_a_mapped_tensor_is_found(saved):
    path, _ = saved
    file = _file(path)
    with open(file, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n + json.loads(f.read(n))["big"]["data_offsets"][0] + 1000)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(CorruptCheckpointError, match="big"):
        ckptcore.restore(path)


def test_a_file_cut_short_while_it_is_read_is_a_corrupt_checkpoint_error(saved, monkeypatch):
    path, _ = saved
    file = _file(path)
    real = fileio._populate

    def cut_then_populate(mapping, fd, start, stop, where):
        os.truncate(file, start + 4096)  # after the header was checked, before the pages are read
        _evict(file)
        real(mapping, fd, start, stop, where)

    monkeypatch.setattr(fileio, "_populate", cut_then_populate)
    with pytest.raises(CorruptCheckpointError, match="cut short"):
        ckptcore.restore(path)


def test_a_resharded_restore_maps_each_stored_shard_onto_its_device(tmp_path):
    jax = pytest.importorskip("jax")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    host = np.random.default_rng(1).standard_normal((2048, 1024)).astype(np.float32)  # 1 MiB shards
    src = NamedSharding(jax.make_mesh((4, 2), ("x", "y")), P("x", "y"))
    ckptcore.save(tmp_path / "c", {"w": jax.device_put(host, src)}, format="safetensors")
    dst_mesh = jax.make_mesh((2, 4), ("x", "y"))
    dst = NamedSharding(dst_mesh, P("y", "x"))  # each region is one of the saved shards, on another device
    out = ckptcore.restore(tmp_path / "c", target={"w": jax.ShapeDtypeStruct(host.shape, np.float32, sharding=dst)})["w"]
    assert out.sharding == dst
    file = _file(tmp_path / "c")
    for shard in out.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])
        assert _mapped_file(shard.data.unsafe_buffer_pointer()) == file  # adopted by the CPU device, not copied


def test_a_hugging_face_file_is_mapped_too(tmp_path):
    from safetensors.numpy import save_file

    weights = {"model.embed.weight": np.random.default_rng(2).standard_normal((512, 1024)).astype(np.float32),
               "model.norm.bias": np.ones(7, np.float16)}
    save_file(weights, str(tmp_path / "model.safetensors"))
    out = ckptcore.restore(tmp_path / "model.safetensors")
    assert _mapped_file(out["model.embed.weight"].ctypes.data) == os.path.realpath(tmp_path / "model.safetensors")
    assert _mapped_file(out["model.norm.bias"].ctypes.data) is None  # small: copied
    for name, array in weights.items():
        np.testing.assert_array_equal(out[name], array)


def test_saving_over_a_mapped_checkpoint_leaves_its_arrays_as_restored(saved):
    path, state = saved
    out = ckptcore.restore(path)
    ckptcore.save(path, {k: v * 2 for k, v in state.items()}, format="safetensors", force=True)
    np.testing.assert_array_equal(ckptcore.restore(path)["big"], state["big"] * 2)
    np.testing.assert_array_equal(out["big"], state["big"])  # the old file's pages, never rewritten in place
