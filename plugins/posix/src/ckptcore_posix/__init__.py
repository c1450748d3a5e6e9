"""ckptcore plugin for local disk: plain paths and ``file://`` URLs.

Atomicity by rename: a save writes into a temporary sibling directory, fsyncs every file
and directory in it, renames it into place and fsyncs the parent. A directory under its
final name is therefore always complete; names with ``.ckptcore-tmp-`` (or orbax's
``.orbax-checkpoint-tmp-``) or ``.ckptcore-deleting-`` are leftovers of interrupted work.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import uuid
from collections.abc import Mapping
from typing import Any

from ckptcore.errors import AlreadyExistsError, StorageError
from ckptcore.plugins.address import StorageAddress
from ckptcore.plugins.hookspecs import hookimpl
from ckptcore.plugins.registrations import AtomicityRegistration, Location, StorageRegistration

STAGING = re.compile(r".+\.(ckptcore-tmp|ckptcore-deleting|ckptcore-old|orbax-checkpoint-tmp)-[^/]*$")
_OLD = re.compile(r"(.+)\.ckptcore-old-[^/]*$")

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_renameat2: Any = None


def _rename(src: str, dst: str, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the kernel, libc or filesystem lacks it.

    Raises FileExistsError when ``RENAME_NOREPLACE`` finds ``dst`` present.
    """
    global _renameat2
    if _renameat2 is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            _renameat2 = libc.renameat2
            _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        except (OSError, AttributeError):
            _renameat2 = False
    if not _renameat2:
        return False
    import ctypes

    at_fdcwd = -100
    if _renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST or (err == errno.ENOTEMPTY and flags == _RENAME_NOREPLACE):
        raise FileExistsError(err, os.strerror(err), dst)
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), src)


class LocalBackend:
    """Local paths: fsspec's local filesystem, and a ``file`` address for the array formats."""

    def resolve(self, url: str, options: Mapping[str, Any]) -> Location:
        from fsspec.implementations.local import LocalFileSystem

        path = url[len("file://") :] if url.startswith("file://") else url
        path = os.path.abspath(os.path.expanduser(path))
        return Location(
            url=path, scheme="file", fs=LocalFileSystem(), path=path,
            address=StorageAddress(scheme="file", path=path.rstrip("/") + "/"), options=dict(options),
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
        parent = os.path.dirname(final.path) or "/"
        if replace and os.path.lexists(final.path):
            # Swap in one step where the kernel can (Linux renameat2): the final name always
            # holds a complete checkpoint, the old one or the new one.
            if _rename(staging.path, final.path, _RENAME_EXCHANGE):
                _fsync_path(parent, directory=True)
                shutil.rmtree(staging.path, ignore_errors=True)  # now holds the old checkpoint
                return
            # Two renames: a kill in between leaves the old one under ``.ckptcore-old-``,
            # which ``abort`` (and so ``ckptcore.clean``) moves back instead of deleting.
            old = f"{final.path}.ckptcore-old-{uuid.uuid4().hex[:8]}"
            os.rename(final.path, old)
            try:
                os.rename(staging.path, final.path)
            except OSError:
                os.rename(old, final.path)
                raise
            _fsync_path(parent, directory=True)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            # Never rename over a directory that appeared meanwhile (rename(2) replaces empty ones).
            if not _rename(staging.path, final.path, _RENAME_NOREPLACE):
                if os.path.lexists(final.path):
                    raise FileExistsError(final.path)
                os.rename(staging.path, final.path)
        except FileExistsError as exc:
            raise AlreadyExistsError(
                f"{final.url} appeared while saving (another process saved there); nothing was overwritten"
            ) from exc
        _fsync_path(parent, directory=True)

    def abort(self, staging: Location) -> None:
        match = _OLD.fullmatch(staging.path)
        if match and not os.path.lexists(match.group(1)):
            # The previous checkpoint, moved aside by a replacing save killed before its
            # second rename: put it back rather than delete the only copy.
            os.rename(staging.path, match.group(1))
            return
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
