"""The s3 plugin against moto_server: URL resolution, endpoints, credentials, errors, round trips."""

from __future__ import annotations

import numpy as np
import pytest

import ckptcore
from ckptcore import storage
from ckptcore.errors import CheckpointNotFoundError, MissingPluginError, StorageError
from ckptcore.plugins.manager import reset_registry

kvstore_spec = pytest.importorskip("ckptcore_zarr3.kvstore").kvstore_spec


def test_resolve_puts_endpoint_and_region_into_the_tensorstore_spec(s3_server, s3_bucket, monkeypatch):
    loc = storage.resolve(f"s3://{s3_bucket}/run/7", {"retries": 2})
    assert loc.url == f"s3://{s3_bucket}/run/7" and loc.path == f"{s3_bucket}/run/7"
    assert loc.address.endpoint == s3_server.endpoint and loc.address.region == "us-east-1"
    kv = kvstore_spec(loc.address)  # the zarr3 plugin's TensorStore spec of the format-neutral address
    assert kv["driver"] == "s3" and kv["bucket"] == s3_bucket and kv["path"] == "run/7/"
    assert kv["endpoint"] == s3_server.endpoint  # from AWS_ENDPOINT_URL, which TensorStore ignores
    assert kv["aws_region"] == "us-east-1"
    assert kv["context"]["s3_request_retries"]["max_retries"] == 3
    explicit = storage.resolve(f"s3://{s3_bucket}/x", {"endpoint": "http://127.0.0.1:1/", "region": "eu-west-3"})
    explicit_kv = kvstore_spec(explicit.address)
    assert explicit_kv["endpoint"] == "http://127.0.0.1:1" and explicit_kv["aws_region"] == "eu-west-3"
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert kvstore_spec(storage.resolve(f"s3://{s3_bucket}/x").address)["aws_region"] == "ap-south-1"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert "endpoint" not in kvstore_spec(storage.resolve(f"s3://{s3_bucket}/x").address)  # real AWS


def test_explicit_endpoint_carries_array_data(s3_bucket, s3_proxy):
    url = f"s3://{s3_bucket}/via-proxy"
    state = {"w": np.arange(5000, dtype=np.float32)}
    ckptcore.save(url, state, storage_options={"endpoint": s3_proxy.endpoint})
    assert s3_proxy.stats().bytes_up >= state["w"].nbytes
    np.testing.assert_array_equal(ckptcore.restore(url)["w"], state["w"])


@pytest.mark.parametrize("fmt", ["ocdbt", "zarr3"])
def test_explicit_keys_without_environment_credentials(s3_bucket, monkeypatch, fmt):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    options = {"key": "testing", "secret": "testing"}
    state = {"a": np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32), "s": "x"}
    url = f"s3://{s3_bucket}/keys-{fmt}"
    ckptcore.save(url, state, format=fmt, storage_options=options)
    out = ckptcore.restore(url, storage_options=options)
    np.testing.assert_array_equal(out["a"], state["a"])
    assert kvstore_spec(storage.resolve(url, options).address)["context"]["aws_credentials"]["type"] == "profile"


def test_missing_credentials(s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    url = f"s3://{s3_bucket}/nocreds"
    with pytest.raises(StorageError, match=r"no usable credentials.*AWS_ACCESS_KEY_ID") as err:
        ckptcore.save(url, {"a": np.ones(3)})
    assert url in str(err.value)
    with pytest.raises(StorageError, match="both 'key' and 'secret'"):
        storage.resolve(url, {"key": "only"})


def test_wrong_bucket_and_options(s3_server):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x1' does not exist"):
        ckptcore.save("s3://no-such-bucket-x1/ckpt", {"a": np.ones(3)})
    with pytest.raises(CheckpointNotFoundError, match="s3://no-such-bucket-x1/ckpt"):
        ckptcore.restore("s3://no-such-bucket-x1/ckpt")
    with pytest.raises(StorageError, match=r"unknown storage_options.*regoin"):
        storage.resolve("s3://b/x", {"regoin": "us-east-1"})
    with pytest.raises(StorageError, match="retries"):
        storage.resolve("s3://b/x", {"retries": -1})


def test_blocked_plugin_says_what_to_install(monkeypatch):
    monkeypatch.setenv("CKPTCORE_BLOCK_PLUGINS", "s3")
    reset_registry()
    try:
        with pytest.raises(MissingPluginError, match=r"pip install 'ckptcore\[s3\]'"):
            ckptcore.restore("s3://bucket/x")
    finally:
        monkeypatch.delenv("CKPTCORE_BLOCK_PLUGINS")
        reset_registry()
