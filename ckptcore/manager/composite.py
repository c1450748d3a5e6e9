"""Several named items saved as one manager step: ``Composite`` and ``Json``.

A plain pytree given to :class:`ckptcore.CheckpointManager` is the single item
``"default"``; ``Composite(state=tree, config=Json(cfg))`` holds several. All items of a
step are committed together: a step is never visible with some of its items missing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from ckptcore.errors import InvalidOptionError

DEFAULT_ITEM = "default"

# Item names become directory names inside a step on every storage: keep them portable.
_ITEM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_RESERVED = {"ckptcore_step.json"}


def check_item_name(name: object) -> str:
    if not isinstance(name, str) or not _ITEM_NAME.fullmatch(name) or name in _RESERVED:
        raise InvalidOptionError(
            f"invalid item name {name!r}: use 1-128 letters, digits, '_', '-' or '.', not starting with '.' or '-'"
        )
    return name


class Json:
    """An item stored as plain JSON (a config, a vocabulary, a dataset position).

    Restored as the plain JSON value (dicts, lists, strings, numbers, booleans, None).
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Json({self.value!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Json) and other.value == self.value

    __hash__ = None  # type: ignore[assignment]  # mutable payload


class Composite(Mapping[str, Any]):
    """Named items of one step: ``Composite(state=tree, config=Json(cfg))``.

    Items are read as ``c["state"]`` or ``c.state``. As a restore target, a Composite
    may name a subset of the saved items; an item given as ``None`` is restored as saved.
    """

    def __init__(self, items: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        merged = {**dict(items or {}), **kwargs}
        if not merged:
            raise InvalidOptionError("a Composite needs at least one item")
        self._items = {check_item_name(k): v for k, v in merged.items()}

    def __getitem__(self, name: str) -> Any:
        return self._items[name]

    def __getattr__(self, name: str) -> Any:
        items = self.__dict__.get("_items", {})
        if name in items:
            return items[name]
        raise AttributeError(f"Composite has no item {name!r}; items: {sorted(items)}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._items.items())
        return f"Composite({inner})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Composite) and other._items == self._items

    __hash__ = None  # type: ignore[assignment]
