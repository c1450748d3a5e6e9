"""AsyncCheckpointer: snapshot semantics, background failures, timeouts, byte budget, concurrency (issue 5)."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time

import numpy as np
import pytest
from ckptcore_zarr3.tensorstore_format import TensorStoreFormat

import ckptcore
from ckptcore import hookimpl
from ckptcore.errors import (
    AlreadyExistsError,
    BackgroundWriteError,
    CheckpointerClosedError,
    CheckpointNotFoundError,
    CheckpointTimeoutError,
    InvalidMetadataError,
    InvalidOptionError,
    UnsupportedLeafError,
)
from ckptcore.plugins.registrations import ArrayFormatRegistration

GATE_LIMIT_S = 60  # a broken test must not hang the suite


class GatedFormat:
    """The real ocdbt format, but ``write`` waits for ``release`` and may fail after writing."""

    def __init__(self) -> None:
        self.real = TensorStoreFormat(ocdbt=True)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()
        self.fail_with: BaseException | None = None
        self.requests: list = []

    def write(self, location, requests, options):
        self.requests.append(list(requests))
        self.entered.set()
        try:
            self.release.wait(GATE_LIMIT_S)
            infos = self.real.write(location, requests, options)
            if self.fail_with is not None:
                raise self.fail_with
            return infos
        finally:
            self.returned.set()

    def read(self, location, requests, options):
        return self.real.read(location, requests, options)


class _Plugin:
    def __init__(self, fmt: GatedFormat) -> None:
        self.fmt = fmt

    @hookimpl
    def ckptcore_array_formats(self):
        return [ArrayFormatRegistration(name="gated", format=self.fmt, version=1)]


@pytest.fixture
def gated():
    fmt = GatedFormat()
    name = ckptcore.register_plugin(_Plugin(fmt), name="gated-format")
    yield fmt
    fmt.release.set()
    fmt.returned.wait(GATE_LIMIT_S)
    ckptcore.unregister_plugin(name)


def state(seed: int = 0, n: int = 1 << 16) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "params": {"w": rng.standard_normal((n // 64, 64)).astype(np.float32), "b": np.arange(5, dtype=np.int64)},
        "big": rng.standard_normal(n * 20),  # 10 MiB by default: copied in pieces by several threads
        "step": seed,
        "name": "run",
    }


def assert_equal(restored, expected) -> None:
    np.testing.assert_array_equal(restored["params"]["w"], expected["params"]["w"])
    np.testing.assert_array_equal(restored["params"]["b"], expected["params"]["b"])
    np.testing.assert_array_equal(restored["big"], expected["big"])
    assert restored["step"] == expected["step"] and restored["name"] == expected["name"]


def copy_of(tree: dict) -> dict:
    return {
        "params": {k: v.copy() for k, v in tree["params"].items()}, "big": tree["big"].copy(),
        "step": tree["step"], "name": tree["name"],
    }


def no_leftovers(directory) -> list[str]:
    return [p for p in os.listdir(directory) if ".ckptcore-" in p]


def wait_no_leftovers(directory) -> None:
    deadline = time.monotonic() + GATE_LIMIT_S
    while no_leftovers(directory) and time.monotonic() < deadline:
        time.sleep(0.05)


# -- round trip and snapshot semantics ---------------------------------------------------


@pytest.mark.parametrize("cls", [ckptcore.AsyncCheckpointer, ckptcore.Checkpointer])
def test_round_trip_metadata_and_interface(tmp_path, cls):
    s = state()
    with cls() as ck:
        ck.save(tmp_path / "a", s, metadata={"epoch": 3})
        ck.wait_until_finished()
        assert not ck.is_saving_in_progress()
        assert_equal(ck.restore(tmp_path / "a"), s)
        meta = ck.metadata(tmp_path / "a")
        assert meta["params"]["w"].shape == s["params"]["w"].shape and meta["step"] == 0
        assert ckptcore.info(tmp_path / "a").metadata == {"epoch": 3}
        partial = ck.restore(tmp_path / "a", {"params": {"b": np.zeros(5, np.int64)}}, partial=True)
        np.testing.assert_array_equal(partial["params"]["b"], s["params"]["b"])


def test_mutating_and_deleting_numpy_buffers_after_save(tmp_path, gated):
    s = state(1)
    expected = copy_of(s)
    ck = ckptcore.AsyncCheckpointer()
    ck.save(tmp_path / "a", s, format="gated")
    assert ck.is_saving_in_progress()
    # The write has not even started reading: every change below happens before it.
    s["params"]["w"][:] = -1
    s["big"] *= 0
    del s["params"]["b"]
    s["step"] = 99
    gated.release.set()
    ck.wait_until_finished()
    assert_equal(ckptcore.restore(tmp_path / "a"), expected)
    ck.close()


def test_reused_buffers_never_leak_into_an_earlier_checkpoint(tmp_path, gated):
    gated.release.set()
    first, second = state(2), state(3)
    expected_first, expected_second = copy_of(first), copy_of(second)
    with ckptcore.AsyncCheckpointer() as ck:
        ck.save(tmp_path / "a", first, format="gated")
        ck.wait_until_finished()
        ck.save(tmp_path / "b", second, format="gated")
        ck.wait_until_finished()
    # the second snapshot went into the first one's buffers (same sizes)...
    big_first = next(r for r in gated.requests[0] if r.key == "big").shards[0].data
    big_second = next(r for r in gated.requests[1] if r.key == "big").shards[0].data
    assert np.shares_memory(big_first, big_second)
    # ...and neither checkpoint was affected.
    assert_equal(ckptcore.restore(tmp_path / "a"), expected_first)
    assert_equal(ckptcore.restore(tmp_path / "b"), expected_second)


def test_without_buffer_reuse_each_snapshot_is_fresh(tmp_path, gated):
    gated.release.set()
    with ckptcore.AsyncCheckpointer(reuse_buffers=False) as ck:
        ck.save(tmp_path / "a", state(2), format="gated")
        ck.wait_until_finished()
        ck.save(tmp_path / "b", state(3), format="gated")
    a = next(r for r in gated.requests[0] if r.key == "big").shards[0].data
    b = next(r for r in gated.requests[1] if r.key == "big").shards[0].data
    assert not np.shares_memory(a, b)


def test_donate_hands_the_buffers_over_without_copy(tmp_path, gated):
    s = state(4)
    expected = copy_of(s)
    with ckptcore.AsyncCheckpointer() as ck:
        ck.save(tmp_path / "donated", s, format="gated", donate=True)
        assert gated.entered.wait(GATE_LIMIT_S)
        donated = {r.key: r.shards[0].data for r in gated.requests[0]}
        assert np.shares_memory(donated["big"], s["big"])
        assert np.shares_memory(donated["params/w"], s["params"]["w"])
        gated.release.set()
        ck.wait_until_finished()
        ck.save(tmp_path / "copied", s, format="gated")
        ck.wait_until_finished()
    copied = {r.key: r.shards[0].data for r in gated.requests[1]}
    assert not np.shares_memory(copied["big"], s["big"])
    assert_equal(ckptcore.restore(tmp_path / "donated"), expected)
    assert_equal(ckptcore.restore(tmp_path / "copied"), expected)


# -- background failures -----------------------------------------------------------------


def chain(exc: BaseException) -> list[BaseException]:
    out = []
    while exc is not None:
        out.append(exc)
        exc = exc.__cause__
    return out


def test_failure_surfaces_at_wait_once_and_nothing_is_committed(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    target = tmp_path / "a-file" / "ckpt"  # its parent is a file: creating the staging directory fails
    ck = ckptcore.AsyncCheckpointer()
    ck.save(target, state())
    with pytest.raises(BackgroundWriteError, match="ckpt") as info:
        ck.wait_until_finished()
    assert any(isinstance(e, NotADirectoryError) for e in chain(info.value))
    ck.wait_until_finished()  # raised once, not forever
    with pytest.raises(CheckpointNotFoundError):
        ckptcore.restore(target)
    assert (tmp_path / "a-file").read_text() == "not a directory"
    ck.save(tmp_path / "ok", state())  # the checkpointer is still usable
    ck.close()
    assert_equal(ckptcore.restore(tmp_path / "ok"), state())


def test_failure_surfaces_at_next_save_and_old_checkpoint_survives(tmp_path, gated):
    ckptcore.save(tmp_path / "p", state(5))
    gated.fail_with = OSError(errno.ENOSPC, "No space left on device")
    ck = ckptcore.AsyncCheckpointer()
    ck.save(tmp_path / "p", state(6), format="gated", force=True)
    gated.release.set()
    with pytest.raises(BackgroundWriteError, match="No space left") as info:
        ck.save(tmp_path / "q", state(7))
    assert gated.fail_with in chain(info.value)
    assert not (tmp_path / "q").exists()  # the save that raised wrote nothing
    assert_equal(ckptcore.restore(tmp_path / "p"), state(5))  # the failed overwrite left the old one
    assert no_leftovers(tmp_path) == []
    ck.close()


def test_failure_surfaces_at_close_and_context_exit(tmp_path, gated):
    gated.fail_with = PermissionError(errno.EACCES, "Permission denied")
    ck = ckptcore.AsyncCheckpointer()
    ck.save(tmp_path / "a", state(), format="gated")
    gated.release.set()
    with pytest.raises(BackgroundWriteError, match="Permission denied") as info:
        ck.close()
    assert gated.fail_with in chain(info.value)
    with pytest.raises(CheckpointerClosedError):
        ck.save(tmp_path / "b", state())
    gated.fail_with = RuntimeError("plugin bug")
    with pytest.raises(BackgroundWriteError, match="plugin bug"):
        with ckptcore.AsyncCheckpointer() as ck2:
            ck2.save(tmp_path / "c", state(), format="gated")
    for name in ("a", "c"):
        with pytest.raises(CheckpointNotFoundError):
            ckptcore.restore(tmp_path / name)


def test_real_disk_full_on_a_small_tmpfs(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0 or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True
    ).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); the plugin-raised ENOSPC test covers the logic")
    try:
        big = {"x": np.random.default_rng(0).standard_normal(1 << 19)}  # 4 MiB of incompressible data
        ck = ckptcore.AsyncCheckpointer()
        ck.save(mount_point / "ckpt", big)
        with pytest.raises(BackgroundWriteError) as info:
            ck.wait_until_finished()
        text = " ".join(str(e) for e in chain(info.value)).lower()
        assert "space" in text or "resource_exhausted" in text or "enospc" in text, text
        with pytest.raises(CheckpointNotFoundError):
            ckptcore.restore(mount_point / "ckpt")
        assert no_leftovers(mount_point) == []
        ck.close()
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


# -- hung writes ---------------------------------------------------------------------------


def test_hung_write_ends_with_timeout_and_is_never_committed(tmp_path, gated):
    ck = ckptcore.AsyncCheckpointer(timeout=0.5)
    ck.save(tmp_path / "hung", state(), format="gated")
    with pytest.raises(CheckpointTimeoutError, match="abandoned"):
        ck.wait_until_finished()
    assert not ck.is_saving_in_progress()
    gated.release.set()  # the storage comes back: the late write must still not commit
    assert gated.returned.wait(GATE_LIMIT_S)
    wait_no_leftovers(tmp_path)
    assert no_leftovers(tmp_path) == []
    with pytest.raises(CheckpointNotFoundError):
        ckptcore.restore(tmp_path / "hung")
    ck.save(tmp_path / "next", state(1))  # later saves are not stuck behind the hung one
    ck.close()
    assert_equal(ckptcore.restore(tmp_path / "next"), state(1))


def test_hung_write_is_reported_at_the_next_save(tmp_path, gated):
    ck = ckptcore.AsyncCheckpointer(timeout=0.3)
    ck.save(tmp_path / "hung", state(), format="gated")
    assert gated.entered.wait(GATE_LIMIT_S)
    time.sleep(0.5)
    with pytest.raises(CheckpointTimeoutError, match="hung"):
        ck.save(tmp_path / "other", state())
    assert not (tmp_path / "other").exists()
    ck.close()


def test_wait_timeout_does_not_abandon_the_write(tmp_path, gated):
    ck = ckptcore.AsyncCheckpointer()
    ck.save(tmp_path / "slow", state(), format="gated")
    with pytest.raises(CheckpointTimeoutError, match="keeps running"):
        ck.wait_until_finished(timeout=0.2)
    assert ck.is_saving_in_progress()
    gated.release.set()
    ck.wait_until_finished()
    assert_equal(ckptcore.restore(tmp_path / "slow"), state())
    ck.close()


# -- bounded memory --------------------------------------------------------------------


def _save_in_thread(ck, path, tree, errors: list) -> threading.Thread:
    def run():
        try:
            ck.save(path, tree)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("budget_states", [None, 1.5])
def test_a_save_that_does_not_fit_waits_for_the_previous(tmp_path, gated, budget_states):
    s = state()
    nbytes = s["params"]["w"].nbytes + s["params"]["b"].nbytes + s["big"].nbytes
    budget = None if budget_states is None else int(budget_states * nbytes)
    ck = ckptcore.AsyncCheckpointer(max_bytes_in_flight=budget)
    ck.save(tmp_path / "first", s, format="gated")
    errors: list = []
    second = _save_in_thread(ck, tmp_path / "second", state(1), errors)
    second.join(0.5)
    assert second.is_alive()  # blocked: two snapshots do not fit
    gated.release.set()
    second.join(GATE_LIMIT_S)
    assert not second.is_alive() and errors == []
    ck.close()
    assert_equal(ckptcore.restore(tmp_path / "first"), s)
    assert_equal(ckptcore.restore(tmp_path / "second"), state(1))


def test_saves_queue_while_they_fit_in_the_budget(tmp_path, gated):
    s = state()
    ck = ckptcore.AsyncCheckpointer(max_bytes_in_flight=64 << 20)
    ck.save(tmp_path / "first", s, format="gated")
    errors: list = []
    second = _save_in_thread(ck, tmp_path / "second", state(1), errors)
    second.join(GATE_LIMIT_S)
    assert not second.is_alive() and errors == []  # returned while the first is still held
    assert ck.is_saving_in_progress() and not (tmp_path / "second").exists()
    gated.release.set()
    ck.close()
    assert_equal(ckptcore.restore(tmp_path / "first"), s)
    assert_equal(ckptcore.restore(tmp_path / "second"), state(1))


# -- several checkpointers at once ---------------------------------------------------------


def test_several_async_checkpointers_in_threads(tmp_path):
    errors: list = []

    def worker(i: int) -> None:
        try:
            with ckptcore.AsyncCheckpointer(max_bytes_in_flight=8 << 20) as ck:
                for k in range(3):
                    ck.save(tmp_path / f"w{i}-{k}", state(10 * i + k, n=1 << 14))
        except BaseException as exc:
            errors.append(exc)

    shared = ckptcore.AsyncCheckpointer()

    def shared_worker(i: int) -> None:
        try:
            for k in range(2):
                shared.save(tmp_path / f"s{i}-{k}", state(100 + 10 * i + k, n=1 << 14))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=shared_worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "deadlock: a saving thread did not finish"
    shared.close()
    assert errors == []
    for i in range(4):
        for k in range(3):
            assert_equal(ckptcore.restore(tmp_path / f"w{i}-{k}"), state(10 * i + k, n=1 << 14))
    for i in range(3):
        for k in range(2):
            assert_equal(ckptcore.restore(tmp_path / f"s{i}-{k}"), state(100 + 10 * i + k, n=1 << 14))


# -- what raises in the caller -----------------------------------------------------------


def test_restore_and_metadata_wait_for_a_save_in_flight(tmp_path, gated):
    ck = ckptcore.AsyncCheckpointer()
    ck.save(tmp_path / "a", state(), format="gated")
    results: list = []
    reader = threading.Thread(target=lambda: results.append((ck.metadata(tmp_path / "a"), ck.restore(tmp_path / "a"))))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive()
    gated.release.set()
    reader.join(GATE_LIMIT_S)
    meta, restored = results[0]
    assert meta["params"]["w"].shape == state()["params"]["w"].shape
    assert_equal(restored, state())
    ck.close()


def test_errors_known_before_writing_raise_in_the_caller(tmp_path, gated):
    ckptcore.save(tmp_path / "exists", state(1))
    ck = ckptcore.AsyncCheckpointer()
    with pytest.raises(AlreadyExistsError, match="force=True"):
        ck.save(tmp_path / "exists", state(2))
    assert_equal(ckptcore.restore(tmp_path / "exists"), state(1))
    with pytest.raises(UnsupportedLeafError, match="object"):
        ck.save(tmp_path / "bad", {"x": object()})
    with pytest.raises(InvalidMetadataError):
        ck.save(tmp_path / "bad", state(), metadata={"x": object()})
    assert not (tmp_path / "bad").exists()
    ck.save(tmp_path / "busy", state(), format="gated")
    with pytest.raises(AlreadyExistsError, match="in progress"):
        ck.save(tmp_path / "busy", state(3))
    gated.release.set()
    ck.close()
    assert_equal(ckptcore.restore(tmp_path / "busy"), state())
    with pytest.raises(InvalidOptionError):
        ckptcore.AsyncCheckpointer(timeout=0)
    with pytest.raises(InvalidOptionError):
        ckptcore.AsyncCheckpointer(max_bytes_in_flight=-1)


def test_forced_saves_to_one_path_commit_in_order(tmp_path):
    with ckptcore.AsyncCheckpointer(max_bytes_in_flight=64 << 20) as ck:
        for seed in range(3):
            ck.save(tmp_path / "p", state(seed), force=True)
    assert_equal(ckptcore.restore(tmp_path / "p"), state(2))
    assert no_leftovers(tmp_path) == []


def test_progress_of_async_save_and_restore(tmp_path):
    from ckptcore.progress import Recorder

    saves, restores = Recorder(), Recorder()
    s = state()
    with ckptcore.AsyncCheckpointer(progress=saves) as ck:
        ck.save(tmp_path / "a", s)
        ck.wait_until_finished()
        ck.restore(tmp_path / "a", progress=restores)
    total = ckptcore.info(tmp_path / "a").total_bytes
    for rec in (saves, restores):
        assert rec.last == (total, total)
        done = [d for d, _ in rec.calls]
        assert done == sorted(done) and all(t == total for _, t in rec.calls)


def test_snapshot_copies_every_dtype_and_layout(tmp_path):
    import ml_dtypes

    rng = np.random.default_rng(0)
    base = rng.standard_normal((40, 30))
    tree = {
        "bf16": base.astype(ml_dtypes.bfloat16),
        "int4": np.arange(-8, 8, dtype=ml_dtypes.int4),
        "fortran": np.asfortranarray(base),
        "strided": base[::3, ::2],
        "transposed": base.T,
        "big_endian": base.astype(">f8"),
        "complex": (base + 1j * base).astype(np.complex64),
        "bool": base > 0,
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 4), np.int16),
        "large_strided": rng.standard_normal((1 << 11, 1 << 10))[:, ::2],  # 8 MiB, not contiguous
    }
    expected = {k: np.array(v, copy=True) for k, v in tree.items()}
    with ckptcore.AsyncCheckpointer() as ck:
        ck.save(tmp_path / "a", tree)
        for value in tree.values():
            value[...] = 0  # mutate every source right away
    restored = ckptcore.restore(tmp_path / "a")
    for key, value in expected.items():
        assert restored[key].dtype == value.dtype.newbyteorder("=") and restored[key].shape == value.shape, key
        np.testing.assert_array_equal(restored[key], value, err_msg=key)
