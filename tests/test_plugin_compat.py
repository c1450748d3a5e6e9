"""A plugin's declared core range against the running core (issue 12, item 6)."""

from __future__ import annotations

from importlib import metadata as importlib_metadata

import pytest

from ckptcore.plugins.compat import core_range_excludes


def _dist(tmp_path, *requires: str, name: str = "ckptcore-example", version: str = "0.2.0"):
    info = tmp_path / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    return importlib_metadata.PathDistribution(info)


@pytest.mark.parametrize("core", ["0.2.0", "0.2.7", "0.2.1.dev3", "0.2.1rc1+local"])
def test_a_core_inside_the_range_is_compatible(tmp_path, core):
    dist = _dist(tmp_path, "ckptcore>=0.2,<0.3", "numpy>=1.26")
    assert core_range_excludes(dist, core) is None


@pytest.mark.parametrize("core", ["0.1.9", "0.3.0", "1.0", "0.3.0.dev0"])
def test_a_core_outside_the_range_is_named_with_the_range(tmp_path, core):
    dist = _dist(tmp_path, "ckptcore>=0.2,<0.3", name="ckptcore-npy", version="0.2.4")
    reason = core_range_excludes(dist, core)
    assert reason is not None
    assert reason.startswith("ckptcore-npy 0.2.4 requires ckptcore")
    assert ">=0.2" in reason and "<0.3" in reason and reason.endswith(f"this is ckptcore {core}")


def test_no_declared_range_is_compatible(tmp_path):
    assert core_range_excludes(_dist(tmp_path, "numpy", "fsspec>=2024"), "0.2.0") is None
    assert core_range_excludes(_dist(tmp_path / "..", name="ckptcore-bare"), "0.2.0") is None


def test_an_unpinned_core_requirement_is_compatible(tmp_path):
    assert core_range_excludes(_dist(tmp_path, "ckptcore"), "0.2.0") is None


def test_names_are_normalized_and_extras_of_the_core_count(tmp_path):
    dist = _dist(tmp_path, "CkptCore[jax] >=0.5")
    assert core_range_excludes(dist, "0.2.0") is not None
    assert core_range_excludes(_dist(tmp_path / "..", "ckptcore-zarr3>=9", name="ckptcore-x"), "0.2.0") is None


def test_requirements_behind_an_extra_or_a_false_marker_do_not_count(tmp_path):
    dist = _dist(tmp_path, "ckptcore>=0.2,<0.3", 'ckptcore>=9 ; extra == "future"',
                 'ckptcore<0.1 ; python_version < "3"')
    assert core_range_excludes(dist, "0.2.0") is None


def test_every_unconditional_range_must_hold(tmp_path):
    dist = _dist(tmp_path, "ckptcore>=0.2", 'ckptcore<0.2.5 ; python_version >= "3"')
    assert core_range_excludes(dist, "0.2.1") is None
    assert core_range_excludes(dist, "0.2.5") is not None


@pytest.mark.parametrize("core", ["0+unknown", "not a version", ""])
def test_an_unknown_core_version_gives_the_benefit_of_the_doubt(tmp_path, core):
    assert core_range_excludes(_dist(tmp_path, "ckptcore>=0.2,<0.3"), core) is None


def test_unparsable_requirement_lines_are_skipped(tmp_path):
    dist = _dist(tmp_path, "this is not a requirement ;;", "ckptcore>=0.2,<0.3")
    assert core_range_excludes(dist, "0.2.0") is None
    assert core_range_excludes(dist, "0.4.0") is not None
