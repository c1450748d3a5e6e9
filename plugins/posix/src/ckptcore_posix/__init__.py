"""ckptcore plugin for local disk: plain paths and ``file://`` URLs.

Atomicity by rename: a save writes into a temporary sibling directory, fsyncs every file
and directory in it, renames it into place and fsyncs the parent. A directory under its
final name is therefore always complete; names with ``.ckptcore-tmp-`` (or orbax's
``.orbax-checkpoint-tmp-``) or ``.ckptcore-deleting-`` are leftovers of interrupted work.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid
from collections.abc import Mapping
from typing import Any

from ckptcore.errors import AlreadyExistsError, StorageError
from ckptcore.hookspecs import hookimpl
from ckptcore.registrations import AtomicityRegistration, Location, StorageRegistration

STAGING = re.compile(r".+\.(ckptcore-tmp|ckptcore-deleting|ckptcore-old|orbax-checkpoint-tmp)-[^/]*$")


class LocalBackend:
    """Local paths; the kvstore is TensorStore's ``file`` driver."""

    def resolve(self, url: str, options: Mapping[str, Any]) -> Location:
        from fsspec.implementations.local import LocalFileSystem

        path = url[len("file://") :] if url.startswith("file://") else url
        path = os.path.abspath(os.path.expanduser(path))
        return Location(
            url=path, scheme="file", fs=LocalFileSystem(), path=path,
            kvstore={"driver": "file", "path": path.rstrip("/") + "/"}, options=dict(options),
        )


def _fsync_path(path: str, directory: bool) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file, then every directory (deepest first), under ``root``."""
    dirs = []
    for here, _, files in os.walk(root):
        dirs.append(here)
        for name in files:
            _fsync_path(os.path.join(here, name), directory=False)
    for here in reversed(dirs):
        _fsync_path(here, directory=True)


class RenameCommit:
    """Write into a temporary sibling, fsync, rename into place."""

    def begin(self, final: Location) -> Location:
        tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging = final.parent().child(f"{final.name}.ckptcore-tmp-{tag}")
        try:
            os.makedirs(staging.path)
        except OSError as exc:
            raise StorageError(f"cannot create {staging.path} to save {final.url}: {exc}") from exc
        return staging

    def commit(self, staging: Location, final: Location, *, replace: bool) -> None:
        fsync_tree(staging.path)
        old = None
        if replace and os.path.lexists(final.path):
            old = f"{final.path}.ckptcore-old-{uuid.uuid4().hex[:8]}"
            os.rename(final.path, old)
        try:
            os.rename(staging.path, final.path)
        except OSError as exc:
            if old is not None:
                os.rename(old, final.path)
            if os.path.lexists(final.path):
                raise AlreadyExistsError(
                    f"{final.url} appeared while saving (another process saved there); nothing was overwritten"
                ) from exc
            raise
        _fsync_path(os.path.dirname(final.path) or "/", directory=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self, staging: Location) -> None:
        shutil.rmtree(staging.path, ignore_errors=True)

    def is_committed(self, location: Location) -> bool:
        return os.path.isdir(location.path) and not STAGING.fullmatch(location.path)

    def is_staging(self, location: Location) -> bool:
        return bool(STAGING.fullmatch(location.path)) and os.path.isdir(location.path)

    def delete(self, location: Location) -> None:
        # Renamed away first: an interrupted delete leaves a recognisable leftover, never
        # a half-deleted checkpoint under its committed name.
        doomed = f"{location.path}.ckptcore-deleting-{uuid.uuid4().hex[:8]}"
        os.rename(location.path, doomed)
        _fsync_path(os.path.dirname(location.path) or "/", directory=True)
        shutil.rmtree(doomed, ignore_errors=True)


@hookimpl
def ckptcore_storage_backends() -> list[StorageRegistration]:
    return [StorageRegistration(schemes=("file",), backend=LocalBackend())]


@hookimpl
def ckptcore_atomicity_strategies() -> list[AtomicityRegistration]:
    return [AtomicityRegistration(schemes=("file",), strategy=RenameCommit(), name="rename")]
