"""ckptcore plugin: the ``safetensors`` array format.

One safetensors-conformant file per writing process (split at ``max_file_bytes``, 4 GiB by
default), data aligned to 4 KiB, written with parallel ``pwritev`` and fsynced once per
file; read with parallel ``preadv`` straight into the result arrays, each process reading
only the regions it needs; ranged, coalesced requests on object stores. Files that hold only
dtypes safetensors knows load with any safetensors reader (``safetensors.numpy.load_file``).

``ckptcore.save(path, state, format="safetensors", format_options={"max_file_bytes": ...})``

Hugging Face files: ``ckptcore.restore("hf-model/")`` (a directory with ``model.safetensors``
or shards and ``model.safetensors.index.json``, or one ``.safetensors`` file) gives a flat
dict keyed by tensor name; :func:`nest` restores it onto a nested target and :func:`nested`
nests a flat dict. ``ckptcore convert SRC DST --to safetensors`` writes such a directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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


class _LazyLayout:
    """The ``huggingface`` checkpoint layout, imported when a path is first asked about."""

    def __init__(self) -> None:
        self._impl: Any = None

    def _layout(self) -> Any:
        if self._impl is None:
            from ckptcore_safetensors.huggingface import HuggingFaceLayout

            self._impl = HuggingFaceLayout()
        return self._impl

    def recognize(self, location: Any) -> bool:
        return bool(self._layout().recognize(location))

    def open(self, location: Any) -> Any:
        return self._layout().open(location)


class _LazyExporter:
    """The ``safetensors`` checkpoint exporter (``convert --to safetensors``), imported on first use."""

    def export(self, location: Any, leaves: Sequence[Any], pieces: Iterable[Any], options: Mapping[str, Any]) -> Any:
        from ckptcore_safetensors.export import HuggingFaceExporter

        return HuggingFaceExporter().export(location, leaves, pieces, options)


def nest(source: Any, *, sep: str = ".", storage_options: Mapping[str, Any] | None = None, **transforms: Any) -> Any:
    """``ckptcore.Transforms`` restoring a Hugging Face checkpoint's flat tensor names onto a nested target.

    See :func:`ckptcore_safetensors.huggingface.nest`.
    """
    from ckptcore_safetensors.huggingface import nest as _nest

    return _nest(source, sep=sep, storage_options=storage_options, **transforms)


def nested(tree: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """A flat dict of tensor names as nested dicts (see :func:`ckptcore_safetensors.huggingface.nested`)."""
    from ckptcore_safetensors.huggingface import nested as _nested

    return _nested(tree, sep)


@ckptcore.hookimpl
def ckptcore_array_formats() -> list[Any]:
    return [ckptcore.ArrayFormatRegistration(name="safetensors", format=_LazyFormat(), version=1)]


@ckptcore.hookimpl
def ckptcore_checkpoint_layouts() -> list[Any]:
    return [ckptcore.CheckpointLayoutRegistration(name="huggingface", layout=_LazyLayout())]


@ckptcore.hookimpl
def ckptcore_checkpoint_exporters() -> list[Any]:
    return [ckptcore.CheckpointExporterRegistration(name="safetensors", exporter=_LazyExporter())]
