"""Proto items: a protobuf message saved in a manager step and restored into the target's class."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import ckptcore
from ckptcore import CheckpointManager, CheckpointManagerOptions, Composite, Proto
from ckptcore.errors import CorruptCheckpointError, InvalidOptionError, TargetMismatchError
from ckptcore.manager import documents
from ckptcore.manager.composite import ProtoMetadata

struct_pb2 = pytest.importorskip("google.protobuf.struct_pb2")  # protobuf is a test dependency
from google.protobuf import timestamp_pb2  # noqa: E402


def opts(**kw):
    return CheckpointManagerOptions(enable_async_checkpointing=False, **kw)


def iterator_state() -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update({"shard": 3, "offset": 123456, "files": ["a.tfrecord", "b.tfrecord"], "done": False})
    return s


@pytest.mark.parametrize("asynchronous", [False, True])
def test_round_trip_beside_a_pytree(tmp_path, asynchronous):
    state = {"w": np.arange(6.0)}
    message = iterator_state()
    o = CheckpointManagerOptions(enable_async_checkpointing=asynchronous)
    with CheckpointManager(tmp_path, o) as mgr:
        mgr.save(1, Composite(state=state, data=Proto(message)))
        message["offset"] = 0  # serialized at save: a later change is not saved
        mgr.wait_until_finished()
        out = mgr.restore(1, Composite(state=None, data=Proto(struct_pb2.Struct)))
    assert isinstance(out.data, struct_pb2.Struct)
    assert out.data == iterator_state()
    np.testing.assert_array_equal(out.state["w"], state["w"])


def test_proto_as_the_only_item_and_a_subset_restore(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, Proto(timestamp_pb2.Timestamp(seconds=1700000000, nanos=5)))
        mgr.save(2, Composite(state={"x": np.ones(2)}, when=Proto(timestamp_pb2.Timestamp(seconds=7))))
        assert mgr.restore(1, Proto(timestamp_pb2.Timestamp)) == timestamp_pb2.Timestamp(seconds=1700000000, nanos=5)
        # a message instance names its class too
        assert mgr.restore(2, Composite(when=Proto(timestamp_pb2.Timestamp()))).when.seconds == 7


def test_item_metadata_and_the_step_file(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, Composite(state={"x": np.ones(2)}, data=Proto(iterator_state())))
        meta = mgr.item_metadata(1)
        assert mgr.step_metadata(1).items["data"]["kind"] == "proto"
    assert isinstance(meta.data, ProtoMetadata)
    assert meta.data.type_name == "google.protobuf.Struct"
    assert 'string_value: "a.tfrecord"' in meta.data.text
    assert meta.data.nbytes == len(iterator_state().SerializeToString())
    doc = json.loads((tmp_path / "1" / documents.STEP_FILE).read_text())
    assert doc["format_version"] == documents.PROTO_STEP_FORMAT_VERSION
    assert doc["items"]["data"]["type_name"] == "google.protobuf.Struct"
    assert doc["items"]["data"]["checksum"].startswith("crc32c:")
    assert (tmp_path / "1" / "data" / documents.PROTO_TEXT_FILE).read_text() == meta.data.text


def test_steps_without_proto_items_keep_format_version_1(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, Composite(state={"x": np.ones(2)}, cfg=ckptcore.Json({"a": 1})))
    assert json.loads((tmp_path / "1" / documents.STEP_FILE).read_text())["format_version"] == 1


# -- bad input ------------------------------------------------------------------------------------


def test_wrong_message_class_names_the_item_and_both_types(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, Composite(state={"x": np.ones(2)}, data=Proto(iterator_state())))
        with pytest.raises(TargetMismatchError, match=r"'data'.*google\.protobuf\.Struct.*google\.protobuf\.Timestamp"):
            mgr.restore(1, Composite(data=Proto(timestamp_pb2.Timestamp)))


@pytest.mark.parametrize("target", [None, {"x": None}])
def test_a_proto_item_needs_its_class_from_the_target(tmp_path, target):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, Composite(state={"x": np.ones(2)}, data=Proto(iterator_state())))
        with pytest.raises(TargetMismatchError, match=r"'data'.*google\.protobuf\.Struct.*Proto\("):
            mgr.restore(1, Composite(data=target) if target is not None else None)


def test_a_proto_target_for_a_pytree_item(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, Composite(state={"x": np.ones(2)}, data=Proto(iterator_state())))
        with pytest.raises(TargetMismatchError, match=r"'state'.*not a protobuf message"):
            mgr.restore(1, Composite(state=Proto(struct_pb2.Struct)))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_damaged_bytes_are_corrupt(tmp_path, damage):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, Composite(state={"x": np.ones(2)}, data=Proto(iterator_state())))
        path = tmp_path / "1" / "data" / documents.PROTO_ITEM_FILE
        data = path.read_bytes()
        if damage == "garbage":
            path.write_bytes(bytes(b ^ 0x5A for b in data))
        elif damage == "truncated":
            path.write_bytes(data[:-3])
        else:
            path.unlink()
        with pytest.raises(CorruptCheckpointError, match=r"'data'"):
            mgr.restore(1, Composite(data=Proto(struct_pb2.Struct)))


def test_bytes_that_match_the_record_but_are_no_message(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, Composite(data=Proto(iterator_state())))
        garbage = b"\xff" * 9
        (tmp_path / "1" / "data" / documents.PROTO_ITEM_FILE).write_bytes(garbage)
        step_file = tmp_path / "1" / documents.STEP_FILE
        doc = json.loads(step_file.read_text())
        doc["items"]["data"].update(total_bytes=len(garbage), checksum=None)
        del doc["items"]["data"]["checksum"]
        step_file.write_text(json.dumps(doc))
        with pytest.raises(CorruptCheckpointError, match=r"not a google\.protobuf\.Struct message"):
            mgr.restore(1, Composite(data=Proto(struct_pb2.Struct)))


@pytest.mark.parametrize("value", [{"a": 1}, 3, struct_pb2.Struct.DESCRIPTOR])
def test_proto_of_something_else(value):
    with pytest.raises(InvalidOptionError, match="Proto needs a protobuf message"):
        Proto(value)


def test_saving_a_message_class_is_refused_and_writes_nothing(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        with pytest.raises(InvalidOptionError, match="restore target"):
            mgr.save(1, Composite(state={"x": np.ones(2)}, data=Proto(struct_pb2.Struct)))
        assert mgr.all_steps() == []


def test_protobuf_is_imported_only_when_a_proto_item_is_used(tmp_path):
    code = ("import sys, numpy as np, ckptcore; m = ckptcore.CheckpointManager(sys.argv[1], "
            "ckptcore.CheckpointManagerOptions(enable_async_checkpointing=False)); m.save(1, {'a': np.ones(2)}); "
            "m.restore(1); m.close(); print('google.protobuf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
