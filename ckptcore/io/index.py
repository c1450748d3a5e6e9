"""The checkpoint index: one JSON file per checkpoint, readable with ``json`` alone.

Its fields are declared once, in :mod:`ckptcore.io.documents` (``Index``).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from ckptcore import storage
from ckptcore.errors import CheckpointNotFoundError, CorruptCheckpointError, IncompatibleVersionError
from ckptcore.io.documents import FORMAT, FORMAT_VERSION, INDEX_FILE, Index, is_newer, read_header
from ckptcore.plugins.registrations import Location

__all__ = ["FORMAT", "FORMAT_VERSION", "INDEX_FILE", "decode_index", "encode_index", "parse_index", "read_index"]

_DECODER = msgspec.json.Decoder(Index)


def encode_index(index: dict[str, Any] | Index) -> bytes:
    doc = index.to_dict() if isinstance(index, Index) else index
    # No indent: json's C encoder only runs without it (10x faster for thousands of leaves).
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def read_index(location: Location) -> dict[str, Any]:
    """Load and check the index of the checkpoint at ``location``."""
    raw = storage.read_file(location, INDEX_FILE)
    if raw is None:
        raise CheckpointNotFoundError(
            f"{location.url} has no checkpoint index ({INDEX_FILE}); it is not a ckptcore checkpoint"
        )
    return parse_index(raw, location.url)


def parse_index(raw: bytes, url: str) -> dict[str, Any]:
    """The checked index in ``raw`` as JSON data (a dict; the fields of :class:`Index`)."""
    return decode_index(raw, url).to_dict()


def decode_index(raw: bytes, url: str) -> Index:
    """The checked index in ``raw``: :class:`CorruptCheckpointError` names what is wrong, and where."""
    try:
        doc = _DECODER.decode(raw)
    except msgspec.ValidationError as exc:  # JSON, but not a valid index: say which way it is not
        header = read_header(raw)
        if header is None or header.get("format") != FORMAT or "tree" not in header:
            raise CorruptCheckpointError(f"{url}/{INDEX_FILE} is not a ckptcore checkpoint index ({exc})") from exc
        _check_version(header.get("format_version"), url)
        raise CorruptCheckpointError(
            f"{url}/{INDEX_FILE} is damaged: {exc}. Restore from another checkpoint."
        ) from exc
    except msgspec.DecodeError as exc:
        raise CorruptCheckpointError(
            f"the index of {url} is not valid JSON ({exc}); the file is truncated or corrupt. "
            "Restore from another checkpoint."
        ) from exc
    _check_version(doc.format_version, url)
    from ckptcore.tree.nodes import validate_tree  # imports NumPy: only once an index is read

    validate_tree(doc.tree)
    return doc


def _check_version(version: Any, url: str) -> None:
    if is_newer(version, FORMAT_VERSION):
        raise IncompatibleVersionError(
            f"{url} was written in index format version {version}, newer than this ckptcore reads "
            f"({FORMAT_VERSION}); upgrade: pip install -U ckptcore"
        )
