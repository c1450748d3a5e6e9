"""CheckpointManager on local disk: steps, naming, metadata, composite items, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import ckptcore
from ckptcore import CheckpointManager, CheckpointManagerOptions, Composite, Json
from ckptcore.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidMetadataError,
    NotACheckpointRootError,
    ReadOnlyError,
    StepAlreadyExistsError,
    TargetMismatchError,
)


def opts(**kw) -> CheckpointManagerOptions:
    kw.setdefault("enable_async_checkpointing", False)
    return CheckpointManagerOptions(**kw)


def state(i: int) -> dict:
    return {"params": {"w": np.full((4, 3), float(i), np.float32), "b": np.arange(3) + i}, "step": i, "name": "run"}


def assert_tree_equal(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_tree_equal(a[k], b[k])
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def test_save_restore_latest_and_by_step(tmp_path):
    with CheckpointManager(tmp_path / "run", opts()) as mgr:
        assert mgr.latest_step() is None and mgr.all_steps() == []
        for i in range(3):
            assert mgr.save(i, state(i)) is True
        assert mgr.all_steps() == [0, 1, 2]
        assert mgr.latest_step() == 2
        assert_tree_equal(mgr.restore(), state(2))
        assert_tree_equal(mgr.restore(1), state(1))
    # A fresh manager sees the same steps.
    with CheckpointManager(tmp_path / "run", opts()) as mgr:
        assert mgr.all_steps() == [0, 1, 2]
        assert_tree_equal(mgr.restore(0), state(0))


def test_restore_with_target_casts_and_checks(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(5, state(5))
        target = {"params": {"w": np.zeros((4, 3), np.float64), "b": np.zeros(3, np.int64)}, "step": 0, "name": ""}
        out = mgr.restore(5, target)
        assert out["params"]["w"].dtype == np.float64
        np.testing.assert_array_equal(out["params"]["w"], 5.0)
        with pytest.raises(TargetMismatchError, match="w"):
            mgr.restore(5, {"params": {"w": np.zeros((2, 2))}, "step": 0, "name": ""}, partial=True)


def test_step_names_use_prefix_and_padding(tmp_path):
    with CheckpointManager(tmp_path, opts(step_prefix="ckpt", step_format_fixed_length=6)) as mgr:
        mgr.save(42, state(1))
        assert mgr.all_steps() == [42]
    assert "ckpt_000042" in os.listdir(tmp_path)
    root = json.loads((tmp_path / "ckptcore_manager.json").read_text())
    assert root["step_prefix"] == "ckpt"
    # A manager opened without the prefix still finds the steps (the root file records it).
    with CheckpointManager(tmp_path, opts()) as mgr:
        assert mgr.all_steps() == [42]
        assert_tree_equal(mgr.restore(42), state(1))


def test_existing_step_needs_force(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, state(1))
        mgr.save(2, state(2))
        with pytest.raises(StepAlreadyExistsError, match=r"step 2 already exists.*latest_step\(\) \+ 1.*force=True"):
            mgr.save(2, state(9))
        with pytest.raises(StepAlreadyExistsError, match="step 1 already exists"):
            mgr.save(1, state(9), metrics={"loss": 1.0})
        assert_tree_equal(mgr.restore(1), state(1))  # untouched
        assert mgr.save(1, state(9), force=True)
        assert_tree_equal(mgr.restore(1), state(9))
        assert mgr.all_steps() == [1, 2]


def test_save_existing_due_step_raises(tmp_path):
    # A step can be "due" and exist when another manager wrote it after our listing.
    with CheckpointManager(tmp_path, opts(writer_lock=False)) as a:
        a.save(0, state(0))
        with CheckpointManager(tmp_path, opts(writer_lock=False)) as b:
            b.save(3, state(3))
        with pytest.raises(StepAlreadyExistsError, match="step 3 already exists"):
            a.save(3, state(4))
        a.reload()
        assert_tree_equal(a.restore(3), state(3))


def test_should_save_interval_and_initial_step(tmp_path):
    with CheckpointManager(tmp_path, opts(save_interval_steps=10)) as mgr:
        assert mgr.should_save(3)  # nothing saved yet: the first step is always due (orbax)
        assert mgr.save(3, state(3))
        assert not mgr.should_save(5)
        assert mgr.save(5, state(5)) is False
        assert mgr.should_save(10)
        assert mgr.save(10, state(10))
        assert not mgr.should_save(10) and not mgr.should_save(7)  # not newer than the latest
        assert mgr.save(11, state(11), force=True)
        assert mgr.all_steps() == [3, 10, 11]


def test_should_save_fn(tmp_path):
    calls = []

    def fn(step, latest):
        calls.append((step, latest))
        return step in (2, 7)

    with CheckpointManager(tmp_path, opts(should_save_fn=fn)) as mgr:
        saved = [s for s in range(10) if mgr.save(s, state(s))]
    assert saved == [2, 7]
    assert (8, 7) in calls


def test_read_only_refuses_writes(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, state(1))
    with CheckpointManager(tmp_path, opts(read_only=True)) as ro:
        assert ro.should_save(100) is False
        with pytest.raises(ReadOnlyError, match="read-only"):
            ro.save(100, state(1), force=True)
        with pytest.raises(ReadOnlyError):
            ro.delete(1)
        assert_tree_equal(ro.restore(), state(1))
    assert sorted(p for p in os.listdir(tmp_path) if not p.startswith(".")) == ["1", "ckptcore_manager.json"]


def test_read_only_on_missing_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        CheckpointManager(tmp_path / "nope", opts(read_only=True))
    with pytest.raises(CheckpointNotFoundError):
        CheckpointManager(tmp_path / "nope", opts(create=False))
    assert not (tmp_path / "nope").exists()


def test_metrics_stored_without_best_fn(tmp_path):
    # orbax drops metrics unless best_fn is set; ckptcore keeps them.
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, state(1), metrics={"loss": np.float32(0.5), "acc": 1, "nested": {"x": np.array(2.0)}})
        mgr.save(2, state(2))
        assert mgr.metrics(1) == {"loss": 0.5, "acc": 1, "nested": {"x": 2.0}}
        assert mgr.metrics(2) is None
        assert mgr.best_step() == 2  # without best_fn: the latest, as orbax
    with CheckpointManager(tmp_path, opts()) as mgr:
        assert mgr.metrics(1)["loss"] == 0.5
        meta = mgr.step_metadata(1)
        assert meta.metrics == {"loss": 0.5, "acc": 1, "nested": {"x": 2.0}}
        assert meta.commit_time is not None and meta.items["default"]["kind"] == "pytree"


def test_non_finite_metrics_round_trip(tmp_path):
    with CheckpointManager(tmp_path, opts(best_fn=lambda m: m["loss"], best_mode="min", max_to_keep=2)) as mgr:
        mgr.save(1, state(1), metrics={"loss": float("nan")})
        mgr.save(2, state(2), metrics={"loss": 3.0})
        mgr.save(3, state(3), metrics={"loss": float("inf")})
        # NaN ranks worst; inf is worse than 3.0 for "min": 1 is deleted.
        assert mgr.all_steps() == [2, 3]
        assert mgr.best_step() == 2
    with CheckpointManager(tmp_path, opts()) as mgr:
        assert mgr.metrics(3) == {"loss": float("inf")}


@pytest.mark.parametrize(
    "metrics, match",
    [
        ({"loss": "low"}, r"\['loss'\] is 'low'"),
        ({"loss": [1.0, 2.0]}, "must be a number"),
        ({"loss": None}, "must be a number"),
        ([("loss", 1.0)], "must be a mapping"),
        ({1: 1.0}, "metric names must be strings"),
    ],
)
def test_bad_metrics_rejected_before_writing(tmp_path, metrics, match):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, state(1), metrics={"loss": 1.0})
        with pytest.raises(InvalidMetadataError, match=match):
            mgr.save(2, state(2), metrics=metrics)
        assert mgr.all_steps() == [1]
    assert sorted(p for p in os.listdir(tmp_path) if not p.startswith(".")) == ["1", "ckptcore_manager.json"]


def test_best_fn_raising_is_clear_and_loses_nothing(tmp_path):
    o = opts(best_fn=lambda m: m["accuracy"], max_to_keep=1)
    with CheckpointManager(tmp_path, o) as mgr:
        mgr.save(1, state(1), metrics={"accuracy": 0.5})
        with pytest.raises(InvalidMetadataError, match=r"best_fn failed on the metrics of step 2.*KeyError.*accuracy"):
            mgr.save(2, state(2), metrics={"loss": 0.1})
        assert mgr.all_steps() == [1]
        with pytest.raises(InvalidMetadataError, match="not a number"):
            mgr._options.best_fn = lambda m: "high"
            mgr.save(3, state(3), metrics={"accuracy": 0.9})
        assert mgr.all_steps() == [1]
        assert_tree_equal(mgr.restore(1), state(1))


def test_steps_whose_metrics_best_fn_cannot_score_are_kept(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, state(1), metrics={"loss": 0.3})
        mgr.save(2, state(2), metrics={"loss": 0.2})
    # A new best_fn that the old steps' metrics do not fit: they rank as steps without metrics.
    o = opts(best_fn=lambda m: m["acc"], max_to_keep=1, keep_checkpoints_without_metrics=True)
    with CheckpointManager(tmp_path, o) as mgr:
        mgr.save(3, state(3), metrics={"acc": 0.7})
        mgr.save(4, state(4), metrics={"acc": 0.9})
        assert mgr.all_steps() == [1, 2, 4]


def test_composite_and_json_items(tmp_path):
    cfg = {"lr": 0.01, "layers": [64, 64], "name": "mlp"}
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(7, Composite(state=state(7), config=Json(cfg), extra={"ema": np.ones(5)}), metrics={"loss": 1.0})
        out = mgr.restore(7)
        assert isinstance(out, Composite) and set(out) == {"state", "config", "extra"}
        assert_tree_equal(out.state, state(7))
        assert out["config"] == cfg
        np.testing.assert_array_equal(out.extra["ema"], np.ones(5))
        # A target may name a subset of the items; None restores an item as saved.
        sub = mgr.restore(7, Composite(config=None, extra={"ema": np.zeros(5, np.float32)}))
        assert set(sub) == {"config", "extra"} and sub.extra["ema"].dtype == np.float32
        with pytest.raises(TargetMismatchError, match=r"no item\(s\) \['optimizer'\]"):
            mgr.restore(7, Composite(optimizer=None))
        with pytest.raises(TargetMismatchError, match=r"pass a ckptcore\.Composite"):
            mgr.restore(7, state(0))
        meta = mgr.item_metadata(7)
        assert meta["state"]["params"]["w"].shape == (4, 3) and meta["config"] == cfg
        assert mgr.step_metadata(7).items["config"] == {"kind": "json"}
    step_dir = tmp_path / "7"
    assert json.loads((step_dir / "config" / "ckptcore_json.json").read_text()) == cfg


def test_single_json_item_and_composite_target_on_plain_step(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, Json({"a": 1}))
        assert mgr.restore(1) == {"a": 1}
        mgr.save(2, state(2))
        out = mgr.restore(2, Composite(default=None))
        assert isinstance(out, Composite)
        assert_tree_equal(out.default, state(2))


def test_bad_items_rejected_before_writing(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        with pytest.raises(ValueError, match="invalid item name"):
            Composite(**{"../x": 1})
        with pytest.raises(InvalidMetadataError, match="Json item 'cfg'"):
            mgr.save(1, Composite(a=state(1), cfg=Json({"f": object()})))
        with pytest.raises(ckptcore.errors.UnsupportedLeafError):
            mgr.save(1, Composite(a={"x": object()}))
        assert mgr.all_steps() == []


def test_root_metadata_written_once(tmp_path):
    with CheckpointManager(tmp_path, opts(), metadata={"model": "mlp", "seed": 3}) as mgr:
        assert mgr.metadata() == {"model": "mlp", "seed": 3}
    with CheckpointManager(tmp_path, opts(), metadata={"model": "other"}) as mgr:
        assert mgr.metadata() == {"model": "mlp", "seed": 3}
    with CheckpointManager(tmp_path, opts(read_only=True)) as mgr:
        assert mgr.metadata() == {"model": "mlp", "seed": 3}
    with pytest.raises(InvalidMetadataError):
        CheckpointManager(tmp_path / "b", opts(), metadata={"f": object()})


def test_not_a_checkpoint_root(tmp_path):
    ckptcore.save(tmp_path / "single", state(1))
    with pytest.raises(NotACheckpointRootError, match="single checkpoint"):
        CheckpointManager(tmp_path / "single", opts())
    with CheckpointManager(tmp_path / "run", opts()) as mgr:
        mgr.save(1, state(1))
    with pytest.raises(NotACheckpointRootError, match="one step of a CheckpointManager"):
        CheckpointManager(tmp_path / "run" / "1", opts())
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotACheckpointRootError, match="is a file"):
        CheckpointManager(tmp_path / "file", opts())
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "ckptcore_manager.json").write_text('{"format": "something-else"}')
    with pytest.raises(NotACheckpointRootError):
        CheckpointManager(tmp_path / "foreign", opts())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "ckptcore_manager.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="delete that file"):
        CheckpointManager(tmp_path / "broken", opts())
    # Everything above is untouched.
    assert_tree_equal(ckptcore.restore(tmp_path / "single"), state(1))
    with CheckpointManager(tmp_path / "run", opts(read_only=True)) as mgr:
        assert_tree_equal(mgr.restore(1), state(1))


def test_corrupted_step_gives_clear_error_and_others_survive(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        for i in range(3):
            mgr.save(i, state(i), metrics={"loss": float(i)})
    (tmp_path / "2" / "ckptcore_step.json").write_text("{truncated")
    (tmp_path / "1" / "default" / "ckptcore_index.json").unlink()
    with CheckpointManager(tmp_path, opts()) as mgr:
        assert mgr.all_steps() == [0, 1, 2]  # listed: restore says what is wrong
        with pytest.raises(CorruptCheckpointError, match=r"step 2 .*ckptcore_step.json is damaged.*delete\(2\)"):
            mgr.restore()
        with pytest.raises(CorruptCheckpointError, match=r"step 1 .*item 'default' has no index"):
            mgr.restore(1)
        assert_tree_equal(mgr.restore(0), state(0))
        mgr.delete(2)
        mgr.delete(1)
        assert mgr.all_steps() == [0]
        mgr.save(3, state(3))
        assert mgr.all_steps() == [0, 3]


def test_foreign_step_directory(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, state(1))
    (tmp_path / "5").mkdir()  # e.g. written by another tool: committed by name, but not ours
    (tmp_path / "5" / "data").write_text("x")
    with CheckpointManager(tmp_path, opts()) as mgr:
        assert mgr.latest_step() == 5
        with pytest.raises(CorruptCheckpointError, match="not written by a ckptcore CheckpointManager"):
            mgr.restore()
        assert_tree_equal(mgr.restore(1), state(1))


def test_restore_unknown_step_and_empty(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        with pytest.raises(CheckpointNotFoundError, match="no committed step"):
            mgr.restore()
        mgr.save(1, state(1))
        with pytest.raises(CheckpointNotFoundError, match=r"step 9 .*steps: \[1\]"):
            mgr.restore(9)
        with pytest.raises(CheckpointNotFoundError):
            mgr.metrics(9)
        with pytest.raises(ValueError, match="non-negative"):
            mgr.save(-1, state(1))


def test_leftovers_cleaned_at_start_and_never_counted(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, state(1))
    leftover = tmp_path / "2.ckptcore-tmp-host-1-abcd"
    leftover.mkdir()
    (leftover / "partial").write_bytes(b"x" * 10)
    with CheckpointManager(tmp_path, opts()) as mgr:
        assert mgr.all_steps() == [1]
        assert mgr.latest_step() == 1
    assert leftover.exists()
    with CheckpointManager(tmp_path, opts(cleanup_tmp_directories=True)) as mgr:
        assert mgr.all_steps() == [1]
    assert not leftover.exists()
    assert (tmp_path / "1").exists()


def test_failed_save_leaves_nothing_visible(tmp_path):
    with CheckpointManager(tmp_path, opts(array_format="no-such-format")) as mgr:
        with pytest.raises(ckptcore.errors.MissingPluginError):
            mgr.save(1, state(1))
        assert mgr.all_steps() == []
    assert [p for p in os.listdir(tmp_path) if not p.startswith(".")] == ["ckptcore_manager.json"]


def test_zarr3_format_option(tmp_path):
    with CheckpointManager(tmp_path, opts(array_format="zarr3")) as mgr:
        mgr.save(1, state(1))
        assert mgr.step_metadata(1).items["default"]["array_formats"] == ["zarr3"]
        assert_tree_equal(mgr.restore(1), state(1))


def test_closed_manager_refuses(tmp_path):
    mgr = CheckpointManager(tmp_path, opts())
    mgr.close()
    mgr.close()  # idempotent
    with pytest.raises(ckptcore.CheckpointError, match="closed"):
        mgr.save(1, state(1))


def test_options_validation():
    with pytest.raises(ValueError, match="best_mode"):
        CheckpointManagerOptions(best_mode="best")
    with pytest.raises(ValueError, match="max_to_keep"):
        CheckpointManagerOptions(max_to_keep=-1)
    with pytest.raises(ValueError, match="todelete_subdir"):
        CheckpointManagerOptions(todelete_subdir="a/b")


def test_bad_options_and_steps_are_checkpoint_errors(tmp_path):
    from ckptcore.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="max_to_keep"):
        ckptcore.CheckpointManagerOptions(max_to_keep=-1)
    with CheckpointManager(tmp_path / "run") as mgr:
        with pytest.raises(InvalidOptionError, match="non-negative"):
            mgr.save(-1, {"w": np.ones(2)})
        assert mgr.all_steps() == []
