"""Bad inputs raise specific, actionable errors and never harm existing checkpoints (issue 2, item 9)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import ckptcore
from ckptcore import errors
from ckptcore.io.index import INDEX_FILE
from ckptcore.plugins.manager import reset_registry


def snapshot(root) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (directories included by their relative names)."""
    out: dict[str, bytes] = {}
    for here, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(here, name), root) + "/"] = b""
        for name in files:
            full = os.path.join(here, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = f.read()
    return out


STATE = {
    "big": np.random.default_rng(0).standard_normal(100_000),  # 800 KB: its own array
    "small": np.arange(10.0),  # packed
    "meta": {"step": 3, "name": "x"},
}


@pytest.fixture
def bystanders(tmp_path):
    """Committed checkpoints (both formats) beside the one under test; they must never change."""
    root = tmp_path / "others"
    ckptcore.save(root / "a", STATE, format="ocdbt")
    ckptcore.save(root / "b", STATE, format="zarr3")
    before = snapshot(root)
    yield root
    assert snapshot(root) == before
    np.testing.assert_array_equal(ckptcore.restore(root / "a")["big"], STATE["big"])
    np.testing.assert_array_equal(ckptcore.restore(root / "b")["small"], STATE["small"])


def _restore_keeps_bytes(path, exc_type, match=None):
    """Restore must raise ``exc_type`` and change nothing at ``path``."""
    before = snapshot(path) if os.path.exists(path) else None
    with pytest.raises(exc_type, match=match) as err:
        ckptcore.restore(path)
    if before is not None:
        assert snapshot(path) == before
    return str(err.value)


def test_not_found(tmp_path, bystanders):
    for call in (ckptcore.restore, ckptcore.metadata, ckptcore.info):
        with pytest.raises(errors.CheckpointNotFoundError, match=r"no checkpoint at .*nope") as err:
            call(tmp_path / "nope")
        assert isinstance(err.value, FileNotFoundError)  # also catchable the standard way
    assert not (tmp_path / "nope").exists()


def test_not_committed_staging_directory(tmp_path, bystanders):
    leftover = bystanders / "a.ckptcore-tmp-host-123-deadbeef"
    shutil.copytree(bystanders / "a", leftover)
    message = _restore_keeps_bytes(leftover, errors.NotCommittedError, "interrupted")
    assert str(leftover) in message
    shutil.rmtree(leftover)


def test_directory_without_index(tmp_path, bystanders):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("hello")
    message = _restore_keeps_bytes(tmp_path / "plain", errors.CheckpointNotFoundError, INDEX_FILE)
    assert "not a ckptcore checkpoint" in message
    with pytest.raises(errors.CheckpointNotFoundError):
        ckptcore.metadata(tmp_path / "plain")


@pytest.mark.parametrize("cut", [0, 1, 100, -2])
def test_truncated_index(tmp_path, bystanders, cut):
    path = tmp_path / "ck"
    ckptcore.save(path, STATE)
    raw = (path / INDEX_FILE).read_bytes()
    (path / INDEX_FILE).write_bytes(raw[:cut])
    message = _restore_keeps_bytes(path, errors.CorruptCheckpointError, "truncated or corrupt")
    assert str(path) in message
    with pytest.raises(errors.CorruptCheckpointError):
        ckptcore.metadata(path)


@pytest.mark.parametrize(
    "doc",
    [[], {"format": "ckptcore-checkpoint"}, {"format": "other", "tree": {}}, "\xff"],
)
def test_index_that_is_json_but_not_an_index(tmp_path, bystanders, doc):
    path = tmp_path / "ck"
    ckptcore.save(path, STATE)
    (path / INDEX_FILE).write_text(json.dumps(doc))
    _restore_keeps_bytes(path, errors.CorruptCheckpointError, "not a ckptcore checkpoint index")


def _edit_index(path, edit):
    doc = json.loads((path / INDEX_FILE).read_text())
    edit(doc)
    (path / INDEX_FILE).write_text(json.dumps(doc))


def _leaf(doc, key):
    return next(i["value"] for i in doc["tree"]["items"] if i["key"] == key)


@pytest.mark.parametrize(
    ("edit", "exc", "match"),
    [
        (lambda d: _leaf(d, "big").update(key="../../others/a"), errors.CorruptCheckpointError, "storage key"),
        (lambda d: _leaf(d, "big").update(key="/etc/passwd"), errors.CorruptCheckpointError, "storage key"),
        (lambda d: _leaf(d, "big").update(shape=[7]), errors.CorruptCheckpointError, "shape"),
        (lambda d: _leaf(d, "small").update(shape=[11]), errors.CorruptCheckpointError, "truncated or inconsistent"),
        (lambda d: _leaf(d, "big").update(dtype="__import__('os')"), errors.CorruptCheckpointError, "dtype"),
        (lambda d: _leaf(d, "big").update(dtype="float128x"), errors.CorruptCheckpointError, "unknown"),
        (lambda d: _leaf(d, "meta")["items"][0]["value"].update(value="3"), errors.CorruptCheckpointError, "malformed"),
        (lambda d: _leaf(d, "meta").update(type="pickle"), errors.CorruptCheckpointError, "pickle"),
        (lambda d: d["tree"].update(type="namedtuple", name="X", fields=["import os"]), errors.CorruptCheckpointError,
         "namedtuple"),
    ],
)
def test_tampered_index_fields(tmp_path, bystanders, edit, exc, match):
    path = tmp_path / "ck"
    ckptcore.save(path, STATE, format="zarr3")
    _edit_index(path, edit)
    _restore_keeps_bytes(path, exc, match)


def _flip(path, offset=None):
    data = bytearray(path.read_bytes())
    where = len(data) // 2 if offset is None else offset
    data[where] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_ocdbt_data_file(tmp_path, bystanders):
    path = tmp_path / "ck"
    ckptcore.save(path, STATE, format="ocdbt")
    data_files = sorted((path / "ocdbt" / "d").iterdir(), key=lambda p: p.stat().st_size)
    _flip(data_files[-1])  # the largest: holds the array chunks
    message = _restore_keeps_bytes(path, errors.CorruptCheckpointError)
    assert str(path) in message and "ocdbt" in message
    # leaves that are not in the damaged file still restore with partial=True
    assert ckptcore.restore(path, {"meta": {"step": 0, "name": ""}}, partial=True)["meta"]["step"] == 3


def test_corrupt_zarr3_chunk_file(tmp_path, bystanders):
    path = tmp_path / "ck"
    ckptcore.save(path, STATE, format="zarr3", format_options={"chunk_bytes": 100_000})
    chunks = sorted(p for p in (path / "zarr3" / "big" / "c").rglob("*") if p.is_file())
    assert len(chunks) >= 8
    _flip(chunks[3])
    _restore_keeps_bytes(path, errors.CorruptCheckpointError, "zarr3")
    # a truncated chunk, and a missing one, are errors too (never silently filled with zeros)
    _flip(chunks[3])
    chunks[5].write_bytes(chunks[5].read_bytes()[:100])
    _restore_keeps_bytes(path, errors.CorruptCheckpointError)
    shutil.copy(chunks[4], chunks[5])  # a chunk from elsewhere passes crc32c: the leaf checksum catches it
    _restore_keeps_bytes(path, errors.ChecksumMismatchError, r"\['big'\]")


@pytest.mark.parametrize("fmt", ["ocdbt", "zarr3"])
def test_tampered_packed_blob_is_a_checksum_mismatch(tmp_path, bystanders, fmt):
    path = tmp_path / "ck"
    ckptcore.save(path, STATE, format=fmt)
    needle = STATE["small"].tobytes()
    if fmt == "zarr3":
        hits = [p for p in path.rglob("*") if p.is_file() and needle in p.read_bytes()]
        assert len(hits) == 1, hits  # stored uncompressed, in one blob
        data = hits[0].read_bytes()
        _flip(hits[0], data.index(needle) + 12)
    else:
        # OCDBT compresses its files: change the blob through TensorStore, as a bad disk or a bug would.
        import tensorstore as ts

        kv = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": f"{path}/ocdbt/"}}).result()
        (key,) = [k for k in kv.list().result() if b"packed" in k]
        blob = bytearray(kv.read(key).result().value)
        blob[blob.index(needle) + 12] ^= 0xFF
        kv.write(key, bytes(blob)).result()
    message = _restore_keeps_bytes(path, errors.ChecksumMismatchError, r"\['small'\]")
    assert "another checkpoint" in message
    # the other leaves are unaffected
    np.testing.assert_array_equal(ckptcore.restore(path, {"big": STATE["big"]}, partial=True)["big"], STATE["big"])


def test_cast_restore_still_verifies_checksum(tmp_path, bystanders):
    path = tmp_path / "ck"
    ckptcore.save(path, STATE, format="zarr3")
    needle = STATE["small"].tobytes()
    blob = next(p for p in path.rglob("*") if p.is_file() and needle in p.read_bytes())
    _flip(blob, blob.read_bytes().index(needle) + 12)
    with pytest.raises(errors.ChecksumMismatchError):
        ckptcore.restore(path, {"small": np.empty(10, np.float32)}, partial=True)


@pytest.fixture
def only_shipped_plugins(monkeypatch):
    """Plugins as in `pip install ckptcore`: posix and zarr3 only, whatever else this venv has."""
    monkeypatch.setenv("CKPTCORE_PLUGINS", "posix,zarr3")
    reset_registry()
    yield
    reset_registry()


@pytest.mark.parametrize("url", ["gs://bucket/ck", "s3://bucket/ck"])
def test_missing_storage_plugin(tmp_path, bystanders, only_shipped_plugins, url):
    extra = "gcs" if url.startswith("gs") else "s3"
    hint = f"pip install 'ckptcore[{extra}]'"
    with pytest.raises(errors.MissingPluginError) as err:
        ckptcore.save(url, STATE)
    assert hint in str(err.value) and url.split(":")[0] + "://" in str(err.value)
    for call in (ckptcore.restore, ckptcore.metadata):
        with pytest.raises(errors.MissingPluginError, match=r"ckptcore\[" + extra):
            call(url)


def test_unknown_third_party_scheme(tmp_path, only_shipped_plugins):
    with pytest.raises(errors.MissingPluginError, match="install a ckptcore plugin that serves `hdfs://`"):
        ckptcore.restore("hdfs://x/y")


def test_index_naming_an_unknown_array_format(tmp_path, bystanders):
    path = tmp_path / "ck"
    ckptcore.save(path, STATE)

    def edit(doc):
        _leaf(doc, "big")["format"] = "npy-dir"
        doc["array_formats"]["npy-dir"] = {"version": 1, "distribution": "ckptcore-npydir", "plugin_version": "2.0"}

    _edit_index(path, edit)
    message = _restore_keeps_bytes(path, errors.MissingPluginError, "npy-dir")
    assert "install" in message
    # metadata needs no array format plugin
    assert ckptcore.metadata(path)["big"].format == "npy-dir"
    # leaves of installed formats still restore
    assert ckptcore.restore(path, {"small": np.empty(10)}, partial=True)["small"][3] == 3.0


def test_array_format_plugin_too_old(tmp_path, bystanders):
    path = tmp_path / "ck"
    ckptcore.save(path, STATE)
    _edit_index(path, lambda d: d["array_formats"]["ocdbt"].update(version=99, plugin_version="9.0"))
    message = _restore_keeps_bytes(path, errors.IncompatibleVersionError, "version 99")
    assert "pip install -U ckptcore-zarr3" in message


def test_index_format_too_new(tmp_path, bystanders):
    path = tmp_path / "ck"
    ckptcore.save(path, STATE)
    _edit_index(path, lambda d: d.update(format_version=99))
    message = _restore_keeps_bytes(path, errors.IncompatibleVersionError, "pip install -U ckptcore")
    assert "99" in message
    with pytest.raises(errors.IncompatibleVersionError):
        ckptcore.metadata(path)


def test_already_exists(tmp_path, bystanders):
    before = snapshot(bystanders)
    with pytest.raises(errors.AlreadyExistsError, match="force=True") as err:
        ckptcore.save(bystanders / "a", {"x": 1})
    assert isinstance(err.value, FileExistsError) and str(bystanders / "a") in str(err.value)
    assert snapshot(bystanders) == before


# -- a save killed mid-way -----------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import ckptcore
    from ckptcore import hookimpl

    path, mode = sys.argv[1], sys.argv[2]

    class Stall:
        # Called after every array is written, just before the index: the save is mid-way.
        @hookimpl
        def ckptcore_index_metadata(self, context):
            print("ARRAYS-WRITTEN", flush=True)
            time.sleep(600)

    if mode == "after-arrays":
        ckptcore.register_plugin(Stall(), name="stall")

    def progress(done, total):
        if done == 0:
            print("WRITING", flush=True)

    state = {f"w{i}": np.full(1 << 17, float(i)) for i in range(16)}  # 16 MiB
    ckptcore.save(path, state, force=True, progress=progress, format=sys.argv[3])
    print("DONE", flush=True)
    """
)


def _run_and_kill(path, mode, fmt):
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), mode, fmt], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        marker = "ARRAYS-WRITTEN" if mode == "after-arrays" else "WRITING"
        for line in proc.stdout:
            if line.strip() == marker:
                break
        if mode == "during-write":
            # Wait for the first array bytes to land in the staging directory, then kill.
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                staging = [p for p in path.parent.iterdir() if ".ckptcore-tmp-" in p.name]
                if staging and any(f.is_file() for f in staging[0].rglob("*")):
                    break
                time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
    return proc.returncode


@pytest.mark.parametrize(("mode", "fmt"), [("after-arrays", "ocdbt"), ("during-write", "zarr3"), ("during-write", "ocdbt")])
def test_killed_save_leaves_previous_checkpoint_intact_and_a_cleanable_leftover(tmp_path, mode, fmt):
    parent = tmp_path / "run"
    path = parent / "ck"
    ckptcore.save(path, STATE)
    before = snapshot(path)

    returncode = _run_and_kill(path, mode, fmt)
    leftovers = sorted(p for p in parent.iterdir() if p.name != "ck")

    print(f"\n{mode}/{fmt}: returncode {returncode}, leftovers {[p.name for p in leftovers]}")
    if returncode == -signal.SIGKILL and leftovers:
        assert snapshot(path) == before  # the previous checkpoint is intact, byte for byte
        np.testing.assert_array_equal(ckptcore.restore(path)["big"], STATE["big"])
        assert len(leftovers) == 1 and ".ckptcore-tmp-" in leftovers[0].name
        with pytest.raises((errors.NotCommittedError, errors.CheckpointNotFoundError)):
            ckptcore.restore(leftovers[0])
        with pytest.raises(errors.NotCommittedError):
            ckptcore.metadata(leftovers[0])
        removed = ckptcore.clean(parent)
        assert removed == [str(leftovers[0])]
    else:
        # The save finished before the kill landed: then the new checkpoint is whole.
        assert mode == "during-write", "the stalled save cannot have finished"
        back = ckptcore.restore(path)
        assert sorted(back) == [f"w{i}" for i in range(16)]
    assert sorted(os.listdir(parent)) == ["ck"]
    assert ckptcore.clean(parent) == []


def test_cli_clean_removes_leftover_of_a_killed_save(tmp_path):
    parent = tmp_path / "run"
    ckptcore.save(parent / "ck", STATE)
    before = snapshot(parent / "ck")
    assert _run_and_kill(parent / "ck", "after-arrays", "ocdbt") == -signal.SIGKILL
    (leftover,) = [p for p in parent.iterdir() if p.name != "ck"]
    out = subprocess.run(
        [sys.executable, "-m", "ckptcore", "clean", str(parent)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert f"removed {leftover}" in out.stdout
    assert sorted(os.listdir(parent)) == ["ck"] and snapshot(parent / "ck") == before


def test_clean_never_touches_committed_or_foreign_entries(tmp_path, bystanders):
    (bystanders / "notes.txt").write_text("mine")
    (bystanders / "random-dir").mkdir()
    before = snapshot(bystanders)
    assert ckptcore.clean(bystanders) == []
    assert snapshot(bystanders) == before
    (bystanders / "notes.txt").unlink()
    (bystanders / "random-dir").rmdir()
    assert ckptcore.clean(tmp_path / "does-not-exist") == []
