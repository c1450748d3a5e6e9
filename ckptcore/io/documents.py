"""The checkpoint index as a typed document: declared once, decoded and validated in one step.

``msgspec.json.decode(raw, type=Index)`` parses and type-checks the index together and names
the path of a bad field (``$.array_formats.ocdbt.version``). The stored pytree (``tree``) is
kept as plain JSON data: its nodes and leaf records are checked by
:func:`ckptcore.tree.nodes.validate_tree`, which owns that part of the format.

The README's format guide is generated from these declarations (tests/test_documents.py):
a field's ``Meta(description=...)`` is its documentation.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

INDEX_FILE = "ckptcore_index.json"
FORMAT: Final = "ckptcore-checkpoint"
FORMAT_VERSION = 1


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class ArrayFormatRecord(msgspec.Struct, kw_only=True):
    """Which array format wrote a checkpoint's arrays, for the missing-plugin and too-old checks."""

    version: Annotated[int, _doc("the on-disk version of the array format")] = 1
    distribution: Annotated[str, _doc("the plugin distribution that wrote it (e.g. `ckptcore-zarr3`)")] = ""
    plugin_version: Annotated[str, _doc("that distribution's version")] = ""


class Index(msgspec.Struct, kw_only=True):
    """One per checkpoint (and per item of a manager step): the tree and what wrote it."""

    format: Annotated[Literal["ckptcore-checkpoint"], _doc("what this file is")]
    format_version: Annotated[int, _doc(f"the index layout ({FORMAT_VERSION}); a newer one asks to upgrade ckptcore")]
    ckptcore_version: Annotated[str, _doc("the ckptcore that wrote it")] = ""
    created: Annotated[str, _doc("when it was saved (ISO 8601, UTC)")] = ""
    array_formats: Annotated[
        dict[str, ArrayFormatRecord], _doc("array format name -> the format version and plugin that wrote it")
    ] = {}
    total_bytes: Annotated[int, msgspec.Meta(ge=0, description="bytes of array data")] = 0
    metadata: Annotated[dict[str, Any], _doc("the user's `metadata=` (JSON)")] = {}
    plugin_metadata: Annotated[
        dict[str, Any], _doc("plugin name -> what its `ckptcore_index_metadata` hook returned")
    ] = {}
    tree: Annotated[
        dict[str, Any],
        _doc(
            "the pytree: nodes `dict` (with key types), `list`, `tuple`, `namedtuple`, `node` (a JAX pytree node: `node_type` for display only, `items` of `key`/`key_kind` attr, dict or index), `none` and `leaf`; a leaf "
            "holds an inline scalar or an array record (kind, shape, dtype, sharding, format, storage key, "
            "byte size, CRC-32C checksum)"
        ),
    ]

    def to_dict(self) -> dict[str, Any]:
        """The index as JSON data (what readers of ``read_index`` get); the tree is not copied."""
        out = msgspec.structs.asdict(self)
        out["array_formats"] = msgspec.to_builtins(self.array_formats)
        return out


def read_header(raw: bytes) -> dict[str, Any] | None:
    """The top-level fields of the JSON object in ``raw``, ``None`` when it is none.

    For explaining a document that failed to decode: ``format`` and ``format_version`` are
    decoded, every other field is left as undecoded JSON (``msgspec.Raw``).
    """
    try:
        top = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
    except msgspec.DecodeError:  # also ValidationError: JSON, but not an object
        return None
    return {k: msgspec.json.decode(v) if k in ("format", "format_version") else v for k, v in top.items()}


def is_newer(version: Any, supported: int) -> bool:
    """A format version this ckptcore cannot read (also: one that is not an integer at all)."""
    return not isinstance(version, int) or version > supported
