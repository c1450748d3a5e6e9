"""Resolving ``s3://bucket/path`` URLs: an s3fs filesystem and a TensorStore ``s3`` kvstore spec."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

from ckptcore.errors import StorageError
from ckptcore.storage.object_store import (
    RETRY_OPTION_KEYS,
    RetryPolicy,
    cached_filesystem,
    options_key,
    parse_bucket_url,
    storage_error,
)
from ckptcore.plugins.registrations import Location

OPTION_KEYS = (
    "endpoint", "region", "profile", "key", "secret", "token", "anon", "request_concurrency", *RETRY_OPTION_KEYS,
)
CREDENTIALS_HINT = (
    "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, use a profile (AWS_PROFILE or storage_options "
    "{'profile': ...}), or pass storage_options={'key': ..., 'secret': ...}."
)
DEFAULT_REGION = "us-east-1"
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
)


def endpoint_of(options: Mapping[str, Any]) -> str | None:
    """The endpoint from ``options`` or the standard AWS variables (None: AWS itself)."""
    endpoint = options.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return str(endpoint).rstrip("/") if endpoint else None


def region_of(options: Mapping[str, Any]) -> str:
    return str(
        options.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    )


class S3Backend:
    """``s3://`` URLs, on AWS or any S3-compatible store (MinIO, moto, Ceph...)."""

    def resolve(self, url: str, options: Mapping[str, Any]) -> Location:
        bucket, key = parse_bucket_url(url, options, OPTION_KEYS, "s3")
        if bool(options.get("key")) != bool(options.get("secret")):
            raise StorageError(f"storage_options for {url} need both 'key' and 'secret', or neither")
        policy = RetryPolicy.from_options(options)
        endpoint = endpoint_of(options)
        region = region_of(options)
        fs_options = {k: options[k] for k in OPTION_KEYS if k in options and k != "request_concurrency"}
        fs_options.update(endpoint=endpoint, region=region)
        try:
            fs = cached_filesystem(
                "s3", fs_options, lambda: _make_filesystem(endpoint, region, options, policy), env=CREDENTIAL_VARIABLES
            )
        except Exception as exc:
            raise storage_error(exc, url, "connecting to S3 for", credentials_hint=CREDENTIALS_HINT) from exc
        context: dict[str, Any] = {
            "s3_request_retries": policy.tensorstore(),
            "aws_credentials": _tensorstore_credentials(options),
        }
        if "request_concurrency" in options:
            context["s3_request_concurrency"] = {"limit": int(options["request_concurrency"])}
        # TensorStore ignores AWS_ENDPOINT_URL: without an explicit endpoint it talks to AWS.
        kvstore: dict[str, Any] = {
            "driver": "s3", "bucket": bucket, "path": f"{key}/" if key else "", "aws_region": region, "context": context,
        }
        if endpoint:
            kvstore["endpoint"] = endpoint
        path = f"{bucket}/{key}" if key else bucket
        return Location(url=f"s3://{path}", scheme="s3", fs=fs, path=path, kvstore=kvstore, options=dict(options))


def _make_filesystem(endpoint: str | None, region: str, options: Mapping[str, Any], policy: RetryPolicy) -> Any:
    import s3fs

    config: dict[str, Any] = {
        # botocore retries throttling, 5xx and connection errors with backoff; bounded here.
        "retries": {"total_max_attempts": policy.retries + 1, "mode": "standard"},
        "connect_timeout": min(policy.timeout, 30.0),
        "read_timeout": policy.timeout,
    }
    kwargs: dict[str, Any] = {
        "anon": bool(options.get("anon", False)),
        "client_kwargs": {"region_name": region},
        "config_kwargs": config,
        "skip_instance_cache": True,
        "use_listings_cache": False,  # TensorStore writes beside us: never list stale
    }
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    for ours, theirs in (("key", "key"), ("secret", "secret"), ("token", "token"), ("profile", "profile")):
        if options.get(ours):
            kwargs[theirs] = options[ours]
    fs = s3fs.S3FileSystem(**kwargs)
    fs.retries = 2  # s3fs's own loop around botocore's: one more try for a body read cut short
    return fs


# TensorStore takes no literal keys: explicit ones go into a private credentials file that
# its ``profile`` provider reads (created once per key set, removed at exit).
_cred_dir: str | None = None
_cred_files: dict[str, str] = {}
_cred_lock = threading.Lock()


def _tensorstore_credentials(options: Mapping[str, Any]) -> dict[str, Any]:
    if options.get("anon"):
        return {"type": "anonymous"}
    if options.get("key"):
        credentials, config = _credentials_files(options)
        return {"type": "profile", "profile": "ckptcore", "credentials_file": credentials, "config_file": config}
    if options.get("profile"):
        return {"type": "profile", "profile": str(options["profile"])}
    return {"type": "default"}


def _credentials_files(options: Mapping[str, Any]) -> tuple[str, str]:
    global _cred_dir
    wanted = {k: options.get(k) for k in ("key", "secret", "token")}
    cache_key = options_key("s3-credentials", wanted)
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
