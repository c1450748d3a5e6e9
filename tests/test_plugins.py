"""The plugin manager: lazy entry-point loading, environment switches, failures, conflicts (issue 2, item 2)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ckptcore
from ckptcore import errors, hookimpl
from ckptcore.plugins.manager import registry, reset_registry
from ckptcore.plugins.registrations import ArrayFormatRegistration, StorageRegistration


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Each test starts and ends with a registry reloaded from the real entry points."""
    for var in ("CKPTCORE_DISABLE_PLUGIN_AUTOLOAD", "CKPTCORE_PLUGINS", "CKPTCORE_BLOCK_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    reset_registry()
    yield
    reset_registry()


def fake_distribution(root, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """A real installed distribution (a ``.dist-info`` with ``entry_points.txt``) under ``root``."""
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(
        "[ckptcore]\n" + "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    )
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory on sys.path where tests install fake distributions."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    yield root
    importlib.invalidate_caches()
    for name in [m for m in sys.modules if m.startswith("fake_ckpt_")]:
        del sys.modules[name]


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTCORE_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env,
                          timeout=120)


def test_import_does_not_load_plugins_and_first_use_does():
    out = _run(
        """
        import sys, json
        import ckptcore
        before = sorted(m for m in sys.modules if m.startswith(("ckptcore_", "pluggy", "ckptcore.plugins.manager")))
        infos = ckptcore.list_plugins()
        after = sorted(m for m in sys.modules if m.startswith("ckptcore_"))
        print(json.dumps({"before": before, "after": after, "ts": "tensorstore" in sys.modules,
                          "names": {i.name: i.status for i in infos}}))
        """
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["before"] == []
    assert "ckptcore_posix" in result["after"] and "ckptcore_zarr3" in result["after"]
    assert result["ts"] is False  # loading the zarr3 plugin does not import TensorStore
    assert result["names"]["posix"] == "loaded" and result["names"]["zarr3"] == "loaded"
    assert result["names"]["ckptcore.plugins.builtin"] == "builtin"


def test_disable_autoload_then_register_in_process(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTCORE_DISABLE_PLUGIN_AUTOLOAD", "1")
    reset_registry()
    assert [i.name for i in ckptcore.list_plugins()] == ["ckptcore.plugins.builtin"]
    with pytest.raises(errors.MissingPluginError, match=r"pip install ckptcore-posix.*CKPTCORE_DISABLE_PLUGIN_AUTOLOAD is set"):
        ckptcore.save(tmp_path / "ck", {"a": 1})
    assert not (tmp_path / "ck").exists()

    import ckptcore_posix
    import ckptcore_zarr3

    assert ckptcore.register_plugin(ckptcore_posix, name="posix") == "posix"
    ckptcore.save(tmp_path / "scalars", {"a": 1})  # no array: no array format needed
    with pytest.raises(errors.MissingPluginError, match="no array format plugin"):
        ckptcore.save(tmp_path / "arrays", {"a": np.ones(3)})
    assert not (tmp_path / "arrays").exists()
    ckptcore.register_plugin(ckptcore_zarr3, name="zarr3")
    ckptcore.save(tmp_path / "arrays", {"a": np.ones(3)})
    assert ckptcore.restore(tmp_path / "arrays")["a"].sum() == 3
    statuses = {i.name: i.status for i in ckptcore.list_plugins()}
    assert statuses == {"ckptcore.plugins.builtin": "builtin", "posix": "registered", "zarr3": "registered"}
    ckptcore.unregister_plugin("zarr3")
    with pytest.raises(errors.MissingPluginError, match="ocdbt"):
        ckptcore.restore(tmp_path / "arrays")
    assert ckptcore.restore(tmp_path / "scalars") == {"a": 1}


def test_allow_list(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTCORE_PLUGINS", "posix")
    reset_registry()
    statuses = {i.name: i.status for i in ckptcore.list_plugins()}
    assert statuses["posix"] == "loaded" and statuses["zarr3"] == "not allowed"
    ckptcore.save(tmp_path / "ck", {"a": "scalars only"})
    with pytest.raises(errors.MissingPluginError):
        ckptcore.save(tmp_path / "ck2", {"a": np.ones(2)})


def test_block_list(monkeypatch):
    monkeypatch.setenv("CKPTCORE_BLOCK_PLUGINS", " zarr3 , nothing-such ")
    reset_registry()
    statuses = {i.name: i.status for i in ckptcore.list_plugins()}
    assert statuses["zarr3"] == "blocked" and statuses["posix"] == "loaded"
    with pytest.raises(errors.MissingPluginError, match="zarr3"):
        registry().array_format("zarr3")


def test_env_switches_in_a_fresh_process():
    out = _run(
        "import ckptcore, json; print(json.dumps({i.name: i.status for i in ckptcore.list_plugins()}))",
        CKPTCORE_BLOCK_PLUGINS="posix",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["posix"] == "blocked"
    out = _run(
        "import ckptcore, json; print(json.dumps({i.name: i.status for i in ckptcore.list_plugins()}))",
        CKPTCORE_DISABLE_PLUGIN_AUTOLOAD="true",
    )
    assert json.loads(out.stdout) == {"ckptcore.plugins.builtin": "builtin"}


def test_plugin_failing_to_import_is_logged_with_its_distribution_and_skipped(site, tmp_path, caplog):
    fake_distribution(
        site, "ckptcore-broken", {"broken": "fake_ckpt_broken"},
        {"fake_ckpt_broken": "raise ImportError('needs libfoo.so')\n"},
    )
    fake_distribution(
        site, "ckptcore-badattr", {"badattr": "fake_ckpt_badattr:does_not_exist"},
        {"fake_ckpt_badattr": "X = 1\n"},
    )
    importlib.invalidate_caches()
    reset_registry()
    with caplog.at_level(logging.WARNING, logger="ckptcore.plugins.manager"):
        infos = {i.name: i for i in ckptcore.list_plugins()}
    assert infos["broken"].status.startswith("failed: ImportError: needs libfoo.so")
    assert infos["broken"].distribution == "ckptcore-broken" and infos["broken"].version == "1.2.3"
    assert infos["badattr"].status.startswith("failed:")
    assert "ckptcore-broken" in caplog.text and "needs libfoo.so" in caplog.text and "skipped" in caplog.text
    # the other plugins keep working
    ckptcore.save(tmp_path / "ck", {"a": np.arange(4)})
    assert ckptcore.restore(tmp_path / "ck")["a"].tolist() == [0, 1, 2, 3]


STORAGE_PLUGIN = """
    from ckptcore import hookimpl
    from ckptcore.plugins.registrations import StorageRegistration, ArrayFormatRegistration

    class Backend:
        def resolve(self, url, options):
            raise RuntimeError("not used")

    class Format:
        def write(self, location, requests, options):
            raise RuntimeError("not used")

        def read(self, location, requests, options):
            raise RuntimeError("not used")

    @hookimpl
    def ckptcore_storage_backends():
        return [StorageRegistration(schemes=("dup",), backend=Backend())]

    @hookimpl
    def ckptcore_array_formats():
        return [ArrayFormatRegistration(name="dupfmt", format=Format())]
"""


def test_conflicting_distributions_are_named(site):
    fake_distribution(site, "ckptcore-alpha", {"alpha": "fake_ckpt_alpha"}, {"fake_ckpt_alpha": STORAGE_PLUGIN})
    fake_distribution(site, "ckptcore-beta", {"beta": "fake_ckpt_beta"}, {"fake_ckpt_beta": STORAGE_PLUGIN})
    importlib.invalidate_caches()
    reset_registry()
    with pytest.raises(errors.PluginConflictError) as err:
        ckptcore.restore("dup://x/y")
    message = str(err.value)
    assert "ckptcore-alpha" in message and "ckptcore-beta" in message and "'dup'" in message
    assert "CKPTCORE_BLOCK_PLUGINS" in message
    with pytest.raises(errors.PluginConflictError, match=r"ckptcore-alpha.*ckptcore-beta"):
        registry().array_format("dupfmt")
    # other schemes are unaffected by the conflict
    assert registry().storage("file").distribution == "ckptcore-posix"


class UnusedFormat:
    def write(self, location, requests, options):
        raise AssertionError("not used")

    def read(self, location, requests, options):
        raise AssertionError("not used")


def test_conflict_with_an_in_process_plugin(tmp_path):
    class Shadow:
        @hookimpl
        def ckptcore_array_formats(self):
            return [ArrayFormatRegistration(name="ocdbt", format=UnusedFormat())]

    ckptcore.register_plugin(Shadow(), name="shadow")
    with pytest.raises(errors.PluginConflictError, match="ckptcore-zarr3"):
        ckptcore.save(tmp_path / "ck", {"a": np.ones(2)})
    assert not (tmp_path / "ck").exists()
    ckptcore.unregister_plugin("shadow")
    ckptcore.save(tmp_path / "ck", {"a": np.ones(2)})


def test_registering_twice_is_an_error():
    class P:
        @hookimpl
        def ckptcore_storage_backends(self):
            return []

    ckptcore.register_plugin(P(), name="p")
    with pytest.raises(errors.PluginError, match="already registered"):
        ckptcore.register_plugin(P(), name="p")


def test_hook_that_raises_is_a_plugin_error_naming_it(tmp_path):
    class Exploding:
        @hookimpl
        def ckptcore_storage_backends(self):
            raise RuntimeError("boom")

    ckptcore.register_plugin(Exploding(), name="exploding")
    with pytest.raises(errors.PluginError, match=r"exploding.*boom.*CKPTCORE_BLOCK_PLUGINS=exploding"):
        ckptcore.save(tmp_path / "ck", {"a": 1})


def test_registrations_carry_their_distribution():
    reg = registry().array_format("ocdbt")
    assert reg.distribution == "ckptcore-zarr3" and reg.plugin_version
    assert registry().storage("file").distribution == "ckptcore-posix"
    assert registry().atomicity("file").name == "rename"
    storage_regs = [r for r in registry()._collect("ckptcore_storage_backends") if isinstance(r, StorageRegistration)]
    assert all(r.distribution for r in storage_regs)


def test_unregistering_an_unknown_name_is_an_error():
    with pytest.raises(errors.PluginError, match=r"no plugin named .nope.*posix"):
        ckptcore.unregister_plugin("nope")


def test_missing_plugin_error_names_an_installed_but_blocked_plugin():
    code = (
        "import ckptcore\n"
        "try:\n"
        "    ckptcore.save('/tmp/never-written-ckptcore-test', {'a': 1})\n"
        "except ckptcore.errors.MissingPluginError as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "CKPTCORE_BLOCK_PLUGINS": "posix"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "installed but not loaded: posix (ckptcore-posix): blocked by CKPTCORE_BLOCK_PLUGINS" in out


# -- hooks go through pluggy; every failure names its plugin (issue 10, item 5) -----------


class ValidFormat:
    def write(self, location, requests, options):
        raise AssertionError("not used")

    def read(self, location, requests, options):
        raise AssertionError("not used")


def test_index_metadata_that_raises_is_a_plugin_error_naming_plugin_and_hook(tmp_path):
    class Quiet:
        @hookimpl
        def ckptcore_index_metadata(self, context):
            return None  # abstains: must not shift the others' answers

    class Broken:
        @hookimpl
        def ckptcore_index_metadata(self, context):
            raise KeyError("hostname")

    ckptcore.register_plugin(Quiet(), name="quiet")
    ckptcore.save(tmp_path / "ok", {"a": 1})
    meta = ckptcore.info(tmp_path / "ok").plugin_metadata
    assert "quiet" not in meta and "ckptcore.plugins.builtin" in meta
    ckptcore.register_plugin(Broken(), name="broken-meta")
    with pytest.raises(errors.PluginError) as err:
        ckptcore.save(tmp_path / "ck", {"a": 1})
    message = str(err.value)
    assert "'broken-meta'" in message and "(registered in process)" in message
    assert "ckptcore_index_metadata" in message and "KeyError" in message and "hostname" in message
    assert "update or block it (CKPTCORE_BLOCK_PLUGINS=broken-meta)" in message
    assert isinstance(err.value.__cause__, KeyError)
    assert not (tmp_path / "ck").exists()


def test_firstresult_hook_that_raises_names_the_plugin_among_several(tmp_path):
    class BadDefault:
        @hookimpl(tryfirst=True)
        def ckptcore_default_array_format(self):
            return {"not": "a name"}["name"]

    ckptcore.register_plugin(BadDefault(), name="bad-default")
    with pytest.raises(errors.PluginError, match=r"'bad-default'.*raised in ckptcore_default_array_format: KeyError"):
        ckptcore.save(tmp_path / "ck", {"a": np.ones(2)})
    ckptcore.save(tmp_path / "ck", {"a": np.ones(2)}, format="ocdbt")  # an explicit format needs no default


def test_hook_wrappers_run_around_each_answer_and_results_are_cached():
    seen = []

    class Wrapper:
        @hookimpl(wrapper=True)
        def ckptcore_array_formats(self):
            answer = yield
            seen.append(answer)
            return answer

    class Counted:
        calls = 0

        @hookimpl
        def ckptcore_array_formats(self):
            Counted.calls += 1
            return [ArrayFormatRegistration(name="counted", format=ValidFormat())]

    ckptcore.register_plugin(Wrapper(), name="wrapper")
    ckptcore.register_plugin(Counted(), name="counted")
    assert registry().array_format("counted").distribution == "(registered in process)"
    assert registry().array_format("ocdbt").distribution == "ckptcore-zarr3"
    assert Counted.calls == 1  # registrations are collected once...
    assert any(r.name == "counted" for answer in seen for r in answer[0])  # ...through the plugin's wrapper
    ckptcore.unregister_plugin("counted")
    with pytest.raises(errors.MissingPluginError):
        registry().array_format("counted")  # ...and collected again after a change


def test_misspelled_hook_in_process_is_a_plugin_error():
    class Misspelled:
        @hookimpl
        def ckptcore_array_format(self):
            return []

    with pytest.raises(errors.PluginError) as err:
        ckptcore.register_plugin(Misspelled(), name="misspelled")
    message = str(err.value)
    assert "'misspelled'" in message and "(registered in process)" in message
    assert "unknown hook ckptcore_array_format (did you mean ckptcore_array_formats?)" in message
    assert "misspelled" not in {i.name for i in ckptcore.list_plugins()}
    assert registry().array_format("ocdbt").distribution == "ckptcore-zarr3"

    class Fixed:
        @hookimpl
        def ckptcore_array_formats(self):
            return []

    assert ckptcore.register_plugin(Fixed(), name="misspelled") == "misspelled"  # nothing was left behind


MISSPELLED_PLUGIN = """
    from ckptcore import hookimpl

    @hookimpl
    def ckptcore_array_format():
        return []

    @hookimpl
    def ckptcore_storage_backends():
        raise AssertionError("a skipped plugin is never called")
"""


def test_misspelled_hook_in_an_entry_point_plugin_skips_it_with_a_logged_error(site, tmp_path, caplog):
    fake_distribution(site, "ckptcore-typo", {"typo": "fake_ckpt_typo"}, {"fake_ckpt_typo": MISSPELLED_PLUGIN})
    importlib.invalidate_caches()
    reset_registry()
    with caplog.at_level(logging.ERROR, logger="ckptcore.plugins.manager"):
        infos = {i.name: i for i in ckptcore.list_plugins()}
    assert infos["typo"].status == "failed: unknown hook ckptcore_array_format (did you mean ckptcore_array_formats?)"
    assert infos["typo"].distribution == "ckptcore-typo"
    assert any(r.levelno == logging.ERROR and "ckptcore-typo" in r.getMessage() for r in caplog.records)
    assert "ckptcore_array_format" in caplog.text
    ckptcore.save(tmp_path / "ck", {"a": np.arange(3)})  # the others keep working
    assert ckptcore.restore(tmp_path / "ck")["a"].tolist() == [0, 1, 2]
    out = subprocess.run([sys.executable, "-m", "ckptcore", "plugins", "--json"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(site)}, timeout=120)
    shown = {p["name"]: p["status"] for p in json.loads(out.stdout)}
    assert shown["typo"] == infos["typo"].status


INVALID_REGISTRATIONS = """
    from ckptcore import hookimpl
    from ckptcore.plugins.registrations import ArrayFormatRegistration, StorageRegistration

    class WriteOnly:
        def write(self, location, requests, options):
            return []

    @hookimpl
    def ckptcore_array_formats():
        return [ArrayFormatRegistration(name="write-only", format=WriteOnly())]

    @hookimpl
    def ckptcore_storage_backends():
        return [ArrayFormatRegistration(name="wrong-type", format=WriteOnly())]
"""


def test_registrations_are_validated_against_their_protocols(site):
    fake_distribution(site, "ckptcore-halfdone", {"halfdone": "fake_ckpt_halfdone"},
                      {"fake_ckpt_halfdone": INVALID_REGISTRATIONS})
    importlib.invalidate_caches()
    reset_registry()
    with pytest.raises(errors.PluginError) as err:
        registry().array_format("write-only")
    message = str(err.value)
    assert "'halfdone' (ckptcore-halfdone 1.2.3)" in message and "ckptcore_array_formats" in message
    assert "its format object (WriteOnly) has no read()" in message and "CKPTCORE_BLOCK_PLUGINS=halfdone" in message
    with pytest.raises(errors.PluginError, match=r"ckptcore-halfdone.*ArrayFormatRegistration.*StorageRegistration"):
        registry().storage("file")


def test_registration_fields_check_themselves():
    class BadFields:
        @hookimpl
        def ckptcore_storage_backends(self):
            return [StorageRegistration(schemes="gs", backend=object())]

    with pytest.raises(TypeError, match="tuple of names"):
        StorageRegistration(schemes="gs", backend=object())
    with pytest.raises(TypeError, match="version must be an integer"):
        ArrayFormatRegistration(name="x", format=ValidFormat(), version=0)
    assert StorageRegistration(schemes=["a", "b"], backend=object()).schemes == ("a", "b")
    ckptcore.register_plugin(BadFields(), name="bad-fields")
    with pytest.raises(errors.PluginError, match=r"'bad-fields'.*raised in ckptcore_storage_backends: TypeError"):
        registry().storage("file")


def test_a_plugin_whose_core_range_excludes_this_core_is_skipped(site, tmp_path, caplog):
    fake_distribution(site, "ckptcore-ancient", {"ancient": "fake_ckpt_ancient"},
                      {"fake_ckpt_ancient": "raise AssertionError('an incompatible plugin is never imported')\n"})
    metadata_file = next(site.glob("ckptcore_ancient-*.dist-info")) / "METADATA"
    metadata_file.write_text(metadata_file.read_text() + "Requires-Dist: ckptcore<0.0.1\n")
    importlib.invalidate_caches()
    reset_registry()
    with caplog.at_level(logging.WARNING, logger="ckptcore.plugins.manager"):
        infos = {i.name: i for i in ckptcore.list_plugins()}
    status = infos["ancient"].status
    assert status.startswith("incompatible: ckptcore-ancient 1.2.3 requires ckptcore<0.0.1; this is ckptcore ")
    assert "ckptcore-ancient" in caplog.text and "skipped" in caplog.text
    with pytest.raises(errors.MissingPluginError, match=r"installed but not loaded: ancient \(ckptcore-ancient\): incompatible"):
        ckptcore.restore("hdfs://x/y")
    ckptcore.save(tmp_path / "ck", {"a": 1})


def test_missing_plugin_messages_come_from_the_hint_table(monkeypatch):
    from ckptcore.plugins import hints

    assert hints.scheme_hint("gs") == "`gs://` needs the gcs plugin: pip install 'ckptcore[gcs]'"
    assert hints.scheme_hint("file").endswith("part of every ckptcore install: pip install ckptcore-posix")
    assert hints.format_hint("ocdbt") == "pip install ckptcore-zarr3"
    monkeypatch.setitem(hints.KNOWN_SCHEMES, "hdfs", hints.KnownPlugin("ckptcore-hdfs", "pip install ckptcore-hdfs",
                                                                       "`hdfs://` needs the hdfs plugin"))
    with pytest.raises(errors.MissingPluginError, match=r"`hdfs://` needs the hdfs plugin: pip install ckptcore-hdfs"):
        ckptcore.restore("hdfs://x/y")


def test_a_backend_that_resolves_to_something_else_than_a_location_is_named():
    class OldStyle:
        def resolve(self, url, options):
            return {"driver": "file", "path": "/tmp/x/"}

    class OldStylePlugin:
        @hookimpl
        def ckptcore_storage_backends(self):
            return [StorageRegistration(schemes=("oldstyle",), backend=OldStyle())]

    ckptcore.register_plugin(OldStylePlugin(), name="oldstyle")
    with pytest.raises(errors.PluginError, match=r"\(registered in process\).*oldstyle://.*returned dict.*StorageAddress"):
        ckptcore.restore("oldstyle://x")
