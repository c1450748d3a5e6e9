"""ckptcore plugin: the ``safetensors`` array format.

One safetensors-conformant file per writing process (split at ``max_file_bytes``, 4 GiB by
default), data aligned to 4 KiB, written with parallel ``pwritev`` and fsynced once per
file; read with parallel ``preadv`` straight into the result arrays, each process reading
only the regions it needs; ranged, coalesced requests on object stores. Files that hold only
dtypes safetensors knows load with any safetensors reader (``safetensors.numpy.load_file``).

``ckptcore.save(path, state, format="safetensors", format_options={"max_file_bytes": ...})``
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ckptcore


class _LazyFormat:
    """Imports NumPy and the implementation on the first read or write, not when plugins load."""

    def __init__(self) -> None:
        self._impl: Any = None

    def _format(self) -> Any:
        if self._impl is None:
            from ckptcore_safetensors.safetensors_format import SafetensorsFormat

            self._impl = SafetensorsFormat()
        return self._impl

    def write(self, location: Any, requests: Sequence[Any], options: Mapping[str, Any]) -> list[dict[str, Any]]:
        return self._format().write(location, requests, options)

    def read(self, location: Any, requests: Sequence[Any], options: Mapping[str, Any]) -> list[list[Any]]:
        return self._format().read(location, requests, options)


@ckptcore.hookimpl
def ckptcore_array_formats() -> list[Any]:
    return [ckptcore.ArrayFormatRegistration(name="safetensors", format=_LazyFormat(), version=1)]
