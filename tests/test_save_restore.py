"""Restore with a target: shapes, casts, partial reads, skips, container types (issue 2, item 8); overwrite."""

from __future__ import annotations

import collections
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

import ckptcore
from ckptcore.errors import AlreadyExistsError, TargetMismatchError
from ckptcore.io.index import INDEX_FILE

Opt = collections.namedtuple("Opt", ["mu", "nu"])


def _state():
    rng = np.random.default_rng(0)
    return {
        "params": {"w": rng.standard_normal((300, 200)).astype(np.float32), "b": np.arange(7, dtype=np.float32)},
        "opt": Opt(np.ones(100_000, np.float32), np.full(10, 2.0)),
        "step": 12,
        "layers": [np.zeros(3, np.int32), np.ones(4, np.int64)],
    }


@pytest.fixture(params=["ocdbt", "zarr3"])
def saved(request, tmp_path):
    path = tmp_path / "ck"
    state = _state()
    ckptcore.save(path, state, format=request.param)
    return SimpleNamespace(path=path, state=state, fmt=request.param)


def test_full_target_with_casts(saved):
    target = {
        "params": {"w": np.empty((300, 200), np.float64), "b": SimpleNamespace(shape=(7,), dtype="int32")},
        "opt": Opt(np.empty(100_000, np.float16), np.empty(10, np.float64)),
        "step": 0,
        "layers": [np.empty(3, np.int32), np.empty(4, np.float32)],
    }
    back = ckptcore.restore(saved.path, target)
    assert back["params"]["w"].dtype == np.float64
    np.testing.assert_array_equal(back["params"]["w"], saved.state["params"]["w"].astype(np.float64))
    assert back["params"]["b"].dtype == np.int32 and back["params"]["b"].tolist() == list(range(7))
    assert back["opt"].mu.dtype == np.float16 and isinstance(back["opt"], Opt)
    assert back["layers"][1].dtype == np.float32
    assert back["step"] == 12  # scalar leaves come from the checkpoint


def test_shape_mismatch_lists_every_offending_path(saved):
    target = ckptcore.metadata(saved.path)
    target["params"]["w"] = np.empty((200, 300), np.float32)
    target["layers"][0] = np.empty(4, np.int32)
    with pytest.raises(TargetMismatchError) as err:
        ckptcore.restore(saved.path, target)
    message = str(err.value)
    assert "['params']['w']" in message and "(300, 200)" in message and "(200, 300)" in message
    assert "['layers'][0]" in message
    assert str(saved.path) in message


def test_metadata_tree_is_a_valid_target(saved):
    back = ckptcore.restore(saved.path, ckptcore.metadata(saved.path))
    np.testing.assert_array_equal(back["opt"].mu, saved.state["opt"].mu)


def test_partial_reads_only_requested_leaves(saved):
    # Remove the data of every leaf that is not requested: a partial restore must not need it.
    doc = json.loads((saved.path / INDEX_FILE).read_text())
    if saved.fmt == "zarr3":
        shutil.rmtree(saved.path / "zarr3" / "opt" / "mu")  # the large, not requested leaf
    target = {"params": {"w": np.empty((300, 200), np.float32)}, "layers": [None, np.empty(4, np.int64)]}
    back = ckptcore.restore(saved.path, target, partial=True)
    assert list(back) == ["params", "layers"] and list(back["params"]) == ["w"]
    np.testing.assert_array_equal(back["params"]["w"], saved.state["params"]["w"])
    assert back["layers"][0] is None
    np.testing.assert_array_equal(back["layers"][1], saved.state["layers"][1])
    assert doc["tree"]  # the index itself was not changed by reading
    if saved.fmt == "zarr3":
        with pytest.raises(ckptcore.errors.CorruptCheckpointError, match="mu"):
            ckptcore.restore(saved.path)


def test_partial_restore_reads_nothing_unrequested(tmp_path, monkeypatch):
    """Counted at the format: only the requested leaves reach the read requests."""
    seen: list[str] = []
    from ckptcore.plugins.manager import registry

    reg = registry().array_format("zarr3")
    original = reg.format.read

    def counting_read(location, requests, options):
        seen.extend(r.key for r in requests)
        return original(location, requests, options)

    state = {"a": np.ones(100_000), "b": np.zeros(5), "c": {"d": np.arange(100_000)}}
    ckptcore.save(tmp_path / "ck", state, format="zarr3")
    monkeypatch.setattr(reg.format, "read", counting_read)
    back = ckptcore.restore(tmp_path / "ck", {"c": {"d": np.empty(100_000, np.int64)}}, partial=True)
    assert seen == ["c/d"]
    assert back["c"]["d"][-1] == 99_999


def test_target_none_skips_subtrees(saved):
    target = {"params": None, "opt": Opt(None, np.empty(10)), "step": None, "layers": None}
    back = ckptcore.restore(saved.path, target)
    assert back["params"] is None and back["opt"].mu is None and back["step"] is None
    np.testing.assert_array_equal(back["opt"].nu, saved.state["opt"].nu)


def test_missing_keys_are_listed_with_near_matches(saved):
    target = {"params": {"weight": np.empty((300, 200), np.float32), "b": np.empty(7, np.float32)},
              "opts": None, "step": 0, "layers": [None, None]}
    with pytest.raises(TargetMismatchError) as err:
        ckptcore.restore(saved.path, target, partial=True)
    message = str(err.value)
    assert "['params']['weight']" in message and "did you mean" in message and "['params']['w']" in message
    assert "['opts']" in message


def test_extra_checkpoint_keys_need_partial(saved):
    target = {"params": {"w": np.empty((300, 200), np.float32)}}
    with pytest.raises(TargetMismatchError) as err:
        ckptcore.restore(saved.path, target)
    message = str(err.value)
    assert "partial=True" in message
    for key in ("['params']['b']", "['opt']", "['step']", "['layers']"):
        assert key in message
    assert ckptcore.restore(saved.path, target, partial=True)["params"]["w"].shape == (300, 200)


def test_container_types_come_from_the_target(saved):
    Layers = collections.namedtuple("Layers", ["first", "second"])
    target = {
        "params": collections.OrderedDict([("b", np.empty(7, np.float32)), ("w", np.empty((300, 200), np.float32))]),
        "opt": (np.empty(100_000, np.float32), np.empty(10)),  # a plain tuple where a namedtuple was saved
        "step": 0,
        "layers": Layers(np.empty(3, np.int32), np.empty(4, np.int64)),  # a namedtuple where a list was saved
    }
    back = ckptcore.restore(saved.path, target)
    assert type(back["params"]) is collections.OrderedDict and list(back["params"]) == ["b", "w"]
    assert type(back["opt"]) is tuple
    assert type(back["layers"]) is Layers and back["layers"].second.dtype == np.int64


def test_structure_mismatch(saved):
    with pytest.raises(TargetMismatchError, match=r"\['layers'\]"):
        ckptcore.restore(saved.path, {**ckptcore.metadata(saved.path), "layers": [None]})
    with pytest.raises(TargetMismatchError, match=r"\['params'\]"):
        ckptcore.restore(saved.path, {**ckptcore.metadata(saved.path), "params": [None, None]})
    with pytest.raises(TargetMismatchError, match=r"\['params'\]"):
        ckptcore.restore(saved.path, {**ckptcore.metadata(saved.path), "params": np.empty(3)})


def test_existing_checkpoint_is_not_overwritten_without_force(tmp_path):
    path = tmp_path / "ck"
    ckptcore.save(path, {"v": np.ones(100_000)})
    before = _snapshot(path)
    with pytest.raises(AlreadyExistsError, match="force=True"):
        ckptcore.save(path, {"v": np.zeros(3)})
    assert _snapshot(path) == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no staging directory left behind


def test_force_replaces_atomically_old_stays_readable_until_commit(tmp_path):
    path = tmp_path / "ck"
    ckptcore.save(path, {"v": np.ones(100_000), "gen": 1})
    seen_during_save = []

    def progress(done, total):
        # Called while the new checkpoint is being written, before it commits.
        back = ckptcore.restore(path)
        seen_during_save.append((done, back["gen"], float(back["v"][0])))

    ckptcore.save(path, {"v": np.full(100_000, 2.0), "gen": 2}, force=True, progress=progress)
    assert seen_during_save and all(gen == 1 and v == 1.0 for _, gen, v in seen_during_save)
    back = ckptcore.restore(path)
    assert back["gen"] == 2 and back["v"][0] == 2.0
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_force_over_a_failing_save_keeps_the_old_one(tmp_path):
    path = tmp_path / "ck"
    ckptcore.save(path, {"v": np.ones(100_000)})
    before = _snapshot(path)
    with pytest.raises(ckptcore.CheckpointError):
        ckptcore.save(path, {"v": np.ones(100_000)}, force=True, format_options={"compression": "bogus"})
    assert _snapshot(path) == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_metadata_and_info(tmp_path):
    path = tmp_path / "ck"
    ckptcore.save(path, {"w": np.ones((4, 5), np.float32), "lr": 0.1}, metadata={"run": "r1", "n": [1, 2]})
    info = ckptcore.info(path)
    assert info.metadata == {"run": "r1", "n": [1, 2]}
    assert info.total_bytes == 80 and "ocdbt" in info.array_formats
    assert info.tree["w"].shape == (4, 5) and info.tree["lr"] == 0.1
    assert {p for p, _ in info.leaves} == {"['w']", "['lr']"}
    with pytest.raises(ckptcore.errors.InvalidMetadataError):
        ckptcore.save(tmp_path / "bad", {"a": 1}, metadata={"x": object()})
    assert not (tmp_path / "bad").exists()


def test_file_url_and_pathlike(tmp_path):
    ckptcore.save(f"file://{tmp_path}/ck", {"a": np.arange(3)})
    np.testing.assert_array_equal(ckptcore.restore(tmp_path / "ck")["a"], np.arange(3))
    np.testing.assert_array_equal(ckptcore.restore(f"file://{tmp_path}/ck/")["a"], np.arange(3))


def _snapshot(root):
    out = {}
    for here, _, files in os.walk(root):
        for name in files:
            full = os.path.join(here, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = f.read()
    return out


def test_progress_and_bounded_waves(tmp_path):
    state = {f"a{i}": np.full(50_000, i, np.float64) for i in range(6)}  # 6 x 400 KB
    saved_progress: list[tuple[int, int]] = []
    ckptcore.save(tmp_path / "ck", state, progress=lambda d, t: saved_progress.append((d, t)))
    total = 6 * 400_000
    assert saved_progress[0] == (0, total) and saved_progress[-1] == (total, total)
    read_progress: list[tuple[int, int]] = []
    back = ckptcore.restore(tmp_path / "ck", max_bytes_in_flight=500_000,
                            progress=lambda d, t: read_progress.append((d, t)))
    assert all(back[f"a{i}"][0] == i for i in range(6))
    assert len(read_progress) >= 6  # one wave per leaf under a 500 KB budget
    assert read_progress[-1] == (total, total)
    assert [d for d, _ in read_progress] == sorted(d for d, _ in read_progress)


def test_index_names_plugins_versions_and_checksums(tmp_path):
    ckptcore.save(tmp_path / "ck", {"w": np.ones((300, 300), np.float32), "s": np.ones(3)})
    doc = json.loads((tmp_path / "ck" / INDEX_FILE).read_text())
    fmt = doc["array_formats"]["ocdbt"]
    assert fmt["distribution"] == "ckptcore-zarr3" and fmt["plugin_version"] and isinstance(fmt["version"], int)
    assert doc["ckptcore_version"] == ckptcore.__version__ and doc["created"]
    assert "python" in doc["plugin_metadata"]["ckptcore.plugins.builtin"]
    for item in doc["tree"]["items"]:
        leaf = item["value"]
        assert leaf["checksum"].startswith("crc32c:") and leaf["key"] == item["key"] and leaf["format"] == "ocdbt"


def test_plain_crc32_checksums_are_still_verified(tmp_path):
    """Indexes may carry zlib CRC-32 tags (``crc32:``) as well as CRC-32C; both are checked."""
    import zlib

    path = tmp_path / "ck"
    data = np.arange(100_000, dtype=np.float32)
    ckptcore.save(path, {"x": data})
    index_file = path / "ckptcore_index.json"
    doc = json.loads(index_file.read_text())
    leaf = doc["tree"]["items"][0]["value"]
    assert leaf["checksum"].startswith("crc32c:")
    leaf["checksum"] = f"crc32:{zlib.crc32(data.tobytes()):08x}"
    index_file.write_text(json.dumps(doc))
    np.testing.assert_array_equal(ckptcore.restore(path)["x"], data)
    leaf["checksum"] = f"crc32:{zlib.crc32(data.tobytes()) ^ 1:08x}"
    index_file.write_text(json.dumps(doc))
    with pytest.raises(ckptcore.errors.ChecksumMismatchError):
        ckptcore.restore(path)


@pytest.mark.parametrize("algorithm", ["crc32c", "crc32"])
def test_a_checksum_continued_over_row_blocks_is_the_whole_regions(algorithm):
    """What convert's block-by-block read-back relies on: blocks of rows, in order, checksum as the whole."""
    from ckptcore.io import checksums

    data = np.random.default_rng(0).standard_normal((37, 5, 3)).astype(np.float32)[3:30, 1:4]  # a region, not contiguous
    whole = checksums.checksum(data, algorithm)
    running = checksums.Running(algorithm)
    for start in range(0, data.shape[0], 4):
        running.update(data[start:start + 4])
    assert running.value() == whole
    reordered = checksums.Running(algorithm)
    for start in reversed(range(0, data.shape[0], 4)):
        reordered.update(data[start:start + 4])
    assert reordered.value() != whole
    with pytest.raises(ckptcore.errors.CorruptCheckpointError, match="unknown checksum algorithm 'md5'"):
        checksums.Running("md5")


def test_force_never_replaces_what_is_not_a_checkpoint(tmp_path):
    """force=True replaces checkpoints only: other directories, manager roots and files survive."""
    user_dir = tmp_path / "thesis"
    (user_dir / "sub").mkdir(parents=True)
    (user_dir / "sub" / "chapter1.txt").write_text("precious")
    a_file = tmp_path / "afile"
    a_file.write_text("also precious")
    for target in (user_dir, a_file):
        for force in (False, True):
            with pytest.raises(AlreadyExistsError, match="never replaces it, even with force=True"):
                ckptcore.save(target, {"a": 1}, force=force)
    assert (user_dir / "sub" / "chapter1.txt").read_text() == "precious"
    assert a_file.read_text() == "also precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "thesis"]  # no leftovers either

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AlreadyExistsError, match="empty directory"):
        ckptcore.save(empty, {"a": 1})
    ckptcore.save(empty, {"a": 1}, force=True)
    assert ckptcore.restore(empty) == {"a": 1}


@pytest.mark.parametrize("fmt", ["ocdbt", "zarr3"])
def test_zero_d_arrays_come_back_as_arrays(tmp_path, fmt):
    ckptcore.save(tmp_path / "ck", {"a": np.array(3.5), "b": np.array(2, np.int8)}, format=fmt)
    back = ckptcore.restore(tmp_path / "ck")
    assert type(back["a"]) is np.ndarray and back["a"].shape == () and back["a"] == 3.5
    assert type(back["b"]) is np.ndarray and back["b"].dtype == np.int8
    cast = ckptcore.restore(tmp_path / "ck", {"a": np.empty((), np.float32), "b": None})
    assert type(cast["a"]) is np.ndarray and cast["a"].dtype == np.float32 and cast["b"] is None


def test_a_target_leaf_that_is_not_array_like_is_a_mismatch(tmp_path):
    ckptcore.save(tmp_path / "ck", {"w": np.ones(3, np.float32), "n": 4})
    with pytest.raises(TargetMismatchError, match=r"\['w'\] is a str"):
        ckptcore.restore(tmp_path / "ck", {"w": "abc", "n": 0})
    assert ckptcore.restore(tmp_path / "ck", {"w": np.empty(3, np.float32), "n": 0})["n"] == 4
