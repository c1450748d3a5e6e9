"""The layering of the core is checked by import-linter (contracts in pyproject.toml)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(package_parent: Path, config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(config), "--no-cache"], cwd=package_parent, env=env,
        capture_output=True, text=True, timeout=300,
    )


def test_the_contracts_hold() -> None:
    result = _lint(ROOT, ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # tree is the bottom layer: importing the manager from it breaks the layers
        ("tree/keys.py", "from ckptcore.manager import listing", "Layers"),
        # a cycle inside io: plans (imported by leaves) importing leaves back
        ("io/plans.py", "from ckptcore.io import leaves", "No import cycles"),
        # the save walk must never reach the JAX coordinator itself
        ("io/save.py", "from ckptcore.parallel import jax_coordinator", "never enters the JAX coordinator"),
        # the core never imports a plugin distribution
        ("storage/__init__.py", "import ckptcore_posix", "names no plugin distribution"),
    ],
)
def test_a_violation_fails_the_check(tmp_path: Path, module: str, line: str, broken: str) -> None:
    shutil.copytree(ROOT / "ckptcore", tmp_path / "ckptcore", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "ckptcore" / module
    target.write_text(target.read_text() + f"\n{line}  # a deliberate violation\n")
    result = _lint(tmp_path, tmp_path / "pyproject.toml")
    assert result.returncode != 0
    assert "0 broken" not in result.stdout
    broken_section = result.stdout.split("Broken contracts", 1)[1]
    assert broken in broken_section, result.stdout
