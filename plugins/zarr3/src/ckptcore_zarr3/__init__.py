"""ckptcore plugin: the ``ocdbt`` (default) and ``zarr3`` array formats, through TensorStore.

* ``ocdbt``: every array of a checkpoint is a Zarr3 array inside one OCDBT database, so a
  checkpoint is a few large files whatever its number of leaves.
* ``zarr3``: one chunked Zarr3 array (a directory of chunk files) per leaf.

In both, small leaves are packed together into one object, chunks carry a CRC-32C
checksum, and compression is zstd when a sample of the data shows it pays.
"""

from __future__ import annotations

from ckptcore.hookspecs import hookimpl
from ckptcore.registrations import ArrayFormatRegistration

from ckptcore_zarr3.tensorstore_format import TensorStoreFormat


@hookimpl
def ckptcore_array_formats() -> list[ArrayFormatRegistration]:
    return [
        ArrayFormatRegistration(name="ocdbt", format=TensorStoreFormat(ocdbt=True), version=1),
        ArrayFormatRegistration(name="zarr3", format=TensorStoreFormat(ocdbt=False), version=1),
    ]


@hookimpl
def ckptcore_default_array_format() -> str:
    return "ocdbt"
