"""A :class:`~ckptcore.plugins.address.StorageAddress` as a TensorStore kvstore spec.

Storage plugins describe where bulk data lives without naming TensorStore; this module is
the one place that knows TensorStore's drivers:

* ``file``: the ``file`` driver.
* ``gs``: the ``gcs`` driver, with retries, request concurrency and requester-pays as
  context resources. The driver has no endpoint member: it reads
  ``TENSORSTORE_GCS_HTTP_URL`` each time a store is opened, so the address's endpoint (an
  emulator, a proxy) is put there, and the user's own value back for the public service.
  One process therefore talks to one GCS endpoint at a time.
* ``s3``: the ``s3`` driver with an explicit ``endpoint`` whenever the address has one
  (TensorStore ignores ``AWS_ENDPOINT_URL``: without it the spec would talk to AWS), the
  region, retries, concurrency and credentials. TensorStore takes no literal keys: explicit
  ones go into a private credentials file that its ``profile`` provider reads.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from typing import Any

from ckptcore.errors import StorageError
from ckptcore.plugins.address import RetryPolicy, StorageAddress

_GCS_URL = "TENSORSTORE_GCS_HTTP_URL"
_user_gcs_url = os.environ.get(_GCS_URL)
_env_lock = threading.Lock()


def kvstore_spec(address: StorageAddress) -> dict[str, Any]:
    """The TensorStore kvstore spec of the directory at ``address`` (its ``path`` ends with ``/``)."""
    if address.scheme == "file":
        return {"driver": "file", "path": address.path}
    if address.scheme in ("gs", "gcs"):
        return _gcs(address)
    if address.scheme in ("s3", "s3a"):
        return _s3(address)
    raise StorageError(
        f"the array formats of ckptcore-zarr3 (TensorStore) cannot reach storage of kind {address.scheme!r}: "
        "they read and write local directories ('file'), Google Cloud Storage ('gs') and S3 ('s3'). "
        "Save with an array format that this storage plugin supports (format=...)"
    )


def request_retries(policy: RetryPolicy) -> dict[str, Any]:
    """The value of TensorStore's ``gcs_request_retries`` / ``s3_request_retries`` resource."""
    return {
        "max_retries": max(1, policy.retries + 1),  # TensorStore counts attempts, including the first
        "initial_delay": f"{int(policy.retry_delay * 1000)}ms",
        "max_delay": f"{int(policy.retry_max_delay * 1000)}ms",
    }


def _gcs(address: StorageAddress) -> dict[str, Any]:
    _point_gcs_driver_at(address.endpoint)
    context: dict[str, Any] = {"gcs_request_retries": request_retries(address.retry)}
    if address.request_concurrency is not None:
        context["gcs_request_concurrency"] = {"limit": address.request_concurrency}
    if address.options.get("user_project"):
        context["gcs_user_project"] = {"project_id": str(address.options["user_project"])}
    return {"driver": "gcs", "bucket": address.bucket, "path": address.path, "context": context}


def _point_gcs_driver_at(endpoint: str | None) -> None:
    with _env_lock:
        wanted = endpoint or _user_gcs_url
        if wanted is None:
            os.environ.pop(_GCS_URL, None)
        elif os.environ.get(_GCS_URL) != wanted:
            os.environ[_GCS_URL] = wanted


def _s3(address: StorageAddress) -> dict[str, Any]:
    context: dict[str, Any] = {
        "s3_request_retries": request_retries(address.retry),
        "aws_credentials": _aws_credentials(address),
    }
    if address.request_concurrency is not None:
        context["s3_request_concurrency"] = {"limit": address.request_concurrency}
    spec: dict[str, Any] = {
        "driver": "s3", "bucket": address.bucket, "path": address.path, "aws_region": address.region or "us-east-1",
        "context": context,
    }
    if address.endpoint:
        spec["endpoint"] = address.endpoint
    return spec


def _aws_credentials(address: StorageAddress) -> dict[str, Any]:
    credentials = address.credentials
    if credentials.get("anon"):
        return {"type": "anonymous"}
    if credentials.get("key"):
        path, config = _credentials_files(credentials)
        return {"type": "profile", "profile": "ckptcore", "credentials_file": path, "config_file": config}
    if credentials.get("profile"):
        return {"type": "profile", "profile": str(credentials["profile"])}
    return {"type": "default"}


_cred_dir: str | None = None
_cred_files: dict[str, str] = {}
_cred_lock = threading.Lock()


def _credentials_files(credentials: Any) -> tuple[str, str]:
    """A credentials file holding these keys (created once per key set, removed at exit), and a config file."""
    global _cred_dir
    wanted = {k: credentials.get(k) for k in ("key", "secret", "token")}
    cache_key = json.dumps(wanted, sort_keys=True, default=repr)
    with _cred_lock:
        if cache_key in _cred_files:
            return _cred_files[cache_key], os.path.join(str(_cred_dir), "config")
        if _cred_dir is None:
            _cred_dir = tempfile.mkdtemp(prefix="ckptcore-s3-")
            atexit.register(shutil.rmtree, _cred_dir, True)
            # The profile provider also reads a config file; an empty one keeps it off AWS_CONFIG_FILE.
            with open(os.path.join(_cred_dir, "config"), "w"):
                pass
        path = os.path.join(_cred_dir, f"credentials-{len(_cred_files)}")
        lines = ["[ckptcore]", f"aws_access_key_id = {wanted['key']}", f"aws_secret_access_key = {wanted['secret']}"]
        if wanted["token"]:
            lines.append(f"aws_session_token = {wanted['token']}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        _cred_files[cache_key] = path
        return path, os.path.join(_cred_dir, "config")
