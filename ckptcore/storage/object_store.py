"""Shared pieces of the object-store plugins (gs://, s3://, any fsspec store without rename).

* :class:`CommitMarker`: the atomic-commit strategy for stores that have no rename. Data is
  written in place; a small commit marker is written last, once every data object has
  been uploaded (an object store makes an object durable when its upload completes). A
  directory without the marker is not a checkpoint.
* :class:`RetryPolicy` (defined with the storage address in :mod:`ckptcore.plugins.address`):
  the ``storage_options`` that bound retries, so a store that keeps failing fails a save
  within a known time instead of retrying for minutes.
* :func:`cached_filesystem`: one fsspec filesystem per (scheme, options) in a process.
* :func:`storage_error`: turn a client library's exception into a :class:`StorageError`
  that says what failed, where, and what to do.

Plugins register ``CommitMarker()`` for their schemes; nothing here names a cloud.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from ckptcore.errors import AlreadyExistsError, CheckpointError, StorageError
from ckptcore.plugins.address import RETRY_OPTION_KEYS, RetryPolicy
from ckptcore.plugins.registrations import Location

__all__ = [
    "COMMIT_MARKER", "PENDING_MARKER", "RETRY_OPTION_KEYS", "CommitMarker", "RetryPolicy", "cached_filesystem",
    "clear_filesystem_cache", "options_key", "parse_bucket_url", "storage_error",
]

COMMIT_MARKER = "ckptcore_commit.json"
"""Written last: its presence is what makes a directory a committed checkpoint."""

PENDING_MARKER = "ckptcore_pending.json"
"""Written first by a save (and by a delete): marks the directory as work in progress, so
``ckptcore clean`` recognises leftovers without touching unrelated directories."""

_TOKEN_OPTION = "_ckptcore_commit_token"

T = TypeVar("T")


# -- filesystem cache ----------------------------------------------------------------

_fs_cache: dict[str, Any] = {}
_fs_lock = threading.Lock()


def parse_bucket_url(url: str, options: Mapping[str, Any], known_options: Sequence[str], plugin: str) -> tuple[str, str]:
    """The bucket and key of ``scheme://BUCKET/key``, after checking ``options`` are ones the plugin knows.

    Keys starting with ``_ckptcore`` are the core's own and always allowed.
    """
    scheme, _, rest = url.partition("://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{url} names no bucket: use {scheme}://BUCKET/path/to/checkpoint")
    unknown = sorted(k for k in options if k not in known_options and not k.startswith("_ckptcore"))
    if unknown:
        raise StorageError(
            f"unknown storage_options {unknown} for {url}; the {plugin} plugin accepts {', '.join(known_options)}"
        )
    return bucket, key.strip("/")


def options_key(scheme: str, options: Mapping[str, Any]) -> str:
    """A stable cache key for (scheme, options); unhashable values are compared by their JSON."""
    return scheme + "|" + json.dumps(dict(options), sort_keys=True, default=repr)


def cached_filesystem(
    scheme: str, options: Mapping[str, Any], factory: Callable[[], T], env: tuple[str, ...] = ()
) -> T:
    """The filesystem for (scheme, options), created once per process by ``factory``.

    ``env`` names the environment variables the client reads its credentials from: a
    filesystem made before they changed is not reused after (their values are hashed).
    """
    seen = hashlib.sha256(json.dumps([os.environ.get(v) for v in env]).encode()).hexdigest()
    key = options_key(scheme, {**options, "_environment": seen})
    with _fs_lock:
        fs = _fs_cache.get(key)
        if fs is None:
            fs = _fs_cache[key] = factory()
        return fs  # type: ignore[no-any-return]


def clear_filesystem_cache() -> None:
    """Forget cached filesystems (after changing credentials or endpoints in the environment)."""
    with _fs_lock:
        _fs_cache.clear()


# -- errors --------------------------------------------------------------------------

_CREDENTIAL_ERRORS = (
    "NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "RefreshError",
    "TransportError", "ProfileNotFound", "InvalidConfigError",
)


def storage_error(exc: BaseException, url: str, action: str, *, credentials_hint: str = "") -> CheckpointError:
    """A :class:`StorageError` for ``exc`` raised while ``action`` on ``url``, with what to do."""
    if isinstance(exc, CheckpointError):
        return exc
    names = {t.__name__ for t in type(exc).__mro__}
    text = f"{type(exc).__name__}: {exc}".strip()
    lowered = text.lower()
    bucket = _bucket_of(url)
    if names & set(_CREDENTIAL_ERRORS) or "credential" in lowered or ("could not find" in lowered and "token" in lowered):
        hint = credentials_hint or "configure credentials for this store or pass them in storage_options"
        message = f"{action} {url} failed: no usable credentials ({text}). {hint}"
    elif isinstance(exc, PermissionError) or "forbidden" in lowered or "accessdenied" in lowered or "403" in lowered:
        message = (
            f"{action} {url} failed: access denied ({text}). Check that your credentials may read and write "
            f"bucket {bucket!r}."
        )
    elif "nosuchbucket" in lowered or ("bucket" in lowered and ("not found" in lowered or "does not exist" in lowered)):
        message = f"{action} {url} failed: bucket {bucket!r} does not exist ({text}). Create it or fix the URL."
    elif isinstance(exc, FileNotFoundError):
        message = (
            f"{action} {url} failed: not found ({text}). Check that bucket {bucket!r} exists and the path is right."
        )
    elif isinstance(exc, TimeoutError) or "timeout" in lowered or "timed out" in lowered:
        message = (
            f"{action} {url} failed: the store did not answer in time ({text}). Retry later, or raise "
            "storage_options 'timeout'/'retries'."
        )
    else:
        message = (
            f"{action} {url} failed: {text}. If the store is temporarily unavailable, retry later or raise "
            "storage_options 'retries'."
        )
    err = StorageError(message)
    err.__cause__ = exc
    return err


def _bucket_of(url: str) -> str:
    rest = url.split("://", 1)[1] if "://" in url else url
    return rest.split("/", 1)[0]


# -- commit-marker atomicity ---------------------------------------------------------


class CommitMarker:
    """Atomic commit for object stores: data in place, a commit marker written last.

    * ``begin``: writes a pending marker (a save in progress), then removes whatever an
      earlier save left in the directory, so no stale object mixes with the new ones.
      With ``force`` the old checkpoint is first made invisible (its marker removed):
      **replacing a checkpoint on an object store is not atomic** — between ``begin`` and
      ``commit`` no checkpoint exists at the path, and if the save fails the old one is
      gone. Save to a new path (as a manager does for each step) to keep the old one.
    * ``commit``: called after every data object and index is uploaded (an upload is
      durable once it completes); checks that no other save took the directory over,
      writes the commit marker, then removes the pending marker.
    * ``delete``: pending marker, then the commit marker goes (the checkpoint becomes
      invisible at once), then the data, the pending marker last. An interrupted delete
      leaves an uncommitted leftover that ``ckptcore clean`` removes, never a
      half-deleted checkpoint that looks committed.
    """

    def __init__(self, credentials_hint: str = "") -> None:
        self.credentials_hint = credentials_hint

    # paths

    @staticmethod
    def _file(location: Location, name: str) -> str:
        return f"{location.path.rstrip('/')}/{name}"

    def _error(self, exc: BaseException, location: Location, action: str) -> CheckpointError:
        return storage_error(exc, location.url, action, credentials_hint=self.credentials_hint)

    def _exists(self, location: Location, name: str, action: str) -> bool:
        try:
            location.fs.info(self._file(location, name))
        except FileNotFoundError:
            return False
        except Exception as exc:
            # fsspec's exists() would say False on a denied or failed request: a committed
            # checkpoint would look missing. Say what failed instead.
            raise self._error(exc, location, action) from exc
        return True

    def _files(self, location: Location) -> list[str]:
        try:
            return [str(p) for p in location.fs.find(location.path)]
        except FileNotFoundError:
            return []

    def _remove(self, location: Location, files: list[str]) -> None:
        if files:
            location.fs.rm(files)

    def _remove_file(self, location: Location, name: str) -> None:
        try:
            location.fs.rm_file(self._file(location, name))
        except FileNotFoundError:  # already gone (e.g. an interrupted delete, retried)
            pass

    def _marker_body(self, token: str, what: str) -> bytes:
        return json.dumps({
            "format": "ckptcore-" + what, "token": token, "host": socket.gethostname(), "pid": os.getpid(),
            "time": datetime.datetime.now(datetime.UTC).isoformat(),
        }).encode()

    # AtomicCommit

    def begin(self, final: Location) -> Location:
        token = uuid.uuid4().hex
        pending = self._file(final, PENDING_MARKER)
        try:
            committed = self._exists(final, COMMIT_MARKER, "preparing to save")
            if committed:
                # Only reached with force=True (the caller checked): invisible first.
                self._remove_file(final, COMMIT_MARKER)
            final.fs.pipe_file(pending, self._marker_body(token, "pending"))
            self._remove(final, [f for f in self._files(final) if f.rstrip("/") != pending])
        except CheckpointError:
            raise
        except Exception as exc:
            raise self._error(exc, final, "preparing to save") from exc
        return replace(final, options={**final.options, _TOKEN_OPTION: token})

    def commit(self, staging: Location, final: Location, *, replace: bool) -> None:
        token = staging.options.get(_TOKEN_OPTION)
        pending = self._file(final, PENDING_MARKER)
        try:
            current = json.loads(final.fs.cat_file(pending)) if token else {}
        except FileNotFoundError:
            current = {}
        except Exception as exc:
            raise self._error(exc, final, "committing") from exc
        if token and current.get("token") != token:
            raise AlreadyExistsError(
                f"another save into {final.url} started while this one ran (host {current.get('host')}, "
                f"pid {current.get('pid')}); this save was not committed. Save each checkpoint from one process."
            )
        try:
            final.fs.pipe_file(self._file(final, COMMIT_MARKER), self._marker_body(str(token or ""), "commit"))
        except Exception as exc:
            raise self._error(exc, final, "committing") from exc
        try:
            self._remove_file(final, PENDING_MARKER)
        except Exception:  # the checkpoint is committed; a stale pending marker is harmless
            pass

    def abort(self, staging: Location) -> None:
        if self._exists(staging, COMMIT_MARKER, "cleaning up"):
            return  # never touch committed data
        pending = self._file(staging, PENDING_MARKER)
        files = self._files(staging)
        self._remove(staging, [f for f in files if f.rstrip("/") != pending])
        if any(f.rstrip("/") == pending for f in files):
            self._remove_file(staging, PENDING_MARKER)

    def is_committed(self, location: Location) -> bool:
        return self._exists(location, COMMIT_MARKER, "checking")

    def is_staging(self, location: Location) -> bool:
        if self._exists(location, COMMIT_MARKER, "checking"):
            return False
        return self._exists(location, PENDING_MARKER, "checking")

    def delete(self, location: Location) -> None:
        pending = self._file(location, PENDING_MARKER)
        try:
            location.fs.pipe_file(pending, self._marker_body(uuid.uuid4().hex, "deleting"))
            self._remove_file(location, COMMIT_MARKER)
            self._remove(location, [f for f in self._files(location) if f.rstrip("/") != pending])
            self._remove_file(location, PENDING_MARKER)
        except Exception as exc:
            raise self._error(exc, location, "deleting") from exc
