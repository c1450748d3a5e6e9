"""Removing what interrupted saves left behind."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ckptcore import storage


def clean(directory: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Remove leftovers of interrupted saves inside ``directory``; return their URLs.

    Committed checkpoints are never touched. Do not run it while a save into
    ``directory`` is in progress: its staging data would be removed too.
    """
    parent = storage.resolve(directory, storage_options)
    strategy = storage.atomicity(parent)
    removed = []
    try:
        entries = parent.fs.ls(parent.path, detail=False)
    except FileNotFoundError:
        return []
    for entry in entries:
        child = parent.child(str(entry).rstrip("/").rpartition("/")[2])
        if strategy.is_staging(child):
            strategy.abort(child)
            removed.append(child.url)
    return removed
