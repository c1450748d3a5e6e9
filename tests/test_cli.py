"""The ``ckptcore`` command: plugins, inspect, clean, python -m ckptcore, and its error exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import ckptcore
from ckptcore.cli.main import main


def _cli(*args: str) -> subprocess.CompletedProcess:
    """Run the installed console script (falls back to ``python -m ckptcore`` if not on PATH)."""
    script = shutil.which("ckptcore", path=os.path.dirname(sys.executable))
    cmd = [script] if script else [sys.executable, "-m", "ckptcore"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTCORE_")}
    env["COLUMNS"] = "250"  # rich tables: no wrapping in the assertions below
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "ck"
    state = {
        "params": {"w": np.ones((256, 128), np.float32), "b": np.zeros(3, ml_dtypes.bfloat16)},
        "step": 1200, "lr": 3e-4, "name": "run-7", "blob": b"\x00\x01", "ratio": float("nan"),
        "z": 1 + 2j, "count": np.int64(5), "half": np.float16(0.5), "flag": True, "opt": None,
    }
    ckptcore.save(path, state, metadata={"run": "r7"})
    return path


def test_plugins_table_and_json():
    out = _cli("plugins")
    assert out.returncode == 0, out.stderr
    for text in ("posix", "ckptcore-posix", "zarr3", "ckptcore-zarr3", "loaded", "ckptcore_array_formats"):
        assert text in out.stdout
    out = _cli("plugins", "--json")
    plugins = {p["name"]: p for p in json.loads(out.stdout)}
    assert plugins["zarr3"]["distribution"] == "ckptcore-zarr3" and plugins["zarr3"]["status"] == "loaded"
    assert "ckptcore_default_array_format" in plugins["zarr3"]["hooks"]
    assert plugins["posix"]["version"] and set(plugins["posix"]) == {"name", "distribution", "version", "hooks", "status"}


def test_inspect_json(checkpoint):
    out = _cli("inspect", str(checkpoint), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)  # strict JSON: no NaN literal
    assert summary["url"] == str(checkpoint) and summary["metadata"] == {"run": "r7"}
    assert summary["total_bytes"] == 256 * 128 * 4 + 3 * 2 and "ocdbt" in summary["array_formats"]
    leaves = {leaf["path"]: leaf for leaf in summary["leaves"]}
    w = leaves["['params']['w']"]
    assert (w["shape"], w["dtype"], w["bytes"], w["format"], w["kind"]) == ([256, 128], "float32", 131072, "ocdbt", "ndarray")
    assert leaves["['params']['b']"]["dtype"] == "bfloat16"
    # scalars are shown decoded, not in their stored hex/base64 form
    assert leaves["['step']"]["value"] == 1200
    assert leaves["['lr']"]["value"] == 3e-4
    assert leaves["['name']"]["value"] == "run-7"
    assert leaves["['blob']"]["value"] == repr(b"\x00\x01")
    assert leaves["['ratio']"]["value"] == "nan"
    assert leaves["['z']"]["value"] == "(1+2j)"
    assert leaves["['count']"]["value"] == 5 and leaves["['count']"]["dtype"] == "int64"
    assert leaves["['half']"]["value"] == 0.5 and leaves["['half']"]["dtype"] == "float16"
    assert leaves["['flag']"]["value"] is True


def test_inspect_table(checkpoint):
    out = _cli("inspect", str(checkpoint))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for expected in ("['params']['w']", "(256, 128)", "float32", "128.0 KiB", "ocdbt", "run-7", "0.0003", "1200",
                     "b'\\x00\\x01'", "nan", "(1+2j)", "ckptcore-zarr3", '"run": "r7"'):
        assert expected in text, expected
    assert "0x1.3a92a30553261p-12" not in text  # not the stored hex form of 3e-4


def test_inspect_does_not_import_tensorstore(checkpoint):
    code = ("import sys; from ckptcore.cli import main; rc = main(['inspect', sys.argv[1], '--json']); "
            "assert rc == 0; assert 'tensorstore' not in sys.modules and 'jax' not in sys.modules, 'heavy import'")
    out = subprocess.run([sys.executable, "-c", code, str(checkpoint)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("args", [("inspect", "{tmp}/missing"), ("inspect", "{tmp}/missing", "--json")])
def test_missing_checkpoint_exits_2_with_a_clear_message(tmp_path, args):
    out = _cli(*(a.format(tmp=tmp_path) for a in args))
    assert out.returncode == 2
    assert "CheckpointNotFoundError" in out.stderr and str(tmp_path / "missing") in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_corrupt_and_uncommitted_exit_2(tmp_path, checkpoint):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    (bad / "ckptcore_index.json").write_text("{not json")
    assert main(["inspect", str(bad)]) == 2
    staging = tmp_path / "ck.ckptcore-tmp-x"
    shutil.copytree(checkpoint, staging)
    out = _cli("inspect", str(staging))
    assert out.returncode == 2 and "NotCommittedError" in out.stderr


def test_missing_plugin_exits_2(tmp_path):
    env_out = subprocess.run(
        [sys.executable, "-m", "ckptcore", "inspect", "gs://bucket/ck"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "CKPTCORE_PLUGINS": "posix,zarr3"},
    )
    assert env_out.returncode == 2 and "pip install 'ckptcore[gcs]'" in env_out.stderr


def test_clean(tmp_path, checkpoint):
    parent = tmp_path / "run"
    shutil.copytree(checkpoint, parent / "ck")
    shutil.copytree(checkpoint, parent / "ck.ckptcore-tmp-host-1-abc")
    (parent / "ck.ckptcore-deleting-123").mkdir()
    out = _cli("clean", str(parent))
    assert out.returncode == 0, out.stderr
    assert sorted(line for line in out.stdout.splitlines()) == sorted(
        [f"removed {parent / 'ck.ckptcore-deleting-123'}", f"removed {parent / 'ck.ckptcore-tmp-host-1-abc'}"])
    assert sorted(os.listdir(parent)) == ["ck"]
    assert _cli("clean", str(parent)).stdout == ""


def test_usage_errors_and_python_m():
    out = subprocess.run([sys.executable, "-m", "ckptcore", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "plugins" in out.stdout and "inspect" in out.stdout and "clean" in out.stdout
    out = subprocess.run([sys.executable, "-m", "ckptcore", "nonsense"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_inspect_shows_none_and_empty_containers_and_json_tree(tmp_path):
    path = tmp_path / "ck"
    ckptcore.save(path, {"w": np.ones(3, np.float32), "opt": None, "extra": {}})
    table = subprocess.run([sys.executable, "-m", "ckptcore", "inspect", str(path)], capture_output=True, text=True)
    assert table.returncode == 0
    assert "['opt']" in table.stdout and "None" in table.stdout and "empty dict" in table.stdout
    doc = json.loads(
        subprocess.run([sys.executable, "-m", "ckptcore", "inspect", str(path), "--json"], capture_output=True, text=True).stdout
    )
    assert [item["key"] for item in doc["tree"]["items"]] == ["w", "opt", "extra"]
    assert doc["tree"]["items"][1]["value"] == {"type": "none"}


def test_inspect_of_a_manager_step_points_at_its_items(tmp_path):
    with ckptcore.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(3, {"a": np.ones(2)})
    out = subprocess.run([sys.executable, "-m", "ckptcore", "inspect", str(tmp_path / "run" / "3")], capture_output=True, text=True)
    assert out.returncode == 2 and "CheckpointManager step" in out.stderr and str(tmp_path / "run" / "3" / "default") in out.stderr


def test_clean_of_a_missing_directory_is_an_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ckptcore", "clean", str(tmp_path / "nope")], capture_output=True, text=True)
    assert out.returncode == 2 and "missing, not a directory" in out.stderr
