"""Several named items saved as one manager step: ``Composite``, ``Json`` and ``Proto``.

A plain pytree given to :class:`ckptcore.CheckpointManager` is the single item
``"default"``; ``Composite(state=tree, config=Json(cfg))`` holds several. All items of a
step are committed together: a step is never visible with some of its items missing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ckptcore.errors import CorruptCheckpointError, InvalidOptionError, TargetMismatchError

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


class Proto:
    """An item stored as a protobuf message (a dataset iterator's state, a config message).

    Saved as ``Proto(message)``: its binary serialization, its full type name and a text
    rendering (shown by :meth:`ckptcore.CheckpointManager.item_metadata`). Restored with
    ``Proto(MyMessage)`` (the message class, or any message of it) as the item's target, and
    returned as a ``MyMessage``: a class is never imported by the name a checkpoint holds.

    protobuf is needed only by steps that hold Proto items (``pip install protobuf``).
    """

    __slots__ = ("message", "message_class")
    message: Any
    message_class: Any

    def __init__(self, message: Any) -> None:
        try:
            from google.protobuf.message import Message
        except ImportError as exc:
            raise InvalidOptionError("ckptcore.Proto needs protobuf: pip install protobuf") from exc
        if isinstance(message, type) and issubclass(message, Message):
            self.message, self.message_class = None, message
        elif isinstance(message, Message):
            self.message, self.message_class = message, type(message)
        else:
            raise InvalidOptionError(
                f"Proto needs a protobuf message (to save) or message class (as a restore target), "
                f"got {message!r} ({type(message).__name__})"
            )

    @property
    def type_name(self) -> str:
        """The message's full type name (``google.protobuf.Struct``)."""
        return str(self.message_class.DESCRIPTOR.full_name)

    def __repr__(self) -> str:
        return f"Proto({self.type_name})" if self.message is None else f"Proto({self.type_name}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Proto) and other.message_class is self.message_class and other.message == self.message

    __hash__ = None  # type: ignore[assignment]  # mutable payload


@dataclass(frozen=True)
class ProtoMetadata:
    """What :meth:`ckptcore.CheckpointManager.item_metadata` says of a Proto item (nothing is parsed)."""

    type_name: str  # the message's full type name
    text: str  # its text rendering when saved (text format; long ones end with a note that they were cut)
    nbytes: int  # size of the binary serialization


PROTO_TEXT_LIMIT = 1 << 20  # a text rendering longer than this is cut (the binary form is always whole)


def serialize_proto(item: Proto, name: str) -> tuple[bytes, str]:
    """A Proto item to save, as (binary serialization, text rendering)."""
    if item.message is None:
        raise InvalidOptionError(
            f"Proto item {name!r} holds the class {item.type_name}, not a message: Proto(MessageClass) is a "
            "restore target; save Proto(message)"
        )
    from google.protobuf import text_format
    from google.protobuf.message import EncodeError

    try:
        data = item.message.SerializeToString()
    except EncodeError as exc:  # e.g. a proto2 message missing required fields
        raise InvalidOptionError(f"Proto item {name!r} ({item.type_name}) cannot be serialized: {exc}") from exc
    text = text_format.MessageToString(item.message)
    if len(text) > PROTO_TEXT_LIMIT:
        text = text[:PROTO_TEXT_LIMIT] + f"\n... (cut: {len(text)} characters in all)\n"
    return data, text


def parse_proto(target: Any, saved_type: str, data: bytes, *, name: str, where: str) -> Any:
    """The message a Proto item's bytes hold, as the target's class.

    :raises TargetMismatchError: the target is not a ``Proto`` or names another message type.
    :raises CorruptCheckpointError: the bytes are not a message of that type.
    """
    if not isinstance(target, Proto):
        raise TargetMismatchError(
            f"{where} is a protobuf message of type {saved_type}; restore it with ckptcore.Proto(<its message "
            f"class>) as its target, e.g. target=Composite({name}=Proto(MyMessage)) (got {target!r}): "
            "ckptcore never imports a class by the name a checkpoint holds"
        )
    if target.type_name != saved_type:
        raise TargetMismatchError(
            f"{where} holds a {saved_type} message; the target asks for {target.type_name}. Pass "
            f"Proto(<the {saved_type} class>)"
        )
    from google.protobuf.message import DecodeError

    message = target.message_class()
    try:
        message.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError(f"{where} is damaged: its bytes are not a {saved_type} message ({exc})") from exc
    return message


def proto_checksum(data: bytes) -> str:
    import crc32c

    return f"crc32c:{crc32c.crc32c(data):08x}"


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
