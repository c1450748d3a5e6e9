"""The manager's documents, declared once: the root file and the step file.

``<root>/ckptcore_manager.json`` (:class:`RootDoc`) says the directory is a manager's and how
its steps are named; ``<root>/<step>/ckptcore_step.json`` (:class:`StepDoc`) describes one
committed step. Both are decoded and validated in one step (``msgspec.json.decode``), and
written as indented JSON, readable with ``json`` alone. The README's format guide is
generated from these declarations (tests/test_documents.py).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final, Literal

import msgspec

from ckptcore import storage
from ckptcore.errors import (
    CorruptCheckpointError,
    IncompatibleVersionError,
    NotACheckpointRootError,
)
from ckptcore.io.documents import is_newer, read_header
from ckptcore.plugins.registrations import Location
from ckptcore.version import __version__

ROOT_FILE = "ckptcore_manager.json"
STEP_FILE = "ckptcore_step.json"
JSON_ITEM_FILE = "ckptcore_json.json"
PROTO_ITEM_FILE = "ckptcore_proto.binpb"  # a Proto item's binary serialization
PROTO_TEXT_FILE = "ckptcore_proto.txtpb"  # and its text rendering (for item_metadata and people)
ROOT_FORMAT: Final = "ckptcore-manager"
STEP_FORMAT: Final = "ckptcore-step"
FORMAT_VERSION = 1
# A step holding a Proto item says 2, so that a ckptcore older than Proto items asks to upgrade
# instead of calling the step damaged; every other step keeps writing 1.
PROTO_STEP_FORMAT_VERSION = 2


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class RootDoc(msgspec.Struct, kw_only=True):
    """Written once, when a manager first sets the directory up."""

    format: Annotated[Literal["ckptcore-manager"], _doc("what this file is")]
    format_version: Annotated[int, _doc(f"the manager layout ({FORMAT_VERSION}); a newer one asks to upgrade")]
    created: Annotated[str, _doc("when the directory was set up (ISO 8601, UTC)")] = ""
    ckptcore_version: Annotated[str, _doc("the ckptcore that set it up")] = ""
    step_prefix: Annotated[str | None, _doc("the `step_prefix` option then (steps are `<prefix>_<step>`)")] = None
    step_format_fixed_length: Annotated[
        int | None, _doc("the `step_format_fixed_length` option then (zero-padded step numbers)")
    ] = None
    metadata: Annotated[dict[str, Any], _doc("the run's `metadata=` (JSON), returned by `metadata()`")] = {}


class StepItem(msgspec.Struct, kw_only=True):
    """One item of a step (the state alone is the item `default`)."""

    kind: Annotated[
        Literal["pytree", "json", "proto"],
        _doc("`pytree`: a checkpoint index in `<item>/`; `json`: a Json item; `proto`: a Proto item (protobuf message)"),
    ] = "pytree"
    array_formats: Annotated[list[str] | msgspec.UnsetType, _doc("pytree items: the array formats used")] = msgspec.UNSET
    total_bytes: Annotated[
        int | msgspec.UnsetType, _doc("pytree items: bytes of array data; proto items: bytes of the message")
    ] = msgspec.UNSET
    type_name: Annotated[
        str | msgspec.UnsetType, _doc("proto items: the message's full type name (`google.protobuf.Struct`)")
    ] = msgspec.UNSET
    checksum: Annotated[
        str | msgspec.UnsetType, _doc(f"proto items: `crc32c:<hex>` of `{PROTO_ITEM_FILE}`")
    ] = msgspec.UNSET


class StepDoc(msgspec.Struct, kw_only=True):
    """Written last into a step, just before the step is committed."""

    format: Annotated[Literal["ckptcore-step"], _doc("what this file is")]
    format_version: Annotated[int, _doc(
        f"the step layout ({FORMAT_VERSION}; {PROTO_STEP_FORMAT_VERSION} when it holds a proto item); "
        "a newer one asks to upgrade"
    )]
    step: Annotated[int | None, _doc("the step number")] = None
    commit_time: Annotated[float | None, _doc("when the step was committed (seconds since the epoch)")] = None
    commit_time_iso: Annotated[str, _doc("the same time in ISO 8601, UTC")] = ""
    ckptcore_version: Annotated[str, _doc("the ckptcore that wrote the step")] = ""
    composite: Annotated[bool, _doc("saved as a `Composite` (restored as one)")] = False
    items: Annotated[dict[str, StepItem], _doc("item name -> what the item is")]
    metrics: Annotated[
        dict[str, Any] | None, _doc("the `metrics=` of the save (NaN and infinities as strings), or null")
    ] = None


_ROOT_DECODER = msgspec.json.Decoder(RootDoc)
_STEP_DECODER = msgspec.json.Decoder(StepDoc)


def _encode(doc: msgspec.Struct) -> bytes:
    # json.dumps, indented: the same bytes ckptcore 0.1.0 wrote (fields in declaration order).
    return json.dumps(msgspec.to_builtins(doc), indent=1).encode()


def _now_iso(timestamp: float | None = None) -> str:
    when = datetime.datetime.now(datetime.UTC) if timestamp is None else datetime.datetime.fromtimestamp(
        timestamp, datetime.UTC
    )
    return when.isoformat()


def _decode(
    decoder: msgspec.json.Decoder[Any],
    raw: bytes,
    expected_format: str,
    check_version: Callable[[Any], None],
    *,
    not_ours: Callable[[Exception], Exception],
    damaged: Callable[[Exception], Exception],
    invalid_json: Callable[[Exception], Exception],
) -> Any:
    """Decode a document; a failure names why: another kind of file, a newer version, damage, not JSON."""
    try:
        doc = decoder.decode(raw)
    except msgspec.ValidationError as exc:
        header = read_header(raw)
        if header is None or header.get("format") != expected_format:
            raise not_ours(exc) from exc
        check_version(header.get("format_version"))  # a newer layout is an upgrade, not damage
        raise damaged(exc) from exc
    except msgspec.DecodeError as exc:
        raise invalid_json(exc) from exc
    check_version(doc.format_version)
    return doc


# -- the root file ---------------------------------------------------------------------


def read_root_file(root: Location) -> dict[str, Any] | None:
    """The manager's root file as JSON data (the fields of :class:`RootDoc`), ``None`` when absent.

    Clear errors when it is not ours, is damaged, or was written by a newer ckptcore.
    """
    raw = storage.read_file(root, ROOT_FILE)
    if raw is None:
        return None
    return msgspec.to_builtins(decode_root_file(raw, root.url))  # type: ignore[no-any-return]


def decode_root_file(raw: bytes, url: str) -> RootDoc:
    repair = (
        "The steps are unaffected: delete that file and open the manager again to rewrite it "
        "(the root metadata it held is lost)."
    )
    doc = _decode(
        _ROOT_DECODER, raw, ROOT_FORMAT, lambda version: _check_root_version(version, url),
        not_ours=lambda exc: NotACheckpointRootError(f"{url}/{ROOT_FILE} is not a ckptcore manager file"),
        damaged=lambda why: CorruptCheckpointError(f"{url}/{ROOT_FILE} is damaged: {why}. {repair}"),
        invalid_json=lambda why: CorruptCheckpointError(f"{url}/{ROOT_FILE} is not valid JSON ({why}). {repair}"),
    )
    return doc


def _check_root_version(version: Any, url: str) -> None:
    if is_newer(version, FORMAT_VERSION):
        raise IncompatibleVersionError(
            f"{url} was written by a newer ckptcore (manager format {version}); upgrade: pip install -U ckptcore"
        )


def write_root_file(
    root: Location, *, step_prefix: str | None, step_format_fixed_length: int | None, metadata: dict[str, Any]
) -> dict[str, Any]:
    """Write the root file of a directory being set up; returns it as JSON data."""
    doc = RootDoc(
        format=ROOT_FORMAT, format_version=FORMAT_VERSION, created=_now_iso(), ckptcore_version=__version__,
        step_prefix=step_prefix, step_format_fixed_length=step_format_fixed_length, metadata=metadata,
    )
    root.fs.pipe_file(f"{root.path.rstrip('/')}/{ROOT_FILE}", _encode(doc))
    return msgspec.to_builtins(doc)  # type: ignore[no-any-return]


# -- the step file ---------------------------------------------------------------------


def read_step_doc(step: int, location: Location) -> StepDoc:
    """The step file of ``step`` at ``location``; :class:`CorruptCheckpointError` when missing or damaged."""
    raw = storage.read_file(location, STEP_FILE)
    if raw is None:
        raise CorruptCheckpointError(
            f"step {step} at {location.url} has no {STEP_FILE}: it was not written by a ckptcore "
            f"CheckpointManager or is damaged. Restore another step (all_steps()) or delete it (delete({step}))."
        )
    return decode_step_doc(raw, step, location.url)


def decode_step_doc(raw: bytes, step: int, url: str) -> StepDoc:
    def damaged(why: object) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"step {step} at {url}: {STEP_FILE} is damaged ({why}). Restore another step "
            f"(all_steps()) or delete it (delete({step}))."
        )

    doc = _decode(
        _STEP_DECODER, raw, STEP_FORMAT, lambda version: _check_step_version(version, step, url),
        not_ours=lambda exc: damaged(f"not a ckptcore step metadata file: {exc}"),
        damaged=damaged, invalid_json=lambda why: damaged(f"not valid JSON: {why}"),
    )
    return doc


def _check_step_version(version: Any, step: int, url: str) -> None:
    if is_newer(version, PROTO_STEP_FORMAT_VERSION):
        raise IncompatibleVersionError(
            f"step {step} at {url} was written by a newer ckptcore; upgrade: pip install -U ckptcore"
        )


def encode_step_doc(
    *, step: int, commit_time: float, composite: bool, items: Mapping[str, Mapping[str, Any]], metrics: Any
) -> bytes:
    """The step file of a step about to be committed (``items``: name -> ``StepItem`` fields)."""
    has_proto = any(item.get("kind") == "proto" for item in items.values())
    doc = StepDoc(
        format=STEP_FORMAT, format_version=PROTO_STEP_FORMAT_VERSION if has_proto else FORMAT_VERSION, step=step, commit_time=commit_time,
        commit_time_iso=_now_iso(commit_time), ckptcore_version=__version__, composite=composite,
        items=msgspec.convert(items, dict[str, StepItem]), metrics=metrics,
    )
    return _encode(doc)
