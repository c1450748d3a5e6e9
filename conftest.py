"""Test-wide setup (for tests/ and plugins/*/tests): 8 forced host devices for JAX, and no cloud client may leave loopback."""

from __future__ import annotations

import os

# Before JAX initialises anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Cloud clients must never probe a metadata server or a public host (see shared/TESTING.md).
for key, value in {
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(key, value)

# The object-store fixtures (s3_server, gcs_server, buckets, proxies, cloud) come from the
# ckptcore-testing distribution's pytest plugin (testing/src/ckptcore_testing/pytest_plugin.py).
