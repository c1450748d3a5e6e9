"""Resolving ``gs://bucket/path`` URLs: a gcsfs filesystem and a ``gs`` storage address."""

from __future__ import annotations

import asyncio
import logging
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

log = logging.getLogger("ckptcore_gcs")

OPTION_KEYS = ("endpoint", "project", "token", "user_project", "request_concurrency", *RETRY_OPTION_KEYS)
CREDENTIALS_HINT = (
    "Use application default credentials (gcloud auth application-default login), set "
    "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or pass storage_options={'token': ...}."
)

_TOKEN_METHODS = ("anon", "google_default", "cache", "cloud", "browser")


def emulator_endpoint(options: Mapping[str, Any]) -> str | None:
    """The endpoint from ``options`` or ``STORAGE_EMULATOR_HOST``, as an http(s) URL (None: real GCS)."""
    endpoint = options.get("endpoint") or os.environ.get("STORAGE_EMULATOR_HOST")
    if not endpoint:
        return None
    endpoint = str(endpoint).rstrip("/")
    return endpoint if "://" in endpoint else f"http://{endpoint}"


class GCSBackend:
    """``gs://`` (and ``gcs://``) URLs."""

    def resolve(self, url: str, options: Mapping[str, Any]) -> Location:
        scheme = url.partition("://")[0]
        bucket, key = parse_bucket_url(url, options, OPTION_KEYS, "gcs")
        policy = RetryPolicy.from_options(options)
        endpoint = emulator_endpoint(options)
        fs_options = {k: options[k] for k in OPTION_KEYS if k in options and k != "request_concurrency"}
        fs_options["endpoint"] = endpoint
        try:
            fs = cached_filesystem(
                "gs", fs_options, lambda: _make_filesystem(endpoint, options, policy),
                env=("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"),
            )
        except StorageError as exc:
            raise StorageError(f"connecting to GCS for {url} failed: {exc}") from exc
        except Exception as exc:
            raise storage_error(exc, url, "connecting to GCS for", credentials_hint=CREDENTIALS_HINT) from exc
        address = StorageAddress(
            scheme="gs", bucket=bucket, path=f"{key}/" if key else "", endpoint=endpoint, retry=policy,
            credentials=_credentials(options),
            request_concurrency=int(options["request_concurrency"]) if "request_concurrency" in options else None,
            options={"user_project": str(options["user_project"])} if options.get("user_project") else {},
        )
        path = f"{bucket}/{key}" if key else bucket
        return Location(
            url=f"{scheme}://{path}", scheme=scheme, fs=fs, path=path, address=address, options=dict(options)
        )


def _credentials(options: Mapping[str, Any]) -> dict[str, Any]:
    """The credentials of the address: the ``token`` option when one is given, else the default chain."""
    token = options.get("token")
    if token == "anon":
        return {"anon": True}
    return {"token": token} if token is not None else {}


def _make_filesystem(endpoint: str | None, options: Mapping[str, Any], policy: RetryPolicy) -> Any:
    token = options.get("token")
    if isinstance(token, str) and token not in _TOKEN_METHODS and ("/" in token or token.endswith(".json")):
        # gcsfs would take a missing file's name for an access token and ask Google about it.
        if not os.path.isfile(os.path.expanduser(token)):
            raise StorageError(
                f"the credentials file {token!r} given as storage_options 'token' does not exist. {CREDENTIALS_HINT}"
            )
        token = os.path.expanduser(token)
    if token is None:
        # An emulator needs no credentials; real GCS must not fall back to anonymous
        # access silently (gcsfs's default), which would turn a missing login into 403s.
        token = "anon" if endpoint else "google_default"
    project = options.get("project") or os.environ.get("GOOGLE_CLOUD_PROJECT") or ("test" if endpoint else None)
    cls = _retrying_filesystem_class()
    kwargs: dict[str, Any] = {
        "token": token, "project": project, "requests_timeout": policy.timeout,
        "skip_instance_cache": True, "use_listings_cache": False,  # TensorStore writes beside us: never list stale
        "requester_pays": options.get("user_project") or False,
    }
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    fs = cls(**kwargs)
    fs.ckptcore_retry_policy = policy
    return fs


_cls: Any = None


def _retrying_filesystem_class() -> Any:
    """GCSFileSystem whose request retries follow :class:`RetryPolicy` (gcsfs hard-codes 6 tries)."""
    global _cls
    if _cls is not None:
        return _cls
    import gcsfs
    from gcsfs.retry import is_retriable

    inner = gcsfs.GCSFileSystem._request.__wrapped__

    class GaveUp(OSError):
        """Retries exhausted: an OSError, which gcsfs's upload wrappers do not retry again."""

    class RetryingGCSFileSystem(gcsfs.GCSFileSystem):
        ckptcore_retry_policy = RetryPolicy()

        async def _request(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
            policy = self.ckptcore_retry_policy
            for attempt in range(policy.retries + 1):
                try:
                    return await inner(self, method, path, *args, **kwargs)
                except Exception as exc:
                    retriable = is_retriable(exc) or isinstance(exc, (asyncio.TimeoutError, ConnectionError))
                    if not retriable:
                        raise
                    if attempt == policy.retries:
                        raise GaveUp(
                            f"{method} request failed after {policy.retries} retries: {type(exc).__name__}: {exc}"
                        ) from exc
                    log.debug("retrying %s after %s", method, exc)
                    await asyncio.sleep(policy.delay(attempt))
            raise AssertionError("unreachable")

    _cls = RetryingGCSFileSystem
    return _cls
