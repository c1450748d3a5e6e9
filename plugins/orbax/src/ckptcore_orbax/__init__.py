"""ckptcore plugin: read orbax-checkpoint's checkpoints and CheckpointManager roots, without orbax.

``ckptcore.restore``, ``metadata``, ``info``, ``ckptcore inspect`` and ``ckptcore convert``
read an orbax-written item (``PyTreeCheckpointer``, ``StandardCheckpointer``, a
``CheckpointManager`` step's item) through ckptcore's one restore planner: targets,
partial restores, casts, resharding onto any mesh (only the regions each device needs are
read), bounded memory. ``CheckpointManager`` lists, ranks, restores and deletes the steps
of an orbax-written root beside its own.

What is read: ``_METADATA`` (the tree), ``_sharding``, ``array_metadatas/`` (typed PRNG
keys), ``_strings.json``, ``manifest.ocdbt`` + ``ocdbt.process_*`` (OCDBT) or plain
zarr / zarr3 arrays (through TensorStore), the older msgpack ``checkpoint`` file (data
only: nothing in it is executed), ``commit_success.txt`` and ``_CHECKPOINT_METADATA``.
orbax-checkpoint itself is never imported.
"""

from __future__ import annotations

from ckptcore.plugins.hookspecs import hookimpl
from ckptcore.plugins.registrations import CheckpointLayoutRegistration
from ckptcore_orbax.layout import OrbaxLayout


@hookimpl
def ckptcore_checkpoint_layouts() -> list[CheckpointLayoutRegistration]:
    return [CheckpointLayoutRegistration(name="orbax", layout=OrbaxLayout())]
