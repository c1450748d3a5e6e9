"""The public functions on one checkpoint: save, restore, metadata, info.

Each resolves its arguments (paths, progress bars) and runs the one walk in
:mod:`ckptcore.io` that serves a single process and a ``jax.distributed`` job alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypedDict, Unpack

import numpy as np

from ckptcore import progress as progress_lib
from ckptcore.io import gcpause
from ckptcore.io.metadata import ArrayMetadata, CheckpointInfo, metadata_tree
from ckptcore.io.plans import is_jax_value
from ckptcore.io.restore import open_checkpoint, open_committed, restore_location
from ckptcore.io.save import resolve, snapshot, write
from ckptcore.io.transforms import RestoreReport, Transforms, last_restore_report
from ckptcore.parallel.current import current_coordinator
from ckptcore.plugins.registrations import ProgressCallback
from ckptcore.tree.keys import format_key_path
from ckptcore.tree.nodes import iter_leaves

__all__ = [
    "ArrayMetadata", "CheckpointInfo", "RestoreReport", "SaveOptions", "Transforms", "abstract", "info",
    "last_restore_report", "metadata", "restore", "save",
]


class SaveOptions(TypedDict, total=False):
    """The options of every save (:func:`save`, ``Checkpointer.save``, ``AsyncCheckpointer.save``).

    :param force: replace an existing checkpoint (the old one stays until the new one commits).
    :param format: the array format (default: the plugins' default, ``ocdbt``).
    :param format_options: options of the array format (e.g. ``{"chunk_bytes": ...}``).
    :param metadata: JSON-able data stored in the index, returned by :func:`ckptcore.info`.
    :param storage_options: per-call options for the storage plugin (endpoint, credentials...).
    """

    force: bool
    format: str | None
    format_options: Mapping[str, Any] | None
    metadata: Mapping[str, Any] | None
    storage_options: Mapping[str, Any] | None


def save(
    path: str | os.PathLike[str], state: Any, *, progress: ProgressCallback | bool | None = None,
    **options: Unpack[SaveOptions],
) -> None:
    """Save the pytree ``state`` to ``path`` atomically.

    :param path: a local path, ``file://``, or a URL of an installed storage plugin.
    :param progress: ``True`` for a progress bar, or a callable(bytes written, bytes total).
    :param options: ``force``, ``format``, ``format_options``, ``metadata``, ``storage_options``
        (see :class:`SaveOptions`).
    :raises AlreadyExistsError: a checkpoint exists at ``path`` and ``force`` is false.
    :raises UnsupportedLeafError: a leaf cannot be saved (raised before anything is written).
    """
    with gcpause.paused(), progress_lib.resolve(progress, f"saving {path}") as callback:
        # gcpause: a blocking call whose many short-lived objects need no collection
        coordinator = current_coordinator()
        operation = coordinator.operation("save", "a collective save")  # every process in the same order
        prepared = snapshot(state, operation)
        location = resolve(path, options.get("storage_options"), operation)
        write(prepared, location, operation=operation, coordinator=coordinator, progress=callback, **write_options(options))


def write_options(options: SaveOptions) -> dict[str, Any]:
    """The options :func:`ckptcore.io.save.write` takes, from a save's options (unknown names refused)."""
    unknown = set(options) - set(SaveOptions.__annotations__)
    if unknown:
        raise TypeError(f"save() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    return {k: v for k, v in options.items() if k != "storage_options"}


def metadata(path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> Any:
    """The saved tree with array leaves replaced by :class:`ArrayMetadata`; no array data is read.

    Scalars and strings, which are stored in the index itself, are returned as values.
    """
    _, doc = open_committed(path, storage_options)
    return metadata_tree(doc)


def info(path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> CheckpointInfo:
    """Everything the index of the checkpoint at ``path`` says; no array data is read."""
    opened = open_checkpoint(path, storage_options)
    location, doc = opened.location, opened.doc
    return CheckpointInfo(
        url=location.url, tree=metadata_tree(doc), created=doc.get("created", ""),
        total_bytes=int(doc.get("total_bytes", 0)), format_version=int(doc.get("format_version", 0)),
        ckptcore_version=doc.get("ckptcore_version", ""), array_formats=doc.get("array_formats", {}),
        metadata=doc.get("metadata", {}), plugin_metadata=doc.get("plugin_metadata", {}),
        leaves=[(format_key_path(p), r) for p, r in iter_leaves(doc["tree"])],
        stored_tree=doc["tree"], layout=opened.layout, layout_description=opened.description,
    )


def restore(
    path: str | os.PathLike[str],
    target: Any = None,
    *,
    partial: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    max_bytes_in_flight: int | None = None,
    progress: ProgressCallback | bool | None = None,
    transforms: Transforms | None = None,
    report: bool = False,
) -> Any:
    """Restore the checkpoint at ``path``.

    :param target: ``None`` for the saved tree as saved; otherwise a tree whose leaves
        say what to restore: NumPy arrays or objects with ``.shape``/``.dtype`` (shape is
        checked, dtype is cast to), ``jax.ShapeDtypeStruct`` or ``jax.Array`` (restored
        onto their sharding), or ``None`` to skip a leaf or subtree. Containers are
        rebuilt with the target's types.
    :param partial: the target may name a subset of the checkpoint; only those leaves are read.
    :param max_bytes_in_flight: the most array bytes read at once (bounds memory beyond the result).
    :param progress: ``True`` for a progress bar, or a callable(bytes read, bytes total).
    :param transforms: a :class:`ckptcore.Transforms` mapping the checkpoint onto a target that
        differs from it (renamed keys, computed leaves, leaves kept from the target).
    :param report: return ``(tree, RestoreReport)``; the report of the last restore in this
        thread is also :func:`ckptcore.last_restore_report`.
    :raises TargetMismatchError: listing every missing key, extra key and shape mismatch.
    :raises TransformError: a transform raised or is invalid (naming the key path).
    """
    with gcpause.paused(), progress_lib.resolve(progress, f"restoring {path}") as callback:
        # gcpause: a blocking call whose many short-lived objects need no collection
        opened = open_checkpoint(path, storage_options)
        tree = restore_location(
            opened.location, opened.doc, target, partial=partial, max_bytes_in_flight=max_bytes_in_flight,
            progress=callback, coordinator=current_coordinator(), formats=opened.formats, transforms=transforms,
        )
    return (tree, last_restore_report()) if report else tree


def abstract(leaf: Any) -> Any:
    """What a restore target needs of ``leaf``, without its data: ``jax.tree.map(ckptcore.abstract, state)``.

    A ``jax.Array`` becomes a ``jax.ShapeDtypeStruct`` with its sharding (restored onto the
    same devices); a NumPy array an :class:`ArrayMetadata` (restored as a NumPy array of its
    shape and dtype); anything else (scalars, strings, ``None``) is returned as it is.
    """
    if is_jax_value(leaf):
        import jax

        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None))
    if isinstance(leaf, np.ndarray):
        return ArrayMetadata(shape=tuple(leaf.shape), dtype=leaf.dtype, nbytes=int(leaf.nbytes), format="")
    return leaf
