"""The gcs plugin against fake-gcs-server: URL resolution, credentials, errors, round trips."""

from __future__ import annotations

import os

import numpy as np
import pytest

import ckptcore
from ckptcore import storage
from ckptcore.errors import CheckpointNotFoundError, MissingPluginError, StorageError
from ckptcore.plugins.manager import reset_registry

kvstore_spec = pytest.importorskip("ckptcore_zarr3.kvstore").kvstore_spec


def test_resolve_builds_gcsfs_and_tensorstore_spec(gcs_server, gcs_bucket):
    loc = storage.resolve(f"gs://{gcs_bucket}/run/7/", {"retries": 3, "retry_delay": 0.5, "request_concurrency": 4})
    assert loc.url == f"gs://{gcs_bucket}/run/7" and loc.path == f"{gcs_bucket}/run/7" and loc.scheme == "gs"
    address = loc.address
    assert (address.scheme, address.bucket, address.path) == ("gs", gcs_bucket, "run/7/")
    assert address.endpoint == gcs_server.endpoint and address.request_concurrency == 4
    # the zarr3 plugin turns the format-neutral address into TensorStore's spec
    kvstore = kvstore_spec(address)
    assert kvstore["driver"] == "gcs" and kvstore["bucket"] == gcs_bucket and kvstore["path"] == "run/7/"
    context = kvstore["context"]
    assert context["gcs_request_retries"] == {"max_retries": 4, "initial_delay": "500ms", "max_delay": "4000ms"}
    assert context["gcs_request_concurrency"] == {"limit": 4}
    # TensorStore has no endpoint member: the emulator host goes to its variable.
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == gcs_server.endpoint
    assert loc.fs is storage.resolve(f"gs://{gcs_bucket}/other", {"retries": 3, "retry_delay": 0.5}).fs  # cached
    assert loc.fs is not storage.resolve(f"gs://{gcs_bucket}/other").fs
    child = kvstore_spec(loc.child("item").address)
    assert child["path"] == "run/7/item/" and child["context"] == context


def test_explicit_endpoint_is_used_by_both_clients(gcs_server, gcs_bucket, gcs_proxy):
    url = f"gs://{gcs_bucket}/via-proxy"
    state = {"w": np.arange(5000, dtype=np.float32)}
    ckptcore.save(url, state, storage_options={"endpoint": gcs_proxy.endpoint})
    stats = gcs_proxy.stats()
    assert stats.requests > 0 and stats.bytes_up >= state["w"].nbytes  # the array data went through it too
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == gcs_proxy.endpoint
    restored = ckptcore.restore(url)  # back to STORAGE_EMULATOR_HOST
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == gcs_server.endpoint
    np.testing.assert_array_equal(restored["w"], state["w"])


@pytest.mark.parametrize("fmt", ["ocdbt", "zarr3"])
def test_gcs_scheme_alias_round_trip(gcs_bucket, fmt):
    url = f"gcs://{gcs_bucket}/alias"
    state = {"a": np.random.default_rng(0).standard_normal((100, 30)), "n": 3}
    ckptcore.save(url, state, format=fmt)
    out = ckptcore.restore(url)
    np.testing.assert_array_equal(out["a"], state["a"])
    assert out["n"] == 3
    np.testing.assert_array_equal(ckptcore.restore(f"gs://{gcs_bucket}/alias")["a"], state["a"])


def test_unknown_option_and_missing_bucket_name(gcs_server):
    with pytest.raises(StorageError, match=r"unknown storage_options.*endpointt.*accepts"):
        storage.resolve("gs://bucket/x", {"endpointt": "http://127.0.0.1:1"})
    with pytest.raises(StorageError, match="names no bucket"):
        storage.resolve("gs:///x")


def test_missing_credentials_name_the_path(gcs_server, gcs_bucket, monkeypatch):
    with pytest.raises(StorageError, match=r"/nonexistent/key.json.*does not exist") as err:
        ckptcore.save(f"gs://{gcs_bucket}/c", {"a": np.ones(3)}, storage_options={"token": "/nonexistent/key.json"})
    assert f"gs://{gcs_bucket}/c" in str(err.value)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/sa.json")
    with pytest.raises(StorageError, match=r"no usable credentials.*GOOGLE_APPLICATION_CREDENTIALS") as err:
        ckptcore.restore(f"gs://{gcs_bucket}/c2", storage_options={"token": "google_default"})
    assert f"gs://{gcs_bucket}/c2" in str(err.value)


def test_wrong_bucket(gcs_server):
    with pytest.raises(StorageError, match="no-such-bucket-x1"):
        ckptcore.save("gs://no-such-bucket-x1/ckpt", {"a": np.ones(3)})
    with pytest.raises(CheckpointNotFoundError, match="gs://no-such-bucket-x1/ckpt"):
        ckptcore.restore("gs://no-such-bucket-x1/ckpt")


def test_blocked_plugin_says_what_to_install(monkeypatch):
    monkeypatch.setenv("CKPTCORE_BLOCK_PLUGINS", "gcs")
    reset_registry()
    try:
        with pytest.raises(MissingPluginError, match=r"pip install 'ckptcore\[gcs\]'"):
            ckptcore.save("gs://bucket/x", {"a": np.ones(3)})
    finally:
        monkeypatch.delenv("CKPTCORE_BLOCK_PLUGINS")
        reset_registry()
