"""Turning user paths and URLs into locations, through the storage and atomicity plugins."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ckptcore.errors import PluginError, StorageError
from ckptcore.plugins.address import StorageAddress
from ckptcore.plugins.manager import registry
from ckptcore.plugins.registrations import AtomicCommit, Location


def split_scheme(url: str) -> str:
    """The URL scheme of ``url``; plain paths are ``file``."""
    if "://" in url:
        return url.split("://", 1)[0].lower()
    return "file"


def resolve(url: str | os.PathLike[str], options: Mapping[str, Any] | None = None) -> Location:
    """The location of a path or URL, from the storage plugin of its scheme."""
    text = os.fspath(url)
    if "://" not in text:
        text = os.path.abspath(os.path.expanduser(text))
    text = text.rstrip("/") or "/"
    reg = registry().storage(split_scheme(text))
    location = reg.backend.resolve(text, dict(options or {}))
    if not isinstance(location, Location) or not isinstance(location.address, StorageAddress):
        got = f"a Location whose address is {type(location.address).__name__}" if isinstance(location, Location) else (
            type(location).__name__
        )
        raise PluginError(
            f"the storage backend of {reg.distribution} {reg.version} for {split_scheme(text)}:// returned {got} "
            "from resolve(), where a Location with a StorageAddress belongs; update or block it (CKPTCORE_BLOCK_PLUGINS)"
        )
    return location


def atomicity(location: Location) -> AtomicCommit:
    """The atomic-commit strategy that serves ``location``'s scheme."""
    return registry().atomicity(location.scheme).strategy


def read_file(location: Location, name: str) -> bytes | None:
    """The bytes of the small file ``name`` in ``location``; ``None`` when it does not exist.

    :raises StorageError: the storage failed (naming the file).
    """
    try:
        return location.fs.cat_file(f"{location.path.rstrip('/')}/{name}")  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"could not read {location.url}/{name}: {exc}") from exc
