"""The hooks through which plugins extend ckptcore.

A plugin is a module (or object) with functions named like the hooks below, decorated
with :data:`ckptcore.hookimpl`, and declared in the ``ckptcore`` entry-point group of its
distribution::

    [project.entry-points.ckptcore]
    myplugin = "my_package.ckptcore_plugin"

Registration hooks are called once per plugin, when the core first needs them, and return
registrations (frozen dataclasses from :mod:`ckptcore.plugins.registrations`). The core
checks each one (its type, and its worker object against its protocol), fills in the
providing distribution, selects among them, and reports conflicts by distribution. An
exception raised in any hook becomes a :class:`~ckptcore.errors.PluginError` naming the
plugin, its distribution and the hook. A ``@hookimpl`` whose name is not one of the hooks
below (a misspelling) is reported when the plugin is loaded, and the plugin is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pluggy

from ckptcore.plugins.registrations import (
    ArrayFormatRegistration,
    AtomicityRegistration,
    CheckpointExporterRegistration,
    CheckpointLayoutRegistration,
    SaveContext,
    StepLayoutRegistration,
    StorageRegistration,
)

PROJECT = "ckptcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- storage and atomicity -----------------------------------------------------------------


@hookspec
def ckptcore_storage_backends() -> Sequence[StorageRegistration]:
    """Storage: name the URL schemes this plugin serves and how to reach them.

    Called once per process, the first time a path or URL is resolved. Local paths
    without a scheme resolve through the ``"file"`` scheme.

    :return: registrations whose ``backend.resolve(url, options)`` returns a
        :class:`~ckptcore.plugins.registrations.Location`: an fsspec filesystem (listing,
        small files, deletes), the path it understands, and the ``address`` of the bulk
        array data, a :class:`~ckptcore.plugins.address.StorageAddress`. The address is
        format-neutral: the kind of store (``scheme``, e.g. ``"file"``, ``"gs"``, ``"s3"``),
        bucket, key prefix, endpoint, region, credentials and retry bounds; each array
        format turns it into its own library's address (the zarr3 plugin into a
        TensorStore kvstore spec). Resolve every setting there (an endpoint from the
        environment too): array libraries may not read the variables your client reads.
        ``options`` are the caller's ``storage_options`` (endpoint, region,
        credentials...); reject the ones you do not know.

    Two distributions registering the same scheme is a conflict, reported when the scheme
    is used.

    Example::

        @hookimpl
        def ckptcore_storage_backends():
            return [StorageRegistration(schemes=("memory",), backend=MemoryBackend())]

    where ``MemoryBackend.resolve`` returns
    ``Location(url, "memory", fs, path, address=StorageAddress(scheme="memory", path=path + "/"))``.
    """


@hookspec
def ckptcore_atomicity_strategies() -> Sequence[AtomicityRegistration]:
    """Atomicity: how a checkpoint on these schemes becomes visible all at once.

    Called once per process, the first time a checkpoint is saved, restored or listed.
    The strategy's ``begin`` returns where data is written (a temporary sibling on
    POSIX, the final place on object stores); ``commit`` makes it durable and visible
    (rename, or a commit marker written last); ``is_committed`` and ``is_staging`` tell
    committed checkpoints from leftovers; ``delete`` removes a checkpoint so that an
    interruption never leaves it looking committed.

    :return: registrations naming the schemes and carrying the strategy object.

    Example::

        @hookimpl
        def ckptcore_atomicity_strategies():
            return [AtomicityRegistration(schemes=("memory",), strategy=MarkerCommit(), name="marker")]
    """


# -- path naming ---------------------------------------------------------------------------


@hookspec
def ckptcore_step_layouts() -> Sequence[StepLayoutRegistration]:
    """Path naming: how step numbers map to directory names in a manager's root.

    Called once per process, when a :class:`~ckptcore.CheckpointManager` first lists or
    names steps. The layout named by the manager's options writes new steps; every
    registered layout is tried when reading, so checkpoints in other layouts (e.g.
    orbax-checkpoint's bare step numbers) are found too.

    :return: registrations with a unique ``name`` and a layout object offering
        ``step_name(step, prefix, fixed_length)`` and ``parse_step(name, prefix)``.

    Example::

        @hookimpl
        def ckptcore_step_layouts():
            return [StepLayoutRegistration(name="dated", layout=DatedLayout())]
    """


# -- array serialization -------------------------------------------------------------------


@hookspec
def ckptcore_array_formats() -> Sequence[ArrayFormatRegistration]:
    """Array serialization: the formats that write and read batches of array leaves.

    Called once per process, the first time arrays are saved or restored. A save hands
    each format all its leaves at once (so it can batch and overlap I/O); a restore hands
    it read requests that carry the target dtype and the regions each process needs, so
    only those bytes are read.

    :return: registrations with a unique ``name`` (recorded per leaf in the index), the
        newest on-disk ``version`` the format reads and writes, and the format object.

    Example::

        @hookimpl
        def ckptcore_array_formats():
            return [ArrayFormatRegistration(name="npy", format=NpyFormat(), version=1)]
    """


@hookspec(firstresult=True)
def ckptcore_default_array_format() -> str | None:
    """Array serialization: the format used when a save names none.

    Called when a save does not pass ``format=``. ``firstresult``: the first plugin to
    return a name wins, so a plugin should answer only if it means to be the default.

    :return: the name of a registered array format, or ``None`` to abstain.

    Example::

        @hookimpl
        def ckptcore_default_array_format():
            return "npy"
    """


# -- checkpoint layouts --------------------------------------------------------------------


@hookspec
def ckptcore_checkpoint_layouts() -> Sequence[CheckpointLayoutRegistration]:
    """Checkpoint layouts: read checkpoints written by other systems through ckptcore's restore.

    Called once per process, the first time a path holds no committed ckptcore checkpoint
    (``restore``, ``metadata``, ``info``, ``ckptcore inspect``). ckptcore's own layout is the
    default one and always comes first; then each registered layout's
    ``recognize(location)`` is asked, in registration order, and the first that answers
    ``True`` opens the checkpoint. ``open`` returns a
    :class:`~ckptcore.plugins.registrations.ForeignCheckpoint`: a ckptcore index document
    built in memory plus readers for the array formats its records name, so targets,
    partial restores, casts, resharding, ``max_bytes_in_flight`` and progress work exactly
    as for ckptcore's own checkpoints. Never execute or unpickle anything read.

    A layout may also read the step directories of the other system's manager roots: its
    optional ``open_step(location)`` (see :class:`~ckptcore.plugins.registrations.StepReader`)
    is called by :class:`~ckptcore.CheckpointManager` for a step directory without
    ``ckptcore_step.json`` (and, on object stores, without ckptcore's commit marker), and
    returns a :class:`~ckptcore.plugins.registrations.ForeignStep` (items, metrics, commit
    time, committed) or ``None``. The manager then lists, ranks (``best_fn``), restores and
    deletes those steps beside its own; new steps are always written in ckptcore's layout.

    :return: registrations naming each layout and carrying its recognizer/reader object.

    Example::

        @hookimpl
        def ckptcore_checkpoint_layouts():
            return [CheckpointLayoutRegistration(name="npz", layout=NpzLayout())]

    where ``NpzLayout.recognize(location)`` looks for its marker file, ``open(location)``
    returns ``ForeignCheckpoint(index={"tree": ...}, formats={"npz": NpzReader()},
    description="npz")``, and (optionally) ``open_step(location)`` returns
    ``ForeignStep(items={"default": {"kind": "pytree"}}, metrics={"loss": 0.1})``.
    """


@hookspec
def ckptcore_checkpoint_exporters() -> Sequence[CheckpointExporterRegistration]:
    """Checkpoint layouts: write a checkpoint in another system's layout (``convert --to NAME``).

    Called once per process, the first time ``ckptcore.convert(src, dst, to=NAME)`` (or
    ``ckptcore convert SRC DST --to NAME``) names a layout other than ckptcore's own. The
    core opens the source (any layout it reads), checks it, and hands the exporter's
    ``export(location, leaves, pieces, options)`` the uncommitted staging directory of
    ``dst``, every leaf (:class:`~ckptcore.plugins.registrations.ExportLeaf`: key path,
    kind, shape and dtype, or the value of a non-array leaf), and an iterator of the array
    data (:class:`~ckptcore.plugins.registrations.ExportPiece`, whole arrays or row blocks,
    in leaf order, read in bounded batches, the source's checksums verified). ``options``
    are the caller's ``export_options``; reject the ones you do not know. Refuse what the
    layout cannot hold (a dtype, a non-array leaf) with an error naming the leaf, before
    writing. When ``export`` returns, the core commits ``dst`` (a rename on disk, a commit
    marker on object stores); when it raises, ``dst`` never appears.

    :return: registrations with a unique ``name`` (what ``to=`` names) and the exporter object.

    Example::

        @hookimpl
        def ckptcore_checkpoint_exporters():
            return [CheckpointExporterRegistration(name="npz", exporter=NpzExporter())]

    where ``NpzExporter.export`` writes one ``.npy`` per ``ExportPiece`` and returns
    ``{"files": n}``.
    """


# -- metadata ------------------------------------------------------------------------------


@hookspec
def ckptcore_index_metadata(context: SaveContext) -> Mapping[str, Any] | None:
    """Metadata: add JSON-able entries to the checkpoint index of the save in progress.

    Called once per save, just before the index is written. Each plugin's answer is
    stored under its plugin name in the index's ``plugin_metadata`` and shown by
    ``ckptcore inspect``. Keep it small; never put code or pickles in it.

    :param context: the URL being saved, the array formats used and the user metadata.
    :return: a JSON-able mapping, or ``None`` to add nothing.

    Example::

        @hookimpl
        def ckptcore_index_metadata(context):
            return {"hostname": socket.gethostname()}
    """
