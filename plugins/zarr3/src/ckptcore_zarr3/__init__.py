"""ckptcore plugin: the ``ocdbt`` (default) and ``zarr3`` array formats, through TensorStore.

* ``ocdbt``: every array of a checkpoint is a Zarr3 array inside one OCDBT database, so a
  checkpoint is a few large files whatever its number of leaves.
* ``zarr3``: one chunked Zarr3 array (a directory of chunk files) per leaf.

In both, small leaves are packed together into one object, chunks carry a CRC-32C
checksum, and compression is zstd when a sample of the data shows it pays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ckptcore.plugins.hookspecs import hookimpl
from ckptcore.plugins.registrations import ArrayFormatRegistration


class _LazyFormat:
    """Imports TensorStore on the first read or write, not when plugins load.

    Plugins are loaded to resolve any path, so ``ckptcore.metadata()`` and ``ckptcore
    inspect`` would otherwise import TensorStore without reading any array.
    """

    def __init__(self, *, ocdbt: bool) -> None:
        self.ocdbt = ocdbt
        self._impl: Any = None

    def _format(self) -> Any:
        if self._impl is None:
            from ckptcore_zarr3.tensorstore_format import TensorStoreFormat

            self._impl = TensorStoreFormat(ocdbt=self.ocdbt)
        return self._impl

    def write(self, location: Any, requests: Sequence[Any], options: Mapping[str, Any]) -> list[dict[str, Any]]:
        return self._format().write(location, requests, options)

    def read(self, location: Any, requests: Sequence[Any], options: Mapping[str, Any]) -> list[list[Any]]:
        return self._format().read(location, requests, options)


@hookimpl
def ckptcore_array_formats() -> list[ArrayFormatRegistration]:
    return [
        ArrayFormatRegistration(name="ocdbt", format=_LazyFormat(ocdbt=True), version=1),
        ArrayFormatRegistration(name="zarr3", format=_LazyFormat(ocdbt=False), version=1),
    ]


@hookimpl
def ckptcore_default_array_format() -> str:
    return "ocdbt"
