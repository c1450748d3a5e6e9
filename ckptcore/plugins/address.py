"""Where the bulk data of a checkpoint lives, described without naming any array library.

A storage plugin resolves a URL to a :class:`~ckptcore.plugins.registrations.Location`
whose ``address`` is a :class:`StorageAddress`: the store (``scheme``), the bucket, the key
prefix, the endpoint, the region, the credentials and the retry bounds. Each array format
turns it into what its own library needs: the zarr3 plugin builds a TensorStore kvstore
spec from it, a format that reads byte ranges can open the same objects through its own
client. Storage plugins therefore work with every array format, and formats with every
storage plugin whose ``scheme`` they know.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptcore.errors import StorageError

RETRY_OPTION_KEYS = ("retries", "retry_delay", "retry_max_delay", "timeout")
"""The ``storage_options`` that :meth:`RetryPolicy.from_options` reads."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a failing request is retried (from ``storage_options``).

    ``retries``: retries of one failed request (503, 429, dropped connection...).
    ``retry_delay`` / ``retry_max_delay``: the exponential backoff between them, in seconds.
    ``timeout``: the most seconds one request may take (connect + transfer of one part).

    With the defaults a request that keeps failing gives up after about
    ``retry_delay * (2**retries - 1)`` seconds capped per wait at ``retry_max_delay``
    (about 12 s), so a save against a dead store fails within tens of seconds.
    """

    retries: int = 6
    retry_delay: float = 0.25
    retry_max_delay: float = 4.0
    timeout: float = 120.0

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> RetryPolicy:
        try:
            policy = cls(
                retries=int(options.get("retries", cls.retries)),
                retry_delay=float(options.get("retry_delay", cls.retry_delay)),
                retry_max_delay=float(options.get("retry_max_delay", cls.retry_max_delay)),
                timeout=float(options.get("timeout", cls.timeout)),
            )
        except (TypeError, ValueError) as exc:
            raise StorageError(f"invalid retry storage_options {dict(options)!r}: {exc}") from exc
        if policy.retries < 0 or policy.retry_delay < 0 or policy.retry_max_delay < 0 or policy.timeout <= 0:
            raise StorageError(
                "storage_options retries, retry_delay and retry_max_delay must be >= 0 and timeout > 0, "
                f"got {policy}"
            )
        return policy

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        return min(self.retry_delay * (2**attempt), self.retry_max_delay)

    def worst_case_seconds(self) -> float:
        """The longest one request keeps retrying, waits only (each try adds up to ``timeout``)."""
        return sum(self.delay(i) for i in range(self.retries))


@dataclass(frozen=True)
class StorageAddress:
    """Where the bytes of one directory live, for array formats to open with their own library.

    ``scheme``: the kind of store, by its fsspec protocol name: ``"file"`` (a local
    directory), ``"gs"`` (Google Cloud Storage), ``"s3"`` (S3 and S3-compatible stores), or
    another name a format may know. It is the store's kind, not the URL's scheme: a
    third-party ``dirfs://`` backend that keeps its data in local directories says ``"file"``.

    ``path``: the directory, ending with ``/``. Inside a bucket it is the key prefix
    (``"run/7/"``; ``""`` for the bucket's root); on local disk the absolute path.

    ``bucket``: the bucket (``""`` for local storage).

    ``endpoint``: the service URL when it is not the store's public one (an emulator,
    MinIO, a proxy), as ``http(s)://host:port``; ``None`` for the public service.

    ``region``: the store's region, where it has regions.

    ``credentials``: how to authenticate, in ``storage_options`` words: ``{}`` for the
    environment's default chain, ``{"anon": True}``, ``{"profile": NAME}``, or explicit
    ``{"key": ..., "secret": ..., "token": ...}``. Left out of ``repr()``.

    ``retry``: the bounds on retrying a failing request.

    ``request_concurrency``: the most requests in flight at once, when the user set one.

    ``options``: anything else specific to the store (e.g. ``{"user_project": ...}`` for
    requester-pays GCS buckets).
    """

    scheme: str
    path: str
    bucket: str = ""
    endpoint: str | None = None
    region: str | None = None
    credentials: Mapping[str, Any] = field(default_factory=dict, repr=False)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    request_concurrency: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.scheme or not isinstance(self.scheme, str):
            raise ValueError(f"StorageAddress.scheme must be a non-empty string, got {self.scheme!r}")
        if self.path and not self.path.endswith("/"):
            object.__setattr__(self, "path", self.path + "/")

    def child(self, name: str) -> StorageAddress:
        """The address of ``name`` inside this directory."""
        return dataclasses.replace(self, path=f"{self.path}{name.strip('/')}/")

    def parent(self) -> StorageAddress:
        """The address of the directory that holds this one."""
        base = self.path.rstrip("/")
        if "/" not in base:
            return dataclasses.replace(self, path="/" if self.path.startswith("/") else "")
        return dataclasses.replace(self, path=base.rpartition("/")[0] + "/")
