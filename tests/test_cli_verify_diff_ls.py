"""``ckptcore ls``, ``verify`` and ``diff`` (issue 15, item 6), and the library functions behind them.

Damage is done to real files of real checkpoints: a flipped bit in an uncompressed array
(only ckptcore's CRC-32C can see it), a truncated file, a broken Json item.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckptcore
from ckptcore.cli.main import main
from ckptcore.errors import CheckpointNotFoundError, InvalidOptionError
from ckptcore.storage import locks


def _cli(*args: str) -> subprocess.CompletedProcess:
    script = shutil.which("ckptcore", path=os.path.dirname(sys.executable))
    cmd = [script] if script else [sys.executable, "-m", "ckptcore"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTCORE_")}
    env["COLUMNS"] = "250"
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=120)


def state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "params": {"w": rng.normal(size=(128, 64)).astype(np.float32), "b": rng.normal(size=64).astype(np.float32)},
        "emb": rng.normal(size=(256, 32)),
        "step": 10,
    }


def data_file(path, key: str) -> str:
    """The one chunk file of a zarr3 leaf (the zarr3 format keeps one array per directory)."""
    (found,) = [f for f in glob.glob(f"{path}/zarr3/{key}/c/**", recursive=True) if os.path.isfile(f)]
    return found


def flip_keeping_chunk_crc(path: str, at: int) -> None:
    """Flip one bit of a zarr3 chunk and re-seal its crc32c codec trailer: the format reads it without complaint."""
    import crc32c

    raw = bytearray(open(path, "rb").read())
    raw[at] ^= 0x10
    raw[-4:] = crc32c.crc32c(bytes(raw[:-4])).to_bytes(4, "little")
    open(path, "wb").write(bytes(raw))


def tree_digest(path) -> str:
    h = hashlib.sha256()
    for f in sorted(glob.glob(f"{path}/**", recursive=True)):
        if os.path.isfile(f):
            h.update(f.encode())
            h.update(open(f, "rb").read())
    return h.hexdigest()


@pytest.fixture
def ck(tmp_path):
    path = tmp_path / "ck"
    ckptcore.save(path, state(), format="zarr3", format_options={"compression": "none", "small_bytes": 0})
    return path


# -- verify ------------------------------------------------------------------------------


def test_verify_a_good_checkpoint(ck):
    report = ckptcore.verify(ck)
    assert report.ok and report.leaves == 3
    assert report.bytes == 128 * 64 * 4 + 64 * 4 + 256 * 32 * 8
    r = _cli("verify", str(ck))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: 3 array leaves")


def test_verify_a_bit_flip_and_a_truncated_file_names_each_bad_leaf(ck):
    before_index = (ck / "ckptcore_index.json").read_bytes()
    f = data_file(ck, "params/w")
    flip_keeping_chunk_crc(f, len(open(f, "rb").read()) // 2)  # only ckptcore's per-leaf checksum can tell
    g = data_file(ck, "emb")
    open(g, "wb").write(open(g, "rb").read()[:100])
    damaged = tree_digest(ck)

    report = ckptcore.verify(ck)
    assert not report.ok
    bad = {b.path: b.error for b in report.bad}
    assert set(bad) == {"params/w", "emb"}  # kept going after the first bad leaf; params/b is fine
    assert "checksum mismatch" in bad["params/w"]
    assert "emb" in report.bad[[b.path for b in report.bad].index("emb")].key
    assert report.leaves == 3

    r = _cli("verify", str(ck))
    assert r.returncode == 1
    lines = [line for line in r.stdout.splitlines() if line.startswith("BAD")]
    assert len(lines) == 2 and any(line.startswith("BAD params/w ") for line in lines)
    assert any(line.startswith("BAD emb ") for line in lines)
    assert "2 bad" in r.stdout
    j = _cli("verify", str(ck), "--json")
    assert j.returncode == 1
    doc = json.loads(j.stdout)
    assert doc["ok"] is False and sorted(b["path"] for b in doc["bad"]) == ["emb", "params/w"]
    # verify changed nothing
    assert tree_digest(ck) == damaged and (ck / "ckptcore_index.json").read_bytes() == before_index


def test_verify_reads_in_bounded_waves_with_progress(ck, monkeypatch):
    from ckptcore.io import restore as restore_mod

    waves: list[int] = []
    real = restore_mod._read_wave

    def observed(fmt, location, name, wave):
        waves.append(sum(r.request.dtype.itemsize * restore_mod._region_elements(r.request) for r in wave))
        return real(fmt, location, name, wave)

    monkeypatch.setattr("ckptcore.io.verify._read_wave", observed)
    seen = []
    report = ckptcore.verify(ck, max_bytes_in_flight=40_000, progress=lambda done, total: seen.append((done, total)))
    assert report.ok and sorted(waves) == [128 * 64 * 4 + 64 * 4, 256 * 32 * 8]  # w+b fit 40 kB; emb (64 KiB) alone
    assert seen[-1] == (report.bytes, report.bytes)


def test_verify_sharded_jax_arrays_checks_every_shard(tmp_path):
    mesh = jax.make_mesh((4, 2), ("data", "model"), devices=jax.devices()[:8])
    w = jax.device_put(np.arange(256 * 256, dtype=np.float32).reshape(256, 256), NamedSharding(mesh, P("data", "model")))
    path = tmp_path / "jax"
    ckptcore.save(path, {"w": w}, format="zarr3", format_options={"compression": "none", "small_bytes": 0})
    record = json.loads((path / "ckptcore_index.json").read_text())
    assert "shard_checksums" in json.dumps(record)  # sharded: one checksum per shard
    assert ckptcore.verify(path).ok
    chunks = sorted(f for f in glob.glob(f"{path}/zarr3/w/c/**", recursive=True) if os.path.isfile(f))
    flip_keeping_chunk_crc(chunks[-1], 10)
    report = ckptcore.verify(path)
    assert [b.path for b in report.bad] == ["w"] and "shard" in report.bad[0].error


def test_verify_a_manager_step_and_root(tmp_path):
    root = tmp_path / "run"
    with ckptcore.CheckpointManager(root, ckptcore.CheckpointManagerOptions(enable_async_checkpointing=False)) as mgr:
        mgr.save(1, state(1), metrics={"loss": 2.0})
        mgr.save(2, ckptcore.Composite(state=state(2), config=ckptcore.Json({"lr": 0.1})), metrics={"loss": 1.0})
    report = ckptcore.verify(root)
    assert report.ok and len(report.checkpoints) == 2 and report.leaves == 6
    step2 = root / "2"
    assert ckptcore.verify(step2).ok
    (step2 / "config" / "ckptcore_json.json").write_text("{not json")
    (pad,) = [p for p in glob.glob(f"{step2}/state/ocdbt/d/*") if os.path.getsize(p) > 40_000]
    open(pad, "wb").write(open(pad, "rb").read()[:1000])
    report = ckptcore.verify(step2)
    assert not report.ok
    assert any("config" in e and "not valid JSON" in e for e in report.errors)
    assert report.bad and all(b.path.startswith("state/") for b in report.bad)
    r = _cli("verify", str(root))
    assert r.returncode == 1 and "BAD state/" in r.stdout


def test_verify_nothing_there_is_an_error_exit_2(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        ckptcore.verify(tmp_path / "nope")
    assert main(["verify", str(tmp_path / "nope")]) == 2


# -- diff --------------------------------------------------------------------------------


def test_diff_structure_shapes_dtypes_and_values(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    sa = state(0)
    sb = {
        "params": {"w": sa["params"]["w"] * (1 + 1e-4), "b": sa["params"]["b"].astype(np.float16)},
        "emb": sa["emb"][:128],
        "step": 11,
        "new": np.zeros(2),
    }
    ckptcore.save(a, sa)
    ckptcore.save(b, sb)
    report = ckptcore.diff(a, b)
    changes = {d.path: d.change for d in report.differences}
    assert changes == {"params/b": "dtype", "emb": "shape", "step": "value", "new": "only_in_b"}
    assert not report.same and report.values == []

    report = ckptcore.diff(a, b, values=True, rtol=1e-3)
    values = {v.path: v for v in report.values}
    assert set(values) == {"params/w", "params/b"}  # same shape in both (emb's differs)
    w = values["params/w"]
    expected = float(np.max(np.abs(sa["params"]["w"].astype(np.float64) - sb["params"]["w"].astype(np.float64))))
    assert w.max_abs == pytest.approx(expected) and 0 < w.max_rel <= 1.01e-4 and w.within_tolerance

    r = _cli("diff", str(a), str(b), "--values", "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["same"] is False and {d["path"] for d in doc["differences"]} == set(changes)
    r = _cli("diff", str(a), str(b))
    assert r.returncode == 1
    assert "~ emb: shape ndarray float64 (256, 32) -> ndarray float64 (128, 32)" in r.stdout
    assert "+ new: " in r.stdout


def test_diff_exit_status_follows_atol_rtol(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    x = np.linspace(1, 2, 1000, dtype=np.float32)
    ckptcore.save(a, {"x": x})
    ckptcore.save(b, {"x": x + np.float32(1e-3)})
    assert _cli("diff", str(a), str(b)).returncode == 0  # structure only: the same
    r = _cli("diff", str(a), str(b), "--values")
    assert r.returncode == 1 and "! x: max |a-b| 0.001" in r.stdout
    assert _cli("diff", str(a), str(b), "--values", "--atol", "2e-3").returncode == 0
    assert _cli("diff", str(a), str(b), "--values", "--rtol", "2e-3").returncode == 0
    assert _cli("diff", str(a), str(b), "--values", "--rtol", "1e-4").returncode == 1
    assert main(["diff", str(a), str(a), "--values"]) == 0


def test_diff_of_different_structures(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ckptcore.save(a, {"opt": [np.zeros(3), np.ones(3)], "x": {"y": 1}})
    ckptcore.save(b, {"opt": (np.zeros(3),), "x": np.ones(2)})
    report = ckptcore.diff(a, b, values=True)
    changes = {(d.path, d.change) for d in report.differences}
    assert ("opt", "kind") in changes  # list -> tuple
    assert ("opt/1", "only_in_a") in changes
    assert ("x", "kind") in changes and ("x/y", "only_in_a") in changes
    assert [v.path for v in report.values] == ["opt/0"] and report.values[0].max_abs == 0.0


def test_diff_nans_and_infinities(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ckptcore.save(a, {"x": np.array([np.nan, np.inf, 1.0, 0.0])})
    ckptcore.save(b, {"x": np.array([np.nan, np.inf, 1.0, 0.5])})
    (v,) = ckptcore.diff(a, b, values=True).values
    assert v.max_abs == 0.5 and v.max_rel == 1.0 and not v.within_tolerance
    (v,) = ckptcore.diff(a, a, values=True).values
    assert v.max_abs == 0.0 and v.within_tolerance


def test_diff_two_manager_steps_and_bad_arguments(tmp_path):
    root = tmp_path / "run"
    with ckptcore.CheckpointManager(root, ckptcore.CheckpointManagerOptions(enable_async_checkpointing=False)) as mgr:
        mgr.save(1, state(1))
        mgr.save(2, state(1) | {"step": 20})
    report = ckptcore.diff(root / "1", root / "2", values=True)
    assert [(d.path, d.change) for d in report.differences] == [("default/step", "value")]
    assert all(v.max_abs == 0 for v in report.values) and len(report.values) == 3
    with pytest.raises(InvalidOptionError, match="is a CheckpointManager root"):
        ckptcore.diff(root, root / "1")
    with pytest.raises(InvalidOptionError, match="tolerances"):
        ckptcore.diff(root / "1", root / "2", atol=-1)
    assert main(["diff", str(root), str(root / "1")]) == 2


# -- ls ----------------------------------------------------------------------------------


def test_ls_steps_metrics_best_latest_leases_and_leftovers(tmp_path):
    root = tmp_path / "run"
    opts = ckptcore.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ckptcore.CheckpointManager(root, opts, metadata={"model": "mlp"}) as mgr:
        for step, loss in ((10, 3.0), (20, 1.0), (30, 2.0)):
            mgr.save(step, state(step), metrics={"loss": loss})
    leftover = root / "40.ckptcore-tmp-deadbeef"
    leftover.mkdir()
    lease = locks.acquire_reader_lease(ckptcore.storage.resolve(root), 20, 30.0)
    try:
        run = ckptcore.list_run(root, best_metric="loss")
        assert [s.step for s in run.steps] == [10, 20, 30]
        by_step = {s.step: s for s in run.steps}
        assert by_step[30].latest and not by_step[20].latest
        assert by_step[20].best and not by_step[10].best
        assert by_step[20].protected and not by_step[30].protected
        assert by_step[10].metrics == {"loss": 3.0} and by_step[10].items == ["default"]
        assert by_step[10].bytes == 128 * 64 * 4 + 64 * 4 + 256 * 32 * 8
        assert by_step[10].commit_time and by_step[10].commit_time < by_step[30].commit_time
        assert run.leftovers == [str(leftover)] and run.metadata == {"model": "mlp"}
        assert ckptcore.list_run(root, best_metric="loss", best_mode="max").steps[0].best

        r = _cli("ls", str(root), "--best", "loss")
        assert r.returncode == 0, r.stderr
        rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if line.startswith("│")}
        assert "latest" in rows["30"] and "best" in rows["20"] and "protected" in rows["20"]
        assert "40.ckptcore-tmp-deadbeef" in r.stdout
        doc = json.loads(_cli("ls", str(root), "--json").stdout)
        assert [s["step"] for s in doc["steps"]] == [10, 20, 30] and doc["leftovers"] == [str(leftover)]
        assert [s["protected"] for s in doc["steps"]] == [False, True, False]
    finally:
        lease.release()
    assert not ckptcore.list_run(root).steps[1].protected
    assert leftover.exists()  # ls never cleans


def test_ls_of_a_checkpoint_or_nothing_is_an_error(ck, tmp_path):
    with pytest.raises(InvalidOptionError, match="not a manager root"):
        ckptcore.list_run(ck)
    assert main(["ls", str(tmp_path / "missing")]) == 2
