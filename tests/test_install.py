"""Publishable distributions (issue 12): versions and ranges agree, and built wheels install by name.

The fast tests read the pyproject files of every distribution in the repository. The slow
ones build the wheels, create fresh virtual environments, install ``ckptcore[gcs,s3]`` and
the plugin template **by name** from the wheel directory (third-party dependencies come
from the package index as usual), and use them there with nothing from the checkout on
``sys.path``: ``ckptcore plugins --json``, save/restore on local disk, ``gs://``
(fake-gcs-server) and ``s3://`` (moto_server), and the missing-plugin hint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "examples" / "plugin-template"


def _pyproject(path: Path) -> dict:
    return tomllib.loads((path / "pyproject.toml").read_text())["project"]


def distribution_dirs() -> list[Path]:
    """Every distribution this repository publishes: the core, the plugins, ckptcore-testing."""
    dirs = [ROOT, *sorted(p.parent for p in ROOT.glob("plugins/*/pyproject.toml"))]
    if (ROOT / "testing" / "pyproject.toml").exists():
        dirs.append(ROOT / "testing")
    return dirs


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(project: dict) -> list[str]:
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    return reqs


# -- versions and ranges ---------------------------------------------------------------


def test_every_distribution_shares_the_release_number():
    version = _pyproject(ROOT)["version"]
    versions = {_pyproject(d)["name"]: _pyproject(d)["version"] for d in distribution_dirs()}
    assert {"ckptcore", "ckptcore-posix", "ckptcore-zarr3", "ckptcore-gcs", "ckptcore-s3"} <= set(versions)
    assert all(v == version for v in versions.values()), (
        f"every distribution's [project].version must be {version} (the root pyproject's): {versions}"
    )


def test_the_core_reports_the_release_number_at_run_time():
    import ckptcore

    assert ckptcore.__version__ == _pyproject(ROOT)["version"], (
        "ckptcore.__version__ must equal [project].version in pyproject.toml"
    )


def test_dependencies_between_distributions_are_by_name_with_the_release_series_range():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    version = Version(_pyproject(ROOT)["version"])
    series = SpecifierSet(f">={version.major}.{version.minor},<{version.major}.{version.minor + 1}")
    ours = {_norm(_pyproject(d)["name"]) for d in distribution_dirs()}
    seen = []
    for d in distribution_dirs():
        project = _pyproject(d)
        for line in _requirements(project):
            req = Requirement(line)
            if _norm(req.name) not in ours:
                continue
            assert req.url is None, f"{project['name']}: {line!r} is a direct reference; depend by name"
            if _norm(req.name) == _norm(project["name"]):
                assert not req.specifier, f"{project['name']}: a self-reference needs no range: {line!r}"
                continue
            assert req.specifier == series, f"{project['name']}: {line!r} must read {req.name}{series}"
            seen.append((project["name"], _norm(req.name)))
    # the core needs its default plugins and offers the others as extras
    for plugin in ("ckptcore-posix", "ckptcore-zarr3", "ckptcore-gcs", "ckptcore-s3"):
        assert ("ckptcore", plugin) in seen
    if (ROOT / "testing" / "pyproject.toml").exists():
        assert ("ckptcore", "ckptcore-testing") in seen, "the test extra installs ckptcore-testing"


def test_every_plugin_declares_the_core_range_it_works_with():
    from packaging.requirements import Requirement
    from packaging.version import Version

    version = Version(_pyproject(ROOT)["version"])
    for d in [*sorted(p.parent for p in ROOT.glob("plugins/*/pyproject.toml")), TEMPLATE]:
        project = _pyproject(d)
        assert project.get("entry-points", {}).get("ckptcore"), f"{d}: no [project.entry-points.ckptcore]"
        cores = [Requirement(r) for r in project["dependencies"] if _norm(Requirement(r).name) == "ckptcore"]
        assert cores and all(c.specifier for c in cores), f"{project['name']}: depend on ckptcore with a range"
        assert all(c.specifier.contains(version, prereleases=True) for c in cores), (
            f"{project['name']}: its ckptcore range excludes this release ({version})"
        )


def test_the_developer_install_names_every_distribution():
    lines = [ln.strip() for ln in (ROOT / "requirements-dev.txt").read_text().splitlines()]
    editable = {ln.split()[1].split("[")[0].rstrip("/") for ln in lines if ln.startswith("-e ")}
    for d in distribution_dirs():
        rel = "." if d == ROOT else f"./{d.relative_to(ROOT).as_posix()}"
        assert rel in editable, f"requirements-dev.txt lacks -e {rel}"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(python3 -m venv .venv && [^\n]+)\n```", readme)
    assert len(commands) == 2, "the README's 'Two commands' are the first two venv one-liners"
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
    assert ci == [commands[1]]


# -- built wheels in fresh environments ------------------------------------------------


def _run(argv: list[str], *, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert out.returncode == 0, f"{' '.join(map(str, argv))}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """Wheels of every distribution and of the plugin template, built from this checkout."""
    pytest.importorskip("hatchling", reason="building wheels without network needs hatchling (the test extra)")
    wheels = tmp_path_factory.mktemp("wheels")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
          "--wheel-dir", str(wheels), *map(str, distribution_dirs()), str(TEMPLATE)])
    return wheels


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        return z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()


@pytest.mark.slow
def test_wheels_carry_no_direct_references_no_tests_and_no_test_helpers(wheelhouse):
    version = _pyproject(ROOT)["version"]
    names = {w.name.split("-")[0] for w in wheelhouse.glob("*.whl")}
    assert {"ckptcore", "ckptcore_posix", "ckptcore_zarr3", "ckptcore_gcs", "ckptcore_s3", "ckptcore_npy"} <= names
    for wheel in wheelhouse.glob("*.whl"):
        meta = _metadata(wheel)
        requires = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
        assert not [r for r in requires if " @ " in r or "file:" in r], f"{wheel.name}: {requires}"
        with zipfile.ZipFile(wheel) as z:
            files = z.namelist()
        assert not [f for f in files if re.search(r"(^|/)(tests?|conftest\.py)(/|$)", f)], f"{wheel.name}: {files}"
        if wheel.name.startswith("ckptcore-") and not wheel.name.startswith("ckptcore_npy"):
            assert f"-{version}-" in wheel.name
    (core,) = wheelhouse.glob(f"ckptcore-{version}-*.whl")
    with zipfile.ZipFile(core) as z:
        assert not [f for f in z.namelist() if f.startswith("ckptcore/testing/")]
    requires = [ln for ln in _metadata(core).splitlines() if ln.startswith("Requires-Dist: ckptcore")]
    assert "Requires-Dist: ckptcore-posix<0.3,>=0.2" in requires or "Requires-Dist: ckptcore-posix>=0.2,<0.3" in requires


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment (with the emulator variables the fixtures set), minus the checkout."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONSAFEPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("CKPTCORE_")}
    env.update(extra)
    return env


def _fresh_venv(path: Path, wheelhouse: Path, *requirements: str) -> Path:
    """A new virtual environment with ``requirements`` installed by name; returns its python."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], timeout=120)
    python = path / "bin" / "python"
    # pip runs from this environment but installs into the fresh one (pip --python), which
    # saves installing pip itself; pip's cache keeps the index downloads fast.
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
          "--find-links", str(wheelhouse), *requirements], cwd=path, env=_clean_env())
    return python


@pytest.fixture(scope="module")
def cloud_env(tmp_path_factory, wheelhouse) -> Path:
    """A fresh environment with ``ckptcore[gcs,s3]`` and the plugin template, by name."""
    return _fresh_venv(tmp_path_factory.mktemp("venv-cloud"), wheelhouse, "ckptcore[gcs,s3]", "ckptcore-npy[test]")


def _in_env(python: Path, code: str, *args: str, cwd: Path, env: dict[str, str]) -> str:
    return _run([str(python), "-I", "-c", textwrap.dedent(code), *args], cwd=cwd, env=env, timeout=300).stdout


WHERE_FROM = """
import json, sys, ckptcore, ckptcore_posix
print(json.dumps({"core": ckptcore.__file__, "posix": ckptcore_posix.__file__, "path": sys.path,
                  "version": ckptcore.__version__}))
"""


@pytest.mark.slow
def test_the_fresh_environment_uses_nothing_from_the_checkout(cloud_env, tmp_path):
    where = json.loads(_in_env(cloud_env, WHERE_FROM, cwd=tmp_path, env=_clean_env()).strip().splitlines()[-1])
    venv = str(cloud_env.parent.parent)
    assert where["core"].startswith(venv) and where["posix"].startswith(venv)
    assert not [p for p in where["path"] if p.startswith(str(ROOT))]


@pytest.mark.slow
def test_ckptcore_plugins_lists_every_installed_plugin_with_its_version(cloud_env, tmp_path):
    version = _pyproject(ROOT)["version"]
    out = _run([str(cloud_env.parent / "ckptcore"), "plugins", "--json"], cwd=tmp_path, env=_clean_env(), timeout=120)
    plugins = {p["name"]: p for p in json.loads(out.stdout)}
    for name in ("posix", "zarr3", "gcs", "s3"):
        assert plugins[name]["distribution"] == f"ckptcore-{name}"
        assert plugins[name]["version"] == version and plugins[name]["status"] == "loaded", plugins[name]
    assert plugins["npy"]["distribution"] == "ckptcore-npy" and plugins["npy"]["version"] == "0.1.0"
    assert plugins["npy"]["status"] == "loaded"


SAVE_RESTORE = """
import json, sys
import numpy as np
import ckptcore

state = {"params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.int16)},
         "step": 3, "name": "fresh env"}
done = []
for url in sys.argv[1:]:
    for fmt in ("ocdbt", "npy"):
        where = f"{url}/{fmt}"
        ckptcore.save(where, state, format=fmt)
        back = ckptcore.restore(where)
        assert np.array_equal(back["params"]["w"], state["params"]["w"]), where
        assert back["params"]["b"].dtype == np.int16 and back["step"] == 3 and back["name"] == "fresh env", where
        assert fmt in ckptcore.info(where).array_formats, where
        done.append(where)
print(json.dumps(done))
"""


@pytest.mark.slow
def test_save_and_restore_on_disk_gcs_and_s3(cloud_env, tmp_path, gcs_bucket, s3_bucket):
    env = _clean_env()
    for key in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "NO_GCE_CHECK",
                "GCE_METADATA_HOST", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        assert env.get(key), f"{key} must point the fresh environment's clients at the emulators"
    for key in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "AWS_ENDPOINT_URL"):
        assert env[key].startswith("http://127.0.0.1:"), (key, env[key])
    urls = [str(tmp_path / "local"), f"gs://{gcs_bucket}/run", f"s3://{s3_bucket}/run"]
    out = _in_env(cloud_env, SAVE_RESTORE, *urls, cwd=tmp_path, env=env)
    assert json.loads(out.strip().splitlines()[-1]) == [f"{u}/{f}" for u in urls for f in ("ocdbt", "npy")]


@pytest.mark.slow
def test_the_plugin_templates_own_tests_pass_against_the_installed_wheels(cloud_env, tmp_path):
    # A copy, so that no conftest.py or pyproject of this checkout is in play.
    shutil.copytree(TEMPLATE / "tests", tmp_path / "tests")
    out = subprocess.run([str(cloud_env), "-I", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


MISSING_GCS = """
import numpy as np, ckptcore
try:
    ckptcore.save("gs://some-bucket/run", {"w": np.ones(3)})
except ckptcore.errors.MissingPluginError as exc:
    print("MISSING:", exc)
"""


@pytest.mark.slow
def test_plain_ckptcore_gives_the_pip_hint_for_gs(tmp_path_factory, wheelhouse, tmp_path):
    python = _fresh_venv(tmp_path_factory.mktemp("venv-plain"), wheelhouse, "ckptcore")
    out = _run([str(python.parent / "ckptcore"), "plugins", "--json"], cwd=tmp_path, env=_clean_env(), timeout=120)
    assert {p["name"] for p in json.loads(out.stdout) if p["status"] == "loaded"} == {"posix", "zarr3"}
    # Loopback-only variables even though no client should be created: nothing may leave 127.0.0.1.
    env = _clean_env(STORAGE_EMULATOR_HOST="http://127.0.0.1:9", TENSORSTORE_GCS_HTTP_URL="http://127.0.0.1:9",
                     GOOGLE_AUTH_TOKEN_FOR_TESTING="x", NO_GCE_CHECK="true", GCE_METADATA_HOST="127.0.0.1:9")
    out = _in_env(python, MISSING_GCS, cwd=tmp_path, env=env)
    assert "MISSING:" in out and "pip install 'ckptcore[gcs]'" in out, out
