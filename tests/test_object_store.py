"""gs:// and s3:// against real emulators: save/restore, metadata, commit-marker atomicity, cleanup."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import ckptcore
from ckptcore import storage
from ckptcore.errors import AlreadyExistsError, CheckpointNotFoundError, NotCommittedError, TargetMismatchError
from ckptcore.storage.object_store import COMMIT_MARKER, PENDING_MARKER


def _state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "params": {"w": rng.standard_normal((64, 128)).astype(np.float32), "b": rng.standard_normal(128)},
        "opt": [np.arange(10, dtype=np.int32), {"mu": rng.standard_normal((32, 32)).astype(np.float16)}],
        "step": 7,
        "name": "run",
    }


def _assert_same(a, b) -> None:
    assert a["step"] == b["step"] and a["name"] == b["name"]
    np.testing.assert_array_equal(a["params"]["w"], b["params"]["w"])
    np.testing.assert_array_equal(a["params"]["b"], b["params"]["b"])
    np.testing.assert_array_equal(a["opt"][0], b["opt"][0])
    np.testing.assert_array_equal(a["opt"][1]["mu"], b["opt"][1]["mu"])


def _keys(cloud, prefix: str) -> list[str]:
    loc = storage.resolve(cloud.url(prefix))
    return sorted(str(p)[len(loc.path) + 1:] for p in loc.fs.find(loc.path))


@pytest.mark.parametrize("fmt", ["ocdbt", "zarr3"])
def test_save_restore_round_trip(cloud, fmt):
    state = _state()
    url = cloud.url(f"run/{fmt}")
    ckptcore.save(url, state, format=fmt, format_options={"chunk_bytes": 8 << 10}, metadata={"epoch": 3})
    _assert_same(ckptcore.restore(url), state)
    info = ckptcore.info(url)
    assert info.metadata == {"epoch": 3} and info.url == url
    assert fmt in info.array_formats
    keys = _keys(cloud, f"run/{fmt}")
    assert COMMIT_MARKER in keys and PENDING_MARKER not in keys
    assert any(k.startswith(f"{fmt}/") for k in keys)  # array data really lives in the bucket


def test_restore_with_target_and_partial(cloud):
    state = _state(1)
    url = cloud.url()
    ckptcore.save(url, state)
    target = {
        "params": {"w": np.zeros((64, 128), np.float64), "b": np.zeros(128)},
        "opt": [np.zeros(10, np.int32), {"mu": np.zeros((32, 32), np.float16)}],
        "step": 0, "name": "",
    }
    out = ckptcore.restore(url, target)
    assert out["params"]["w"].dtype == np.float64
    np.testing.assert_allclose(out["params"]["w"], state["params"]["w"].astype(np.float64))
    part = ckptcore.restore(url, {"params": {"w": np.zeros((64, 128), np.float32)}}, partial=True)
    assert set(part) == {"params"} and set(part["params"]) == {"w"}
    np.testing.assert_array_equal(part["params"]["w"], state["params"]["w"])
    with pytest.raises(TargetMismatchError, match="partial=True"):
        ckptcore.restore(url, {"params": {"w": np.zeros((64, 128), np.float32)}})


def test_metadata_and_inspect_read_no_array_data(cloud):
    url = cloud.url("meta")
    ckptcore.save(url, _state(2))
    proxy = cloud.proxy()
    proxy.record_paths = True
    options = {"endpoint": proxy.endpoint}
    meta = ckptcore.metadata(url, storage_options=options)
    assert meta["params"]["w"].shape == (64, 128) and meta["params"]["w"].dtype == np.float32
    assert meta["step"] == 7
    paths = [p for _, p in proxy.stats().paths]
    assert paths, "the metadata read went through the proxy"
    assert not any("ocdbt" in p or ".packed" in p for p in paths), paths


def test_cli_inspect(cloud):
    url = cloud.url("cli")
    ckptcore.save(url, _state(3))
    out = subprocess.run(
        [sys.executable, "-m", "ckptcore", "inspect", "--json", url], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["url"] == url
    shapes = {leaf["path"]: leaf.get("shape") for leaf in doc["leaves"]}
    assert [64, 128] in shapes.values()


def test_uncommitted_directory_is_invisible_and_cleaned(cloud):
    committed = cloud.url("root/done")
    ckptcore.save(committed, _state())
    # A save that died after writing data: begin + data, never committed.
    final = storage.resolve(cloud.url("root/crashed"))
    strategy = storage.atomicity(final)
    staging = strategy.begin(final)
    from ckptcore.io import save as saving

    saving.write_contents(saving.prepare(_state(5)), staging, url=final.url)
    assert not strategy.is_committed(final) and strategy.is_staging(final)
    with pytest.raises(NotCommittedError, match="crashed"):
        ckptcore.restore(final.url)
    # Unrelated objects in the same directory are not checkpoints and not leftovers.
    unrelated = storage.resolve(cloud.url("root/tensorboard"))
    unrelated.fs.pipe_file(f"{unrelated.path}/events.out", b"x")
    removed = ckptcore.clean(cloud.url("root")) if hasattr(ckptcore, "clean") else _clean(cloud.url("root"))
    assert removed == [final.url]
    assert _keys(cloud, "root/crashed") == []
    assert _keys(cloud, "root/tensorboard") == ["events.out"]
    _assert_same(ckptcore.restore(committed), _state())


def _clean(url: str) -> list[str]:
    from ckptcore.storage.cleanup import clean

    return clean(url)


def test_exists_and_force_replace(cloud):
    url = cloud.url("forced")
    ckptcore.save(url, _state(1), format="zarr3")
    with pytest.raises(AlreadyExistsError):
        ckptcore.save(url, _state(2))
    _assert_same(ckptcore.restore(url), _state(1))  # the refused save changed nothing
    ckptcore.save(url, _state(2), force=True)
    _assert_same(ckptcore.restore(url), _state(2))
    # The old zarr3 data is gone: nothing stale mixes with the new checkpoint.
    assert not any(k.startswith("zarr3/") for k in _keys(cloud, "forced"))


def test_delete_makes_invisible_first_and_interrupted_delete_is_cleaned(cloud):
    url = cloud.url("del/a")
    ckptcore.save(url, _state())
    location = storage.resolve(url)
    strategy = storage.atomicity(location)
    strategy.delete(location)
    assert _keys(cloud, "del/a") == []
    with pytest.raises(CheckpointNotFoundError):
        ckptcore.restore(url)

    # An interrupted delete: data deletes fail after the marker went.
    url_b = cloud.url("del/b")
    ckptcore.save(url_b, _state())
    proxy = cloud.proxy()
    options = {"endpoint": proxy.endpoint, "retries": 0}
    proxied = storage.resolve(url_b, options)
    proxy.configure(fail_rate=1.0, fail_status=500, match=_data_delete)
    with pytest.raises(ckptcore.errors.StorageError, match="del/b"):
        strategy.delete(proxied)
    proxy.heal()
    b = storage.resolve(url_b)
    assert not strategy.is_committed(b) and strategy.is_staging(b)
    with pytest.raises(NotCommittedError):
        ckptcore.restore(url_b)
    assert _clean(cloud.url("del")) == [b.url]
    assert _keys(cloud, "del/b") == []


def _data_delete(method: str, path: str) -> bool:
    # S3 deletes many keys in one POST ?delete; GCS deletes object by object (or in a batch).
    if method == "DELETE":
        return COMMIT_MARKER not in path and PENDING_MARKER not in path
    return method == "POST" and ("delete" in path or "batch" in path)


def test_missing_checkpoint_and_bucket(cloud):
    with pytest.raises(CheckpointNotFoundError, match="nothing-here"):
        ckptcore.restore(cloud.url("nothing-here"))
    missing = f"{cloud.scheme}://no-such-bucket-{cloud.bucket[-6:]}/x"
    with pytest.raises(ckptcore.errors.StorageError, match="no-such-bucket") as err:
        ckptcore.save(missing, _state(), storage_options={"retries": 1})
    assert "does not exist" in str(err.value) or "not found" in str(err.value)
