"""A third-party plugin, built and pip-installed inside the test, works with no core change (issue 2, item 3).

The distribution ``ckptcore-npydir`` adds an array format (``npy-dir``: one raw file per
leaf, written with fsspec, no pickle) and a storage scheme (``dirfs://``: a directory
named by an environment variable, with marker-file atomicity, as an object store has).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "ckptcore-npydir"
version = "0.3.0"
description = "third-party ckptcore plugin used by ckptcore's tests"
requires-python = ">=3.11"
dependencies = ["ckptcore", "fsspec", "numpy"]

[project.entry-points.ckptcore]
npydir = "ckptcore_npydir"

[tool.hatch.build.targets.wheel]
packages = ["ckptcore_npydir"]
"""

PLUGIN = '''
"""ckptcore-npydir: the npy-dir array format and the dirfs:// scheme."""

import json
import os
import shutil

import numpy as np
from ckptcore import hookimpl
from ckptcore.plugins.address import StorageAddress
from ckptcore.plugins.registrations import ArrayFormatRegistration, AtomicityRegistration, Location, StorageRegistration


class NpyDirFormat:
    """One file per leaf: a JSON header line (dtype, shape) then the raw C-order bytes."""

    def write(self, location, requests, options):
        fs = location.fs
        fs.makedirs(location.path, exist_ok=True)
        infos = []
        for r in requests:
            (shard,) = r.shards
            name = r.key.replace("/", "__") + ".npyraw"
            header = json.dumps({"dtype": r.dtype.str, "shape": list(r.shape)}).encode() + b"\\n"
            with fs.open(f"{location.path}/{name}", "wb") as f:
                f.write(header)
                f.write(np.ascontiguousarray(shard.data).tobytes())
            infos.append({"file": name})
        return infos

    def read(self, location, requests, options):
        out = []
        for r in requests:
            raw = location.fs.cat_file(f"{location.path}/{r.info['file']}")
            header, _, body = raw.partition(b"\\n")
            meta = json.loads(header)
            whole = np.frombuffer(body, dtype=np.dtype(meta["dtype"])).reshape(meta["shape"])
            out.append([np.array(whole[region], dtype=r.dtype) for region in r.regions])
        return out


class DirBackend:
    def resolve(self, url, options):
        from fsspec.implementations.local import LocalFileSystem

        root = os.environ["NPYDIR_ROOT"]
        path = os.path.join(root, url.split("://", 1)[1].strip("/")).rstrip("/")
        return Location(url=url, scheme="dirfs", fs=LocalFileSystem(), path=path,
                        address=StorageAddress(scheme="file", path=path + "/"), options=dict(options))


class MarkerCommit:
    def begin(self, final):
        final.fs.makedirs(final.path, exist_ok=True)
        return final

    def commit(self, staging, final, *, replace):
        final.fs.pipe_file(final.path + "/COMMITTED", b"")

    def abort(self, staging):
        shutil.rmtree(staging.path, ignore_errors=True)

    def is_committed(self, location):
        return os.path.exists(location.path + "/COMMITTED")

    def is_staging(self, location):
        return os.path.isdir(location.path) and not self.is_committed(location)

    def delete(self, location):
        os.remove(location.path + "/COMMITTED")
        shutil.rmtree(location.path)


@hookimpl
def ckptcore_array_formats():
    return [ArrayFormatRegistration(name="npy-dir", format=NpyDirFormat(), version=1)]


@hookimpl
def ckptcore_storage_backends():
    return [StorageRegistration(schemes=("dirfs",), backend=DirBackend())]


@hookimpl
def ckptcore_atomicity_strategies():
    return [AtomicityRegistration(schemes=("dirfs",), strategy=MarkerCommit(), name="marker")]
'''

USE_IT = """
import json, sys
import numpy as np
import ckptcore

state = {"params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.int16)},
         "step": 7, "name": "third-party"}
ckptcore.save("dirfs://runs/ck", state, format="npy-dir")
back = ckptcore.restore("dirfs://runs/ck")
assert np.array_equal(back["params"]["w"], state["params"]["w"]) and back["params"]["b"].dtype == np.int16
part = ckptcore.restore("dirfs://runs/ck", {"params": {"w": np.empty((3, 4), np.float64)}}, partial=True)
assert part["params"]["w"].dtype == np.float64 and part["params"]["w"][2, 3] == 11
# the plugin's format also works on the core's own local storage, and the core's formats on its storage
ckptcore.save(sys.argv[1], state, format="npy-dir")
assert ckptcore.restore(sys.argv[1])["step"] == 7
ckptcore.save("dirfs://runs/ocdbt", state)
assert ckptcore.restore("dirfs://runs/ocdbt")["params"]["w"].sum() == 66
info = ckptcore.info("dirfs://runs/ck")
print(json.dumps({"formats": info.array_formats, "meta_shape": list(ckptcore.metadata("dirfs://runs/ck")["params"]["w"].shape)}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Build and pip-install the distribution into a private --target directory."""
    src = tmp_path_factory.mktemp("npydir-src")
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "ckptcore_npydir").mkdir()
    (src / "ckptcore_npydir" / "__init__.py").write_text(PLUGIN)
    target = tmp_path_factory.mktemp("npydir-site")
    if importlib.util.find_spec("hatchling") is not None:
        # --no-build-isolation: no network needed, the build backend is already here.
        out = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
             "--target", str(target), str(src)],
            capture_output=True, text=True, timeout=300,
        )
        assert out.returncode == 0, out.stdout + out.stderr
    else:
        # No build backend in this environment: install by hand what pip would, a real .dist-info.
        shutil.copytree(src / "ckptcore_npydir", target / "ckptcore_npydir")
        info = target / "ckptcore_npydir-0.3.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ckptcore-npydir\nVersion: 0.3.0\n")
        (info / "entry_points.txt").write_text("[ckptcore]\nnpydir = ckptcore_npydir\n")
    assert list(target.glob("ckptcore_npydir-0.3.0.dist-info/entry_points.txt"))
    return target


def _env(site, root):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTCORE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["NPYDIR_ROOT"] = str(root)
    return env


def test_saves_and_restores_through_the_installed_plugin(installed, tmp_path):
    root = tmp_path / "dirfs-root"
    root.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", USE_IT, str(tmp_path / "local")], capture_output=True, text=True,
        env=_env(installed, root), timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["formats"]["npy-dir"]["distribution"] == "ckptcore-npydir"
    assert result["formats"]["npy-dir"]["plugin_version"] == "0.3.0"
    assert result["meta_shape"] == [3, 4]
    ck = root / "runs" / "ck"
    assert (ck / "COMMITTED").exists()
    assert sorted(os.listdir(ck / "npy-dir")) == ["params__b.npyraw", "params__w.npyraw"]
    header = (ck / "npy-dir" / "params__w.npyraw").read_bytes().split(b"\n", 1)[0]
    assert json.loads(header) == {"dtype": "<f4", "shape": [3, 4]}
    assert (tmp_path / "local" / "npy-dir").is_dir()
    assert (root / "runs" / "ocdbt" / "ocdbt").is_dir()


def test_cli_lists_and_inspects_it(installed, tmp_path):
    root = tmp_path / "dirfs-root"
    root.mkdir()
    env = _env(installed, root)
    subprocess.run([sys.executable, "-c", USE_IT, str(tmp_path / "local")], check=True, env=env, timeout=300,
                   capture_output=True)
    out = subprocess.run([sys.executable, "-m", "ckptcore", "plugins", "--json"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    plugins = {p["name"]: p for p in json.loads(out.stdout)}
    assert plugins["npydir"]["distribution"] == "ckptcore-npydir"
    assert plugins["npydir"]["version"] == "0.3.0" and plugins["npydir"]["status"] == "loaded"
    assert set(plugins["npydir"]["hooks"]) == {
        "ckptcore_array_formats", "ckptcore_storage_backends", "ckptcore_atomicity_strategies"}
    out = subprocess.run([sys.executable, "-m", "ckptcore", "inspect", "dirfs://runs/ck", "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    leaves = {leaf["path"]: leaf for leaf in summary["leaves"]}
    assert leaves["['params']['w']"]["format"] == "npy-dir"
    assert leaves["['name']"]["value"] == "third-party"


def test_blocking_it_gives_an_actionable_error(installed, tmp_path):
    root = tmp_path / "dirfs-root"
    root.mkdir()
    env = _env(installed, root)
    subprocess.run([sys.executable, "-c", USE_IT, str(tmp_path / "local")], check=True, env=env, timeout=300,
                   capture_output=True)
    code = textwrap.dedent(
        f"""
        import ckptcore
        try:
            ckptcore.restore({str(tmp_path / "local")!r})
        except ckptcore.errors.MissingPluginError as exc:
            print("MISSING:", exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "CKPTCORE_BLOCK_PLUGINS": "npydir"}, timeout=120)
    assert "MISSING:" in out.stdout and "npy-dir" in out.stdout, out.stdout + out.stderr
    assert "ckptcore-npydir 0.3.0" in out.stdout
