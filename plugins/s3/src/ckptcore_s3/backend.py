"""Resolving ``s3://bucket/path`` URLs: an s3fs filesystem and an ``s3`` storage address."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ckptcore.errors import StorageError
from ckptcore.plugins.address import StorageAddress
from ckptcore.plugins.registrations import Location
from ckptcore.storage.object_store import (
    RETRY_OPTION_KEYS,
    RetryPolicy,
    cached_filesystem,
    parse_bucket_url,
    storage_error,
)

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
        # The endpoint is resolved here, from the options or AWS_ENDPOINT_URL(_S3), and always
        # handed on: some clients (TensorStore's) ignore AWS_ENDPOINT_URL and would talk to AWS.
        address = StorageAddress(
            scheme="s3", bucket=bucket, path=f"{key}/" if key else "", endpoint=endpoint, region=region,
            credentials=_credentials(options), retry=policy,
            request_concurrency=int(options["request_concurrency"]) if "request_concurrency" in options else None,
        )
        path = f"{bucket}/{key}" if key else bucket
        return Location(url=f"s3://{path}", scheme="s3", fs=fs, path=path, address=address, options=dict(options))


def _credentials(options: Mapping[str, Any]) -> dict[str, Any]:
    """The credentials of the address, in storage_options words (``{}``: the standard AWS chain)."""
    if options.get("anon"):
        return {"anon": True}
    if options.get("key"):
        return {k: options[k] for k in ("key", "secret", "token") if options.get(k)}
    if options.get("profile"):
        return {"profile": str(options["profile"])}
    return {}


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
