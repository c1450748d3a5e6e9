"""Key paths: how users see a leaf's position, and the storage key it is written under.

Storage keys are built from key paths by an escaping that round-trips any key (``.``,
``/``, spaces, unicode, ints) and can never name anything outside the checkpoint
directory: each key becomes one path segment made only of ``[A-Za-z0-9_-]``, ``%XX``
escapes and a ``~`` marker for integers.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

KeyPath = tuple[str | int, ...]

_SAFE = frozenset(string.ascii_letters + string.digits + "_-")
_ALL_SAFE = re.compile(r"[A-Za-z0-9_-]+")


def format_key_path(path: Sequence[str | int]) -> str:
    """A key path as users write it: ``['params']['w'][0]`` (``<root>`` for the root)."""
    return "".join(f"[{k!r}]" for k in path) or "<root>"


def key_path_text(path: Sequence[str | int]) -> str:
    """A key path in the ``/``-joined form of restore transforms and the CLI: ``encoder/layer_0/kernel``.

    Integer keys (list and tuple positions, int dict keys) are written in decimal; a ``/`` or
    ``\\`` inside a key is escaped with a backslash (``a\\/b``); the root is ``""``.
    """
    return "/".join(
        str(k) if isinstance(k, int) or ("/" not in k and "\\" not in k)
        else k.replace("\\", "\\\\").replace("/", "\\/")
        for k in path
    )


def escape_key(key: str | int) -> str:
    """One key as a safe path segment."""
    if isinstance(key, int):
        return f"~{key}"
    if key == "":
        return "~e"
    if _ALL_SAFE.fullmatch(key):  # the common case, without a per-character loop
        return key
    return "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in key)


def storage_key(path: Sequence[str | int]) -> str:
    """The relative storage key of a leaf: its escaped keys joined by ``/``."""
    return "/".join(escape_key(k) for k in path) or "~root"


_SEGMENT = r"(?:~e|~-?\d+|~root|(?:[A-Za-z0-9_-]+|%[0-9A-F]{2})+)"
_STORAGE_KEY = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")  # one match per key: fast for thousands of leaves


def is_safe_storage_key(key: object) -> bool:
    """Whether ``key`` (read from an index) is a key :func:`storage_key` could have made.

    Checked before a key read from a checkpoint reaches a format, so a tampered index can
    never point a read outside the checkpoint directory.
    """
    return isinstance(key, str) and _STORAGE_KEY.fullmatch(key) is not None
