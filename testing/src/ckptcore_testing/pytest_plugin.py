"""pytest fixtures for real object-store emulators on 127.0.0.1, for ckptcore and its plugins.

Installed with the ``ckptcore-testing`` distribution, which registers this module through
a ``pytest11`` entry point: any test suite that has it installed gets the fixtures
``s3_server``, ``gcs_server``, ``s3_bucket``, ``gcs_bucket``, ``s3_proxy``, ``gcs_proxy``
and ``cloud`` without importing anything. Session-scoped servers, per-test buckets; the
variables that point clients at a server are set when it starts, before any client is
created, so no client ever probes a metadata server or a public host.
"""

from __future__ import annotations

import os
import uuid

import pytest

# Cloud clients must never probe a metadata server or a public host.
for _key, _value in {
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(_key, _value)


def _unique_bucket() -> str:
    return f"ckpt-{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="session")
def s3_server():
    """moto_server on a free loopback port; AWS variables point at it for the whole session."""
    from ckptcore_testing import servers

    server = servers.start_moto()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in servers.s3_env(server.endpoint).items():
            mp.setenv(key, value)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/ckptcore-tests/credentials")
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/ckptcore-tests/config")
        yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server on a free loopback port; GCS variables point at it for the whole session."""
    from ckptcore_testing import servers

    server = servers.start_fake_gcs()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in servers.gcs_env(server.endpoint).items():
            mp.setenv(key, value)
        yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on moto_server (created with boto3)."""
    import boto3

    name = _unique_bucket()
    boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def gcs_bucket(gcs_server):
    """A fresh bucket on fake-gcs-server."""
    from ckptcore_testing import servers

    name = _unique_bucket()
    servers.create_gcs_bucket(gcs_server.endpoint, name)
    return name


@pytest.fixture
def s3_proxy(s3_server):
    """A fault-injecting proxy in front of moto_server (pass storage_options={'endpoint': proxy.endpoint})."""
    from ckptcore_testing.faultproxy import FaultProxy

    with FaultProxy(s3_server.endpoint) as proxy:
        yield proxy


@pytest.fixture
def gcs_proxy(gcs_server):
    """A fault-injecting proxy in front of fake-gcs-server (pass storage_options={'endpoint': proxy.endpoint})."""
    from ckptcore_testing.faultproxy import FaultProxy

    with FaultProxy(gcs_server.endpoint) as proxy:
        yield proxy


@pytest.fixture(params=["gs", "s3"])
def cloud(request):
    """One object store per parameter: ``.scheme``, ``.bucket``, ``.url(name)``, ``.proxy`` (lazy)."""
    from types import SimpleNamespace

    scheme = request.param
    bucket = request.getfixturevalue("gcs_bucket" if scheme == "gs" else "s3_bucket")
    server = request.getfixturevalue("gcs_server" if scheme == "gs" else "s3_server")

    def proxy():
        return request.getfixturevalue("gcs_proxy" if scheme == "gs" else "s3_proxy")

    return SimpleNamespace(
        scheme=scheme, bucket=bucket, server=server, proxy=proxy,
        url=lambda name="ckpt": f"{scheme}://{bucket}/{name}",
    )
