"""Round trips of every leaf kind and container (issue 2, item 6), and unsupported leaves."""

from __future__ import annotations

import collections
import json
import math
import os
import typing

import ml_dtypes
import numpy as np
import pytest

import ckptcore
from ckptcore.errors import UnsupportedLeafError
from ckptcore.io.index import INDEX_FILE

Point = collections.namedtuple("Point", ["x", "y"])


class Typed(typing.NamedTuple):
    name: str
    value: float


def _same(a: object, b: object) -> None:
    """Exact equality, including types, -0.0, nan and container types."""
    assert type(a) is type(b) or (isinstance(a, tuple) and hasattr(a, "_fields")), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)  # same keys in the same order
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        if hasattr(a, "_fields"):
            assert type(b).__name__ == type(a).__name__ and b._fields == a._fields
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, float):
        assert a.hex() == b.hex() or (math.isnan(a) and math.isnan(b))
        assert math.copysign(1, a) == math.copysign(1, b)
    elif isinstance(a, complex):
        _same(a.real, b.real)
        _same(a.imag, b.imag)
    else:
        assert a == b


def test_every_container_and_scalar_round_trips(tmp_path):
    state = {
        "zeta": 1,  # insertion order, not sorted
        "alpha": {3: "int key", "3": "str key", -1: "negative", 0: None},
        "list": [1, [2, [3, []]], ()],
        "tuple": (1, "two", (3.0,)),
        "namedtuple": Point(np.int8(3), {"nested": [None]}),
        "typed_nt": Typed("n", 0.5),
        "empty_dict": {},
        "empty_list": [],
        "empty_tuple": (),
        "none": None,
        "keys": {"a.b": 1, "c/d": 2, "/": 3, "..": 4, ".": 5, "with space": 6, "ünï©ødé ✓": 7, "": 8, "~1": 9, "%41": 10},
        "ints": [0, -1, 2**63, -(2**63) - 1, 2**200, -(3**150)],
        "floats": [0.0, -0.0, 1e-310, 1.7976931348623157e308, float("nan"), float("inf"), float("-inf"), 0.1],
        "bools": [True, False],
        "complexes": [1 + 2j, complex(-0.0, float("inf")), complex(float("nan"), 0.0)],
        "strs": ["", "ascii", "ünï\n\0\u2028", "\U0001f600"],
        "bytes": [b"", b"\x00\xff\x80", bytes(range(256))],
        "np_scalars": [
            np.bool_(True), np.int8(-5), np.uint16(65535), np.int64(-(2**63)), np.uint64(2**64 - 1),
            np.float16(1.5), np.float32(-0.0), np.float64(np.nan), np.complex64(1 - 1j), np.complex128(3j),
            ml_dtypes.bfloat16(2.5), ml_dtypes.float8_e4m3fn(1.0), ml_dtypes.float8_e5m2(-2.0),
        ],
    }
    ckptcore.save(tmp_path / "ck", state)
    back = ckptcore.restore(tmp_path / "ck")
    _same(state, back)
    # namedtuples come back as namedtuples with the same name and fields (rebuilt, never imported)
    assert back["namedtuple"].x == 3 and back["namedtuple"]._fields == ("x", "y")
    assert back["typed_nt"]._asdict() == {"name": "n", "value": 0.5}
    # metadata returns the same tree (scalars are values there too)
    meta = ckptcore.metadata(tmp_path / "ck")
    _same(state, meta)


def test_index_is_plain_json_and_keys_never_escape(tmp_path):
    state = {"../../etc": np.ones(100_000, np.uint8), "a/../b": np.ones(3), "x": {"..": np.zeros(2)}}
    ckptcore.save(tmp_path / "ck", state, format="zarr3")
    doc = json.loads((tmp_path / "ck" / INDEX_FILE).read_text())
    assert doc["format"] == "ckptcore-checkpoint" and isinstance(doc["format_version"], int)
    assert "ocdbt" not in doc["array_formats"] and "zarr3" in doc["array_formats"]
    keys = [leaf["key"] for leaf in _leaves(doc["tree"])]
    assert len(set(keys)) == 3
    for key in keys:
        assert ".." not in key.split("/") and not key.startswith("/")
    # nothing was written outside the checkpoint directory
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    back = ckptcore.restore(tmp_path / "ck")
    assert back["../../etc"].sum() == 100_000 and back["x"][".."].shape == (2,)


def _leaves(node):
    if node["type"] == "leaf":
        yield node
    for item in node.get("items", []):
        yield from _leaves(item["value"] if node["type"] == "dict" else item)


def test_arrays_among_scalars_and_the_root_as_a_leaf(tmp_path):
    ckptcore.save(tmp_path / "root_array", np.arange(10))
    np.testing.assert_array_equal(ckptcore.restore(tmp_path / "root_array"), np.arange(10))
    ckptcore.save(tmp_path / "root_scalar", 42)
    assert ckptcore.restore(tmp_path / "root_scalar") == 42
    ckptcore.save(tmp_path / "root_none", None)
    assert ckptcore.restore(tmp_path / "root_none") is None
    ckptcore.save(tmp_path / "root_empty", {})
    assert ckptcore.restore(tmp_path / "root_empty") == {}


def test_issue_example(tmp_path):
    state = {"params": {"w": np.ones((1024, 512), np.float32), "b": np.zeros(512, np.float32)},
             "step": 10, "lr": 3e-4, "name": "run-7", "opt": None, "extra": {}, "hist": [1.0, 2.0]}
    path = tmp_path / "run7"
    ckptcore.save(path, state)
    meta = ckptcore.metadata(path)
    assert meta["params"]["w"].shape == (1024, 512) and meta["params"]["w"].dtype == np.float32
    assert meta["params"]["b"].nbytes == 2048 and meta["step"] == 10 and meta["opt"] is None
    back = ckptcore.restore(path)
    _same(state, back)
    part = ckptcore.restore(path, target={"params": {"w": np.empty((1024, 512), np.float32)}}, partial=True)
    assert list(part) == ["params"] and list(part["params"]) == ["w"]
    np.testing.assert_array_equal(part["params"]["w"], state["params"]["w"])


class Custom:
    pass


@pytest.mark.parametrize(
    ("leaf", "type_name"),
    [
        ({1, 2}, "set"),
        (frozenset(), "frozenset"),
        (np.array([object(), 1], dtype=object), "object"),
        (np.array(["a", "b"]), "<U1"),
        (np.zeros(2, dtype=[("a", "i4")]), "('a'"),
        (Custom(), "Custom"),
        (range(3), "range"),
        (np.datetime64("2020-01-01"), "datetime64"),
        (lambda: None, "function"),
    ],
)
def test_unsupported_leaf_names_key_path_and_type_and_writes_nothing(tmp_path, leaf, type_name):
    state = {"ok": np.ones(100_000, np.float32), "deep": {"list": [1, leaf]}}
    with pytest.raises(UnsupportedLeafError) as err:
        ckptcore.save(tmp_path / "ck", state)
    message = str(err.value)
    assert "['deep']['list'][1]" in message
    assert type_name in message
    assert os.listdir(tmp_path) == []  # no checkpoint, no staging directory


@pytest.mark.parametrize("key", [1.5, (1, 2), None, True, b"x"])
def test_unsupported_dict_key(tmp_path, key):
    with pytest.raises(UnsupportedLeafError, match=r"\['a'\]"):
        ckptcore.save(tmp_path / "ck", {"a": {key: 1}})
    assert os.listdir(tmp_path) == []


def test_subclassed_containers_are_rejected_or_kept_faithfully(tmp_path):
    # An OrderedDict is a dict: saved as a dict, key order kept.
    od = collections.OrderedDict([("b", 1), ("a", 2)])
    ckptcore.save(tmp_path / "od", {"od": od})
    assert list(ckptcore.restore(tmp_path / "od")["od"]) == ["b", "a"]

    class MyList(list):
        pass

    with pytest.raises(UnsupportedLeafError, match="MyList"):
        ckptcore.save(tmp_path / "ml", {"x": MyList([1])})
    assert not (tmp_path / "ml").exists()
