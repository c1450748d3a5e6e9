"""Every hook is documented by the conventions, and every hook is exercised by a real flow."""

from __future__ import annotations

import inspect
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

import ckptcore
from ckptcore import hookimpl
from ckptcore.plugins import hookspecs
from ckptcore.plugins.address import StorageAddress
from ckptcore.plugins.manager import registry, reset_registry
from ckptcore.plugins.registrations import (
    ArrayFormatRegistration,
    AtomicityRegistration,
    CheckpointExporterRegistration,
    CheckpointLayoutRegistration,
    ForeignCheckpoint,
    ForeignStep,
    Location,
    StepLayoutRegistration,
    StorageRegistration,
)

HOOKS = sorted(n for n, f in vars(hookspecs).items() if n.startswith("ckptcore_") and callable(f))


def _spec_opts(name: str) -> dict[str, Any]:
    return getattr(getattr(hookspecs, name), f"{hookspecs.PROJECT}_spec")


def test_hook_families_are_all_there():
    assert {"ckptcore_storage_backends", "ckptcore_atomicity_strategies", "ckptcore_step_layouts",
            "ckptcore_array_formats", "ckptcore_default_array_format", "ckptcore_index_metadata"} <= set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_every_hookspec_is_documented(name):
    fn = getattr(hookspecs, name)
    doc = inspect.getdoc(fn) or ""
    summary = doc.splitlines()[0] if doc else ""
    assert summary.endswith(".") and ":" in summary, f"{name}: first line says the family and purpose"
    assert "Called" in doc, f"{name}: says when it is called"
    assert ":return:" in doc, f"{name}: documents its return value"
    assert "Example::" in doc and "@hookimpl" in doc and f"def {name}(" in doc, f"{name}: has an example"
    for param in inspect.signature(fn).parameters:
        assert f":param {param}:" in doc, f"{name}: documents parameter {param}"
    firstresult = bool(_spec_opts(name).get("firstresult"))
    assert ("firstresult" in doc) == firstresult, f"{name}: firstresult note iff firstresult"


def test_module_documents_how_to_write_a_plugin():
    doc = inspect.getdoc(hookspecs) or ""
    assert "[project.entry-points.ckptcore]" in doc and "hookimpl" in doc


# -- a plugin that implements every hook, used through the public API ----------------------

CALLS: list[str] = []


class MarkerCommit:
    """Object-store style atomicity on a local directory: write in place, publish a marker last."""

    MARKER = "COMMITTED"

    def begin(self, final: Location) -> Location:
        CALLS.append("atomicity.begin")
        final.fs.makedirs(final.path, exist_ok=True)
        return final

    def commit(self, staging: Location, final: Location, *, replace: bool) -> None:
        CALLS.append("atomicity.commit")
        final.fs.pipe_file(f"{final.path}/{self.MARKER}", b"")

    def abort(self, staging: Location) -> None:
        CALLS.append("atomicity.abort")
        shutil.rmtree(staging.path, ignore_errors=True)

    def is_committed(self, location: Location) -> bool:
        return os.path.exists(f"{location.path}/{self.MARKER}")

    def is_staging(self, location: Location) -> bool:
        CALLS.append("atomicity.is_staging")
        return os.path.isdir(location.path) and not self.is_committed(location)

    def delete(self, location: Location) -> None:
        os.remove(f"{location.path}/{self.MARKER}")
        shutil.rmtree(location.path)


class LocalDirBackend:
    def resolve(self, url: str, options: Mapping[str, Any]) -> Location:
        from fsspec.implementations.local import LocalFileSystem

        CALLS.append("storage.resolve")
        path = url.split("://", 1)[1]
        return Location(url=url, scheme="hooktest", fs=LocalFileSystem(), path=path,
                        address=StorageAddress(scheme="file", path=path + "/"), options=dict(options))


class RawFormat:
    """One raw little-endian file per leaf, written with fsspec."""

    def write(self, location, requests, options):
        CALLS.append("format.write")
        location.fs.makedirs(location.path, exist_ok=True)
        for r in requests:
            (shard,) = r.shards
            location.fs.pipe_file(f"{location.path}/{r.key.replace('/', '__')}.raw", np.ascontiguousarray(shard.data).tobytes())
        return [{"file": r.key.replace("/", "__") + ".raw"} for r in requests]

    def read(self, location, requests, options):
        CALLS.append("format.read")
        out = []
        for r in requests:
            raw = location.fs.cat_file(f"{location.path}/{r.info['file']}")
            whole = np.frombuffer(raw, dtype=r.saved_dtype).reshape(r.shape)
            out.append([np.array(whole[region], dtype=r.dtype) for region in r.regions])
        return out


class DatedLayout:
    def step_name(self, step, prefix, fixed_length):
        return f"day-{step}"

    def parse_step(self, name, prefix):
        return int(name[4:]) if name.startswith("day-") and name[4:].isdigit() else None


class NpyDirLayout:
    """Another system's checkpoint: a directory of ``.npy`` files beside a ``NPYDIR`` marker."""

    def recognize(self, location):
        CALLS.append("layout.recognize")
        return os.path.exists(f"{location.path}/NPYDIR")

    def open(self, location):
        CALLS.append("layout.open")
        items, names = [], sorted(f[:-4] for f in os.listdir(location.path) if f.endswith(".npy"))
        for name in names:
            array = np.load(f"{location.path}/{name}.npy", mmap_mode="r", allow_pickle=False)
            record = {"type": "leaf", "kind": "ndarray", "shape": list(array.shape), "dtype": array.dtype.name,
                      "nbytes": int(array.nbytes), "format": "npydir", "key": name, "format_info": {"file": f"{name}.npy"}}
            items.append({"key": name, "key_type": "str", "value": record})
        tree = {"type": "dict", "items": items}
        return ForeignCheckpoint(index={"tree": tree}, formats={"npydir": NpyDirReader()}, description="npy directory")


    def open_step(self, location):
        """A step of another system's manager root: ``NPYSTEP`` (JSON: metrics, time, committed) beside its items."""
        CALLS.append("layout.open_step")
        marker = f"{location.path}/NPYSTEP"
        if not os.path.exists(marker):
            return None
        with open(marker) as f:
            meta = json.load(f)
        return ForeignStep(items={"default": {"kind": "pytree"}}, metrics=meta.get("metrics"),
                           commit_time=meta.get("time"), committed=meta.get("committed", True), description="npy step")


class NpyDirReader:
    def read(self, location, requests, options):
        CALLS.append("layout.read")
        out = []
        for r in requests:
            whole = np.load(f"{location.path}/{r.info['file']}", mmap_mode="r", allow_pickle=False)
            out.append([np.array(whole[region], dtype=r.dtype) for region in r.regions])
        return out


class NpyDirExporter:
    """Writes a checkpoint as the ``NpyDirLayout`` above: one ``.npy`` per array, named by its key path."""

    def export(self, location, leaves, pieces, options):
        CALLS.append("exporter.export")
        assert options == {"mmap": False}
        os.makedirs(location.path, exist_ok=True)
        names = {i: "__".join(str(k) for k in leaf.path) for i, leaf in enumerate(leaves) if leaf.shape is not None}
        arrays = {i: np.lib.format.open_memmap(f"{location.path}/{names[i]}.npy", "w+", leaves[i].dtype, leaves[i].shape)
                  for i in names}
        for piece in pieces:  # whole arrays or row blocks, in leaf order
            arrays[piece.leaf][piece.region] = piece.data
        for array in arrays.values():
            array.flush()
        (open(f"{location.path}/NPYDIR", "w")).close()
        return {"files": len(arrays)}


class EveryHook:
    @hookimpl
    def ckptcore_storage_backends(self):
        CALLS.append("ckptcore_storage_backends")
        return [StorageRegistration(schemes=("hooktest",), backend=LocalDirBackend())]

    @hookimpl
    def ckptcore_atomicity_strategies(self):
        CALLS.append("ckptcore_atomicity_strategies")
        return [AtomicityRegistration(schemes=("hooktest",), strategy=MarkerCommit(), name="marker")]

    @hookimpl
    def ckptcore_step_layouts(self):
        CALLS.append("ckptcore_step_layouts")
        return [StepLayoutRegistration(name="dated", layout=DatedLayout())]

    @hookimpl
    def ckptcore_array_formats(self):
        CALLS.append("ckptcore_array_formats")
        return [ArrayFormatRegistration(name="raw", format=RawFormat(), version=3)]

    @hookimpl
    def ckptcore_checkpoint_layouts(self):
        CALLS.append("ckptcore_checkpoint_layouts")
        return [CheckpointLayoutRegistration(name="npydir", layout=NpyDirLayout())]

    @hookimpl
    def ckptcore_checkpoint_exporters(self):
        CALLS.append("ckptcore_checkpoint_exporters")
        return [CheckpointExporterRegistration(name="npydir", exporter=NpyDirExporter())]

    @hookimpl
    def ckptcore_default_array_format(self):
        CALLS.append("ckptcore_default_array_format")
        return "raw"

    @hookimpl
    def ckptcore_index_metadata(self, context):
        CALLS.append("ckptcore_index_metadata")
        return {"url": context.url, "formats": list(context.formats), "user": dict(context.user_metadata)}


@pytest.fixture
def every_hook():
    reset_registry()
    CALLS.clear()
    name = ckptcore.register_plugin(EveryHook(), name="every-hook")
    yield name
    reset_registry()


def test_the_test_plugin_implements_every_hook():
    implemented = {n for n in dir(EveryHook) if n.startswith("ckptcore_")}
    assert implemented == set(HOOKS), "a new hook needs an implementation (and an assertion) here"


def test_every_hook_is_exercised(tmp_path, every_hook):
    url = f"hooktest://{tmp_path}/run/ck"
    state = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "nested": {"b": np.ones(2, np.int8)}, "step": 5}
    ckptcore.save(url, state, metadata={"note": "hi"})  # no format=: the default hook picks "raw"
    assert sorted(os.listdir(tmp_path / "run" / "ck")) == ["COMMITTED", "ckptcore_index.json", "raw"]
    back = ckptcore.restore(url)
    np.testing.assert_array_equal(back["w"], state["w"])
    assert back["nested"]["b"].dtype == np.int8 and back["step"] == 5

    info = ckptcore.info(url)
    assert info.array_formats["raw"]["version"] == 3
    assert info.array_formats["raw"]["distribution"] == "(registered in process)"
    assert info.plugin_metadata["every-hook"] == {"url": url, "formats": ["raw"], "user": {"note": "hi"}}
    assert "ckptcore.plugins.builtin" in info.plugin_metadata  # the core's own metadata hook ran beside ours

    # leftovers of a save that never committed are found through the atomicity hook
    os.makedirs(tmp_path / "run" / "half-written")
    assert ckptcore.clean(f"hooktest://{tmp_path}/run") == [f"hooktest://{tmp_path}/run/half-written"]
    assert sorted(os.listdir(tmp_path / "run")) == ["ck"]

    os.makedirs(tmp_path / "exported")
    (tmp_path / "exported" / "NPYDIR").write_text("")
    np.save(tmp_path / "exported" / "w.npy", state["w"])
    np.testing.assert_array_equal(ckptcore.restore(tmp_path / "exported")["w"], state["w"])  # the layout hook

    report = ckptcore.convert(url, tmp_path / "npyout", to="npydir", export_options={"mmap": False})  # the exporter hook
    assert (report.format, report.leaves) == ("npydir", 2) and sorted(os.listdir(tmp_path / "npyout")) == [
        "NPYDIR", "nested__b.npy", "w.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "npyout" / "w.npy"), state["w"])
    np.testing.assert_array_equal(ckptcore.restore(tmp_path / "npyout")["nested__b"], state["nested"]["b"])

    layouts = {r.name: r for r in registry().step_layouts()}
    assert layouts["dated"].layout.parse_step("day-7", None) == 7 and "prefixed" in layouts
    assert layouts["prefixed"].layout.step_name(7, "step", 4) == "step_0007"

    for hook in HOOKS:
        assert hook in CALLS, f"{hook} was never called"
    for method in ("storage.resolve", "atomicity.begin", "atomicity.commit", "atomicity.is_staging",
                   "format.write", "format.read", "atomicity.abort", "exporter.export"):
        assert method in CALLS, method


def test_failed_save_aborts_through_the_strategy(tmp_path, every_hook):
    class Failing(RawFormat):
        def write(self, location, requests, options):
            raise OSError("disk full")

    class FailingFormat:
        @hookimpl
        def ckptcore_array_formats(self):
            return [ArrayFormatRegistration(name="failing", format=Failing())]

    ckptcore.register_plugin(FailingFormat(), name="failing")
    with pytest.raises(ckptcore.errors.StorageError, match="disk full"):
        ckptcore.save(f"hooktest://{tmp_path}/ck", {"a": np.ones(3)}, format="failing")
    assert "atomicity.abort" in CALLS and not (tmp_path / "ck").exists()


def test_a_checkpoint_layout_plugin_reads_another_systems_checkpoint(tmp_path, every_hook):
    foreign = tmp_path / "exported"
    foreign.mkdir()
    (foreign / "NPYDIR").write_text("")
    w = np.arange(24, dtype=np.float32).reshape(4, 6)
    np.save(foreign / "w.npy", w)
    np.save(foreign / "b.npy", np.ones(3, np.int16))
    info = ckptcore.info(foreign)
    assert (info.layout, info.layout_description) == ("npydir", "npy directory")
    assert ckptcore.metadata(foreign)["w"].shape == (4, 6)
    back = ckptcore.restore(foreign)
    np.testing.assert_array_equal(back["w"], w)
    # the same planner as for ckptcore's own checkpoints: partial, casts, shape checks
    part = ckptcore.restore(foreign, target={"w": np.empty((4, 6), np.float64)}, partial=True)
    assert list(part) == ["w"] and part["w"].dtype == np.float64
    np.testing.assert_array_equal(part["w"], w)
    with pytest.raises(ckptcore.errors.TargetMismatchError, match="shape"):
        ckptcore.restore(foreign, target={"w": np.empty((6, 4), np.float32)}, partial=True)
    assert {"ckptcore_checkpoint_layouts", "layout.recognize", "layout.open", "layout.read"} <= set(CALLS)
    # a directory no layout recognizes is still "no checkpoint"
    (tmp_path / "plain").mkdir()
    with pytest.raises(ckptcore.errors.CheckpointNotFoundError, match="not a ckptcore checkpoint"):
        ckptcore.restore(tmp_path / "plain")



def test_a_checkpoint_layout_reads_another_systems_manager_steps(tmp_path, every_hook):
    root = tmp_path / "run"
    for step, loss, committed in ((7, 0.5, True), (8, 0.1, False), (9, 0.9, True)):
        item = root / str(step) / "default"
        item.mkdir(parents=True)
        (item / "NPYDIR").write_text("")
        np.save(item / "w.npy", np.full(3, step, np.float32))
        (root / str(step) / "NPYSTEP").write_text(json.dumps({"metrics": {"loss": loss}, "time": 1e9 + step,
                                                              "committed": committed}))
    opts = ckptcore.CheckpointManagerOptions(max_to_keep=2, best_fn=lambda m: m["loss"], best_mode="min",
                                             enable_async_checkpointing=False)
    with ckptcore.CheckpointManager(root, opts) as mgr:
        assert mgr.all_steps() == [7, 9]  # 8 was never committed
        assert mgr.metrics(7) == {"loss": 0.5} and mgr.best_step() == 7
        assert mgr.step_metadata(9).layout == "npydir" and mgr.step_metadata(9).commit_time.timestamp() == 1e9 + 9
        np.testing.assert_array_equal(mgr.restore(9)["w"], np.full(3, 9, np.float32))
        with pytest.raises(ckptcore.errors.NotCommittedError, match="never committed"):
            mgr.restore(8)
        mgr.save(10, {"w": np.zeros(3, np.float32)}, metrics={"loss": 0.3})  # ckptcore's layout, beside them
        assert mgr.all_steps() == [7, 10]  # retention ranked both layouts: 9 (0.9) went
    assert "layout.open_step" in CALLS and not (root / "9").exists() and (root / "10" / "ckptcore_step.json").exists()
