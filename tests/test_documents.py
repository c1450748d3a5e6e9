"""The on-disk documents (index, step, root, leases) are declared once, as msgspec Structs.

The README's format guide is generated from those declarations; regenerate it with

    python tests/test_documents.py

The tests below check that the README is up to date, that what ckptcore writes (and what
ckptcore 0.1.0 wrote, tests/data/v0_1_0) is exactly what the Structs declare, and that a
damaged document is refused with the path of its bad field.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

import ckptcore
from ckptcore import errors
from ckptcore.io import documents as index_docs
from ckptcore.manager import documents as manager_docs
from ckptcore.storage import locks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
V010 = Path(__file__).resolve().parent / "data" / "v0_1_0"
BEGIN = "<!-- format guide: generated from the msgspec Structs by `python tests/test_documents.py`; edit those, not this -->"
END = "<!-- end of the format guide -->"

# (file, Struct, the module that declares it): the documents in the order the guide shows them.
DOCUMENTS: list[tuple[str, type[msgspec.Struct], str]] = [
    (f"<checkpoint>/{index_docs.INDEX_FILE}", index_docs.Index, "ckptcore/io/documents.py"),
    (f"<root>/{manager_docs.ROOT_FILE}", manager_docs.RootDoc, "ckptcore/manager/documents.py"),
    (f"<root>/<step>/{manager_docs.STEP_FILE}", manager_docs.StepDoc, "ckptcore/manager/documents.py"),
    (f"<root>/{locks.WRITER_FILE}, <root>/{locks.READERS_DIR}/<step>.<owner>.json, "
     f"<root>/{locks.DELETING_DIR}/<step>.json", locks.LeaseFile, "ckptcore/storage/locks.py"),
]


# -- the generator ----------------------------------------------------------------------


def _type_name(t: Any, nested: list[type[msgspec.Struct]]) -> str:
    mi = msgspec.inspect
    if isinstance(t, mi.Metadata):
        return _type_name(t.type, nested)
    if isinstance(t, mi.IntType):
        return "integer" + (f" ≥ {t.ge}" if t.ge is not None else "")
    if isinstance(t, mi.FloatType):
        return "number"
    if isinstance(t, mi.StrType):
        return "string"
    if isinstance(t, mi.BoolType):
        return "boolean"
    if isinstance(t, mi.NoneType):
        return "null"
    if isinstance(t, mi.AnyType):
        return "any JSON"
    if isinstance(t, mi.LiteralType):
        return " or ".join(f'`"{v}"`' for v in t.values)
    if isinstance(t, mi.UnionType):
        return " or ".join(_type_name(u, nested) for u in t.types)
    if isinstance(t, mi.ListType):
        return f"list of {_type_name(t.item_type, nested)}"
    if isinstance(t, mi.DictType):
        value = t.value_type
        return "object" if isinstance(value, mi.AnyType) else f"object of {_type_name(value, nested)}"
    if isinstance(t, mi.StructType):
        if t.cls not in nested:
            nested.append(t.cls)
        return f"`{t.cls.__name__}`"
    raise TypeError(f"no README name for {t!r}: teach _type_name")


def _description(t: Any) -> str:
    schema = getattr(t, "extra_json_schema", None) or {}
    text = schema.get("description", "")
    if not text:
        raise AssertionError(f"a field of an on-disk document has no Meta(description=...): {t!r}")
    return str(text)


def _default(field: Any) -> str:
    if field.required:
        return "required"
    if field.default is msgspec.NODEFAULT and field.default_factory is msgspec.NODEFAULT:
        return "may be absent"
    value = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
    return f"default `{json.dumps(value)}`"


def _summary(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split())


def _table(cls: type[msgspec.Struct], nested: list[type[msgspec.Struct]]) -> list[str]:
    rows = ["| field | type | when absent | meaning |", "|---|---|---|---|"]
    for f in msgspec.inspect.type_info(cls).fields:  # type: ignore[attr-defined]
        rows.append(f"| `{f.encode_name}` | {_type_name(f.type, nested)} | {_default(f)} | {_description(f.type)} |")
    return rows


def format_guide() -> str:
    """The README's format guide, from the Structs."""
    lines = [
        BEGIN,
        "",
        "Every document is plain JSON. Readers ignore fields they do not know (a newer ckptcore may add",
        "some) and refuse a newer `format_version`; a field of the wrong type is reported with its path",
        "(e.g. `$.total_bytes`) as `CorruptCheckpointError`.",
    ]
    for where, cls, module in DOCUMENTS:
        nested: list[type[msgspec.Struct]] = []
        lines += ["", f"`{where}` (`{cls.__name__}` in `{module}`): {_summary(cls)}", ""]
        lines += _table(cls, nested)
        while nested:
            inner = nested.pop(0)
            lines += ["", f"`{inner.__name__}`: {_summary(inner)}", ""]
            lines += _table(inner, nested)
    lines += ["", END]
    return "\n".join(lines)


def readme_guide(text: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    assert start >= 0 and end > start, f"README.md has no format guide between {BEGIN!r} and {END!r}"
    return text[start : end + len(END)]


# -- the README -------------------------------------------------------------------------


def test_readme_format_guide_is_generated_from_the_structs():
    assert readme_guide(README.read_text(encoding="utf-8")) == format_guide(), (
        "README.md's format guide is out of date: run `python tests/test_documents.py`"
    )


def test_format_constants_match_the_declared_literals():
    for cls, value in [(index_docs.Index, index_docs.FORMAT), (manager_docs.RootDoc, manager_docs.ROOT_FORMAT),
                       (manager_docs.StepDoc, manager_docs.STEP_FORMAT)]:
        (fmt,) = [f for f in msgspec.inspect.type_info(cls).fields if f.name == "format"]  # type: ignore[attr-defined]
        assert fmt.type.type.values == (value,)


# -- what is written is what is declared ------------------------------------------------


def _fields(cls: type[msgspec.Struct]) -> tuple[set[str], set[str]]:
    info = msgspec.inspect.type_info(cls).fields  # type: ignore[attr-defined]
    return {f.encode_name for f in info}, {f.encode_name for f in info if f.required}


def _check_declared(doc: dict[str, Any], cls: type[msgspec.Struct], where: Any) -> None:
    declared, required = _fields(cls)
    assert set(doc) <= declared, f"{where}: fields {sorted(set(doc) - declared)} are not declared in {cls.__name__}"
    assert required <= set(doc), f"{where}: required fields {sorted(required - set(doc))} are missing"


def _check_document(path: Path, cls: type[msgspec.Struct]) -> None:
    raw = path.read_bytes()
    doc = json.loads(raw)
    _check_declared(doc, cls, path)
    decoded = msgspec.json.decode(raw, type=cls)
    if cls is index_docs.Index:
        assert decoded.to_dict() == doc, path  # type: ignore[attr-defined]
    else:  # nothing is lost or added by a decode (the index's defaults aside)
        assert msgspec.to_builtins(decoded) == doc, path
    if cls is manager_docs.StepDoc:
        for name, item in doc["items"].items():
            _check_declared(item, manager_docs.StepItem, f"{path} item {name}")
    if cls is index_docs.Index:
        for name, record in doc["array_formats"].items():
            _check_declared(record, index_docs.ArrayFormatRecord, f"{path} array format {name}")


def _documents_under(root: Path) -> list[tuple[Path, type[msgspec.Struct]]]:
    found: list[tuple[Path, type[msgspec.Struct]]] = []
    found += [(p, index_docs.Index) for p in root.rglob(index_docs.INDEX_FILE)]
    found += [(p, manager_docs.RootDoc) for p in root.rglob(manager_docs.ROOT_FILE)]
    found += [(p, manager_docs.StepDoc) for p in root.rglob(manager_docs.STEP_FILE)]
    found += [(p, locks.LeaseFile) for p in root.rglob(locks.WRITER_FILE)]
    found += [(p, locks.LeaseFile) for p in root.rglob(f"{locks.READERS_DIR}/*.json")]
    found += [(p, locks.LeaseFile) for p in root.rglob(f"{locks.DELETING_DIR}/*.json")]
    return sorted(found)


def test_ckptcore_0_1_0_documents_are_exactly_the_declared_ones():
    found = _documents_under(V010)
    assert {cls for _, cls in found} >= {index_docs.Index, manager_docs.RootDoc, manager_docs.StepDoc}
    for path, cls in found:
        _check_document(path, cls)


def test_documents_written_now_are_exactly_the_declared_ones(tmp_path):
    ckptcore.save(tmp_path / "single", {"w": np.arange(6.0).reshape(2, 3), "n": 3, "s": "x", "none": None},
                  metadata={"run": 7})
    opts = ckptcore.CheckpointManagerOptions(enable_async_checkpointing=False, step_prefix="ck")
    with ckptcore.CheckpointManager(tmp_path / "run", opts, metadata={"model": "mlp"}) as mgr:
        mgr.save(1, {"w": np.ones(3)}, metrics={"loss": float("nan"), "acc": 0.5})
        mgr.save(2, ckptcore.Composite(state={"w": np.ones(3)}, empty={}, cfg=ckptcore.Json({"a": 1})))
        from google.protobuf import timestamp_pb2

        mgr.save(3, ckptcore.Composite(state={"w": np.ones(3)}, pos=ckptcore.Proto(timestamp_pb2.Timestamp(seconds=9))))
        lease = locks.acquire_reader_lease(mgr._root, 2, 30)
        try:
            found = _documents_under(tmp_path)
            assert {cls for _, cls in found} == {index_docs.Index, manager_docs.RootDoc, manager_docs.StepDoc,
                                                 locks.LeaseFile}
            for path, cls in found:
                _check_document(path, cls)
        finally:
            lease.release()


# -- damaged documents are refused, naming the bad field --------------------------------


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "ck"
    ckptcore.save(path, {"w": np.ones(3)})
    return path


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda d: d.update(total_bytes="many"), "`$.total_bytes`"),
        (lambda d: d.update(total_bytes=-1), "`$.total_bytes`"),
        (lambda d: d["array_formats"]["ocdbt"].update(version="1"), "`$.array_formats[...].version`"),
        (lambda d: d.update(metadata=[1, 2]), "`$.metadata`"),
        (lambda d: d.update(tree=[]), "`$.tree`"),
    ],
)
def test_index_with_a_bad_field_names_it(tmp_path, edit, where):
    path = _saved(tmp_path)
    doc = json.loads((path / index_docs.INDEX_FILE).read_text())
    edit(doc)
    (path / index_docs.INDEX_FILE).write_text(json.dumps(doc))
    with pytest.raises(errors.CorruptCheckpointError, match=re.escape(where)):
        ckptcore.restore(path)
    with pytest.raises(errors.CorruptCheckpointError, match=re.escape(where)):
        ckptcore.metadata(path)


def test_index_extra_fields_are_ignored(tmp_path):
    path = _saved(tmp_path)
    doc = json.loads((path / index_docs.INDEX_FILE).read_text())
    doc["written_by_a_later_ckptcore"] = {"anything": [1]}
    (path / index_docs.INDEX_FILE).write_text(json.dumps(doc))
    np.testing.assert_array_equal(ckptcore.restore(path)["w"], np.ones(3))


def test_index_newer_version_is_incompatible_even_if_its_fields_differ(tmp_path):
    path = _saved(tmp_path)
    doc = json.loads((path / index_docs.INDEX_FILE).read_text())
    doc.update(format_version=2, total_bytes={"new": "layout"})
    (path / index_docs.INDEX_FILE).write_text(json.dumps(doc))
    with pytest.raises(errors.IncompatibleVersionError, match="pip install -U ckptcore"):
        ckptcore.metadata(path)


def _run(tmp_path: Path) -> Path:
    opts = ckptcore.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ckptcore.CheckpointManager(tmp_path / "run", opts) as mgr:
        mgr.save(1, {"w": np.ones(3)}, metrics={"loss": 1.0})
    return tmp_path / "run"


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda d: d["items"]["default"].update(kind="pickle"), "`$.items[...].kind`"),
        (lambda d: d.update(commit_time="yesterday"), "`$.commit_time`"),
        (lambda d: d.update(metrics=[0.5]), "`$.metrics`"),
        (lambda d: d.pop("items"), "`items`"),
    ],
)
def test_step_doc_with_a_bad_field_names_it(tmp_path, edit, where):
    run = _run(tmp_path)
    path = run / "1" / manager_docs.STEP_FILE
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    opts = ckptcore.CheckpointManagerOptions(read_only=True)
    with ckptcore.CheckpointManager(run, opts) as mgr:
        with pytest.raises(errors.CorruptCheckpointError, match=r"step 1 .*is damaged.*" + re.escape(where)):
            mgr.restore(1)


def test_step_doc_newer_version_is_incompatible(tmp_path):
    run = _run(tmp_path)
    path = run / "1" / manager_docs.STEP_FILE
    doc = json.loads(path.read_text())
    doc.update(format_version=manager_docs.PROTO_STEP_FORMAT_VERSION + 1, items=["a new layout"])
    path.write_text(json.dumps(doc))
    with ckptcore.CheckpointManager(run, ckptcore.CheckpointManagerOptions(read_only=True)) as mgr:
        with pytest.raises(errors.IncompatibleVersionError, match=r"step 1 .*newer ckptcore"):
            mgr.step_metadata(1)


@pytest.mark.parametrize(
    ("content", "exc", "match"),
    [
        ({"format": "ckptcore-manager", "format_version": 1, "step_prefix": 3}, errors.CorruptCheckpointError,
         r"damaged.*`\$\.step_prefix`.*delete that file"),
        ({"format": "ckptcore-manager", "format_version": 7}, errors.IncompatibleVersionError, "manager format 7"),
        ({"format": "ckptcore-manager"}, errors.IncompatibleVersionError, "upgrade"),
        ({"format": "something-else"}, errors.NotACheckpointRootError, "not a ckptcore manager file"),
        (["not", "an", "object"], errors.NotACheckpointRootError, "not a ckptcore manager file"),
    ],
)
def test_root_file_errors(tmp_path, content, exc, match):
    run = _run(tmp_path)
    (run / manager_docs.ROOT_FILE).write_text(json.dumps(content))
    with pytest.raises(exc, match=match):
        ckptcore.CheckpointManager(run, ckptcore.CheckpointManagerOptions(read_only=True))


def test_lease_that_is_not_a_lease_is_unreadable(tmp_path):
    run = _run(tmp_path)
    lock = run / locks.WRITER_FILE
    lock.write_text(json.dumps({"owner": "x", "host": "other-host", "pid": "one", "expires": time.time() + 3600}))
    with pytest.raises(errors.ConcurrentWriterError, match="unreadable"):
        ckptcore.CheckpointManager(run, ckptcore.CheckpointManagerOptions())
    # a lease written by hand with the fields that matter is understood
    lock.write_text(json.dumps({"owner": "x", "host": "other-host", "pid": 1, "expires": time.time() + 3600}))
    with pytest.raises(errors.ConcurrentWriterError, match="host other-host, pid 1;"):
        ckptcore.CheckpointManager(run, ckptcore.CheckpointManagerOptions())


if __name__ == "__main__":  # regenerate the README's format guide
    text = README.read_text(encoding="utf-8")
    try:
        old = readme_guide(text)
    except AssertionError as exc:
        sys.exit(str(exc))
    README.write_text(text.replace(old, format_guide()), encoding="utf-8")
    print("README.md: format guide " + ("unchanged" if old == format_guide() else "regenerated"))
