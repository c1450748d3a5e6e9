"""Listing a manager's steps on storage: which directory names are committed steps.

Shared by the manager and the evaluators (``checkpoints_iterator``), which read a run's
directory without opening a manager.
"""

from __future__ import annotations

from typing import Any

from ckptcore.errors import StorageError
from ckptcore.manager.foreign import is_committed_foreign_step
from ckptcore.plugins.manager import registry
from ckptcore.plugins.registrations import AtomicCommit, Location


def list_names(root: Location) -> list[str]:
    """The entry names directly inside ``root`` (fresh: fsspec listing caches are dropped)."""
    root.fs.invalidate_cache(root.path)
    try:
        entries = root.fs.ls(root.path, detail=False)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"could not list {root.url}: {exc}") from exc
    return [str(e).rstrip("/").rpartition("/")[2] for e in entries]


def committed_steps(
    root: Location, strategy: AtomicCommit, prefixes: tuple[str | None, ...], names: list[str] | None = None
) -> dict[int, str]:
    """step -> directory name, for every committed step, read through every registered layout."""
    layouts = [reg.layout for reg in registry().step_layouts()]
    found: dict[int, str] = {}
    for name in list_names(root) if names is None else names:
        if name.startswith("."):
            continue
        step = _parse(name, prefixes, layouts)
        if step is None or (step in found and len(found[step]) <= len(name)):
            continue
        location = root.child(name)
        # Another system's step (e.g. orbax's, on object stores without ckptcore's commit marker)
        # counts when its own layout says it was committed.
        if strategy.is_committed(location) or is_committed_foreign_step(location):
            found[step] = name
    return dict(sorted(found.items()))


def _parse(name: str, prefixes: tuple[str | None, ...], layouts: list[Any]) -> int | None:
    for prefix in prefixes:
        for layout in layouts:
            step = layout.parse_step(name, prefix)
            if step is not None:
                return step
    return None
