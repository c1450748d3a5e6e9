"""ckptcore-posix: local paths and file:// URLs, fsync, atomic rename, leftovers (issue 2, item 4).

Runs with only the core and this plugin: the registry loads no other entry point.
"""

from __future__ import annotations

import os

import ckptcore_posix
import pytest
from ckptcore_posix import LocalBackend, RenameCommit

import ckptcore
from ckptcore import errors
from ckptcore.plugins.address import StorageAddress
from ckptcore.plugins.manager import registry, reset_registry


@pytest.fixture(autouse=True)
def only_posix(monkeypatch):
    monkeypatch.setenv("CKPTCORE_PLUGINS", "posix")
    monkeypatch.delenv("CKPTCORE_BLOCK_PLUGINS", raising=False)
    monkeypatch.delenv("CKPTCORE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    reset_registry()
    yield
    reset_registry()


def _loc(path):
    return LocalBackend().resolve(str(path), {})


def _write_tree(root):
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"a" * 10)
    (root / "sub" / "b.bin").write_bytes(b"b")
    (root / "sub" / "deeper" / "c.bin").write_bytes(b"")


def test_resolves_paths_and_file_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for url in (str(tmp_path / "ck"), f"file://{tmp_path}/ck", str(tmp_path / "x" / ".." / "ck"), "~/ck"):
        loc = registry().storage("file").backend.resolve(url, {})
        assert loc.path == str(tmp_path / "ck") and loc.scheme == "file"
        assert loc.address == StorageAddress(scheme="file", path=f"{tmp_path}/ck/")
    loc = _loc(tmp_path / "ck")
    assert loc.child("x.y").path == f"{tmp_path}/ck/x.y" and loc.child("x.y").address.path == f"{tmp_path}/ck/x.y/"
    assert loc.parent().path == str(tmp_path) and loc.name == "ck"
    assert loc.parent().address.path == f"{tmp_path}/"
    assert registry().storage("file").distribution == "ckptcore-posix"


def test_begin_makes_a_recognisable_sibling(tmp_path):
    strategy = RenameCommit()
    final = _loc(tmp_path / "ck")
    staging = strategy.begin(final)
    assert os.path.dirname(staging.path) == str(tmp_path)
    assert staging.name.startswith("ck.ckptcore-tmp-") and str(os.getpid()) in staging.name
    assert os.path.isdir(staging.path)
    assert strategy.is_staging(staging) and not strategy.is_committed(staging)
    assert not strategy.is_committed(final) and not strategy.is_staging(final)
    second = strategy.begin(final)
    assert second.path != staging.path  # concurrent saves never share a staging directory


def test_commit_fsyncs_every_file_and_directory_then_renames(tmp_path, monkeypatch):
    strategy = RenameCommit()
    final = _loc(tmp_path / "ck")
    staging = strategy.begin(final)
    _write_tree(tmp_path / staging.name)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(ckptcore_posix.os, "fsync", recording_fsync)
    strategy.commit(staging, final, replace=False)
    expected = {staging.path, f"{staging.path}/a.bin", f"{staging.path}/sub", f"{staging.path}/sub/b.bin",
                f"{staging.path}/sub/deeper", f"{staging.path}/sub/deeper/c.bin"}
    assert expected <= set(synced)
    assert synced[-1] == str(tmp_path)  # the parent, after the rename: the new name is durable
    # files are synced before the directories that hold them
    assert synced.index(f"{staging.path}/sub/deeper/c.bin") < synced.index(f"{staging.path}/sub/deeper")
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert (tmp_path / "ck" / "sub" / "b.bin").read_bytes() == b"b"
    assert strategy.is_committed(final)


@pytest.mark.parametrize("kernel_rename", [True, False], ids=["renameat2", "plain-rename"])
def test_commit_never_replaces_a_directory_that_appeared(tmp_path, monkeypatch, kernel_rename):
    if not kernel_rename:
        monkeypatch.setattr(ckptcore_posix, "_rename", lambda *a: False)
    strategy = RenameCommit()
    final = _loc(tmp_path / "ck")
    staging = strategy.begin(final)
    _write_tree(tmp_path / staging.name)
    (tmp_path / "ck").mkdir()  # another process won the race (an empty directory: rename(2) would replace it)
    with pytest.raises(errors.AlreadyExistsError, match="appeared while saving"):
        strategy.commit(staging, final, replace=False)
    assert os.listdir(tmp_path / "ck") == []
    assert os.path.isdir(staging.path)
    strategy.abort(staging)
    assert sorted(os.listdir(tmp_path)) == ["ck"]


@pytest.mark.parametrize("kernel_rename", [True, False], ids=["renameat2", "plain-rename"])
def test_replace_swaps_in_the_new_one_and_removes_the_old(tmp_path, monkeypatch, kernel_rename):
    if not kernel_rename:
        monkeypatch.setattr(ckptcore_posix, "_rename", lambda *a: False)
    strategy = RenameCommit()
    final = _loc(tmp_path / "ck")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "old.bin").write_bytes(b"old")
    staging = strategy.begin(final)
    (tmp_path / staging.name / "new.bin").write_bytes(b"new")
    strategy.commit(staging, final, replace=True)
    assert os.listdir(tmp_path / "ck") == ["new.bin"]
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_old_checkpoint_moved_aside_by_a_killed_replace_is_recovered_by_clean(tmp_path):
    # A replacing save killed between its two renames (no renameat2): the old checkpoint sits
    # under `.ckptcore-old-`, the final name is empty. clean() must put it back, not delete it.
    ckptcore.save(tmp_path / "ck", {"gen": 1})
    os.rename(tmp_path / "ck", tmp_path / "ck.ckptcore-old-1234abcd")
    with pytest.raises(errors.CheckpointNotFoundError):
        ckptcore.restore(tmp_path / "ck")
    ckptcore.clean(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert ckptcore.restore(tmp_path / "ck") == {"gen": 1}
    # ...while one whose final name holds a newer checkpoint is a plain leftover
    (tmp_path / "ck.ckptcore-old-5678").mkdir()
    assert ckptcore.clean(tmp_path) == [str(tmp_path / "ck.ckptcore-old-5678")]
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_delete_renames_first(tmp_path, monkeypatch):
    strategy = RenameCommit()
    final = _loc(tmp_path / "ck")
    ckptcore.save(tmp_path / "ck", {"a": 1})
    seen = []

    def interrupted_rmtree(path, ignore_errors=False):
        seen.append((path, os.path.exists(tmp_path / "ck")))
        raise KeyboardInterrupt  # the process dies while deleting

    monkeypatch.setattr(ckptcore_posix.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        strategy.delete(final)
    monkeypatch.undo()
    (doomed, final_existed) = seen[0]
    assert ".ckptcore-deleting-" in doomed and final_existed is False  # never half-deleted under its name
    assert not strategy.is_committed(final)
    leftover = _loc(doomed)
    assert strategy.is_staging(leftover) and not strategy.is_committed(leftover)
    assert ckptcore.clean(tmp_path) == [doomed]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["ck.ckptcore-tmp-h-1-ab", "ck.ckptcore-deleting-12", "ck.orbax-checkpoint-tmp-99",
                                  "ck.ckptcore-old-1"])
def test_leftover_names(tmp_path, name):
    (tmp_path / name).mkdir()
    loc = _loc(tmp_path / name)
    strategy = RenameCommit()
    assert strategy.is_staging(loc) and not strategy.is_committed(loc)
    with pytest.raises(errors.NotCommittedError):
        ckptcore.restore(tmp_path / name)


@pytest.mark.parametrize("name", ["ck", "ckptcore-tmp", "ck.ckptcore-tmpx", "step_100", ".hidden"])
def test_ordinary_names_are_not_leftovers(tmp_path, name):
    (tmp_path / name).mkdir()
    strategy = RenameCommit()
    assert not strategy.is_staging(_loc(tmp_path / name))
    (tmp_path / "file.ckptcore-tmp-1").write_text("a file, not a directory")
    assert not strategy.is_staging(_loc(tmp_path / "file.ckptcore-tmp-1"))


def test_save_restore_through_file_urls_with_only_this_plugin(tmp_path):
    assert {i.name for i in ckptcore.list_plugins() if i.status == "loaded"} == {"posix"}
    state = {"step": 3, "name": "posix-only", "nested": {"x": [1.5, None]}}
    ckptcore.save(f"file://{tmp_path}/ck", state)
    assert ckptcore.restore(f"file://{tmp_path}/ck") == state
    assert ckptcore.restore(str(tmp_path / "ck")) == state
    with pytest.raises(errors.AlreadyExistsError):
        ckptcore.save(f"file://{tmp_path}/ck", state)
    ckptcore.save(f"file://{tmp_path}/ck", {"step": 4}, force=True)
    assert ckptcore.restore(tmp_path / "ck") == {"step": 4}
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_unwritable_parent_is_a_storage_error(tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        target = blocker / "ck"  # a path under a regular file: fails even for root
    else:
        os.chmod(tmp_path, 0o500)
        target = tmp_path / "ck"
    try:
        with pytest.raises(errors.StorageError, match="cannot create"):
            ckptcore.save(target, {"a": 1})
    finally:
        os.chmod(tmp_path, 0o700)
