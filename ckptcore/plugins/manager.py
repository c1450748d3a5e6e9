"""Finding, loading and selecting plugins.

Plugins are discovered through the ``ckptcore`` entry-point group, lazily, the first
time the core needs a hook. A plugin that fails to import is logged with its
distribution name and skipped; the others keep working.

Environment switches (read when plugins are first loaded):

* ``CKPTCORE_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry points (register plugins yourself).
* ``CKPTCORE_PLUGINS=a,b``: load only these entry-point names.
* ``CKPTCORE_BLOCK_PLUGINS=a,b``: never load these entry-point names.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any, TypeVar

import pluggy

from ckptcore.errors import MissingPluginError, PluginConflictError, PluginError
from ckptcore.plugins import hookspecs
from ckptcore.plugins.registrations import (
    ArrayFormatRegistration,
    AtomicityRegistration,
    StepLayoutRegistration,
    StorageRegistration,
)

log = logging.getLogger("ckptcore.plugins.manager")

ENTRY_POINT_GROUP = "ckptcore"

# Install hints for the plugins this project ships; third-party schemes get a generic hint.
_INSTALL_HINTS = {"gs": "gcs", "gcs": "gcs", "s3": "s3", "file": "posix", "ocdbt": "zarr3", "zarr3": "zarr3"}

R = TypeVar("R")


@dataclass(frozen=True)
class PluginInfo:
    """What ``ckptcore plugins`` shows for one plugin."""

    name: str
    distribution: str
    version: str
    hooks: tuple[str, ...]
    status: str  # "loaded", "registered", "blocked", "not allowed", "failed: ..."


class PluginRegistry:
    """The pluggy manager plus the registrations its plugins returned."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._lock = threading.RLock()
        self._loaded = False
        self._infos: dict[str, PluginInfo] = {}
        self._cache: dict[str, list[Any]] = {}

    # -- loading -------------------------------------------------------------------

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._register_builtins()
            if os.environ.get("CKPTCORE_DISABLE_PLUGIN_AUTOLOAD", "").lower() not in ("1", "true", "yes"):
                self._load_entry_points()
            self._loaded = True

    def _register_builtins(self) -> None:
        from ckptcore.plugins import builtin

        self._pm.register(builtin, name="ckptcore.plugins.builtin")
        self._infos["ckptcore.plugins.builtin"] = PluginInfo(
            "ckptcore.plugins.builtin", "ckptcore", _dist_version("ckptcore"), _hooks_of(builtin), "builtin"
        )

    def _load_entry_points(self) -> None:
        allow = _env_set("CKPTCORE_PLUGINS")
        block = _env_set("CKPTCORE_BLOCK_PLUGINS")
        for ep in sorted(importlib_metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if ep.name in self._infos:
                continue
            if ep.name in block:
                self._infos[ep.name] = PluginInfo(ep.name, dist, version, (), "blocked")
                continue
            if allow and ep.name not in allow:
                self._infos[ep.name] = PluginInfo(ep.name, dist, version, (), "not allowed")
                continue
            try:
                plugin = ep.load()
                self._pm.register(plugin, name=ep.name)
            except Exception as exc:  # a broken plugin must not break the others
                log.warning(
                    "ckptcore plugin %r from distribution %s %s failed to load and is skipped: %s: %s",
                    ep.name, dist, version, type(exc).__name__, exc,
                )
                self._infos[ep.name] = PluginInfo(
                    ep.name, dist, version, (), f"failed: {type(exc).__name__}: {exc}"
                )
                continue
            self._infos[ep.name] = PluginInfo(ep.name, dist, version, _hooks_of(plugin), "loaded")

    # -- in-process registration ---------------------------------------------------

    def register(self, plugin: object, name: str | None = None, distribution: str | None = None) -> str:
        """Register a plugin object or module in this process; return its name."""
        self._ensure_loaded()
        with self._lock:
            try:
                registered = self._pm.register(plugin, name=name)
            except ValueError as exc:  # pluggy: this name or this object is registered already
                raise PluginError(
                    f"plugin {name or plugin!r} is already registered ({exc}); unregister_plugin() it first"
                ) from exc
            if registered is None:
                raise PluginError(f"plugin {name or plugin!r} is already registered or blocked")
            self._infos[registered] = PluginInfo(
                registered, distribution or "(registered in process)", "", _hooks_of(plugin), "registered"
            )
            self._cache.clear()
            return registered

    def unregister(self, name: str) -> None:
        """Remove a plugin registered (or loaded) under ``name``."""
        self._ensure_loaded()
        with self._lock:
            if self._pm.get_plugin(name) is None:
                raise PluginError(
                    f"no plugin named {name!r} is registered; registered: {', '.join(sorted(self._infos))}"
                )
            self._pm.unregister(name=name)
            self._infos.pop(name, None)
            self._cache.clear()

    def infos(self) -> list[PluginInfo]:
        self._ensure_loaded()
        return list(self._infos.values())

    # -- hook results --------------------------------------------------------------

    def _collect(self, hook_name: str) -> list[Any]:
        """Every registration the plugins returned for ``hook_name``, with its distribution."""
        self._ensure_loaded()
        with self._lock:
            if hook_name in self._cache:
                return self._cache[hook_name]
            out: list[Any] = []
            hook = getattr(self._pm.hook, hook_name)
            for impl in reversed(hook.get_hookimpls()):
                info = self._infos.get(impl.plugin_name)
                try:
                    result = impl.function()
                except Exception as exc:
                    dist = info.distribution if info else impl.plugin_name
                    raise PluginError(
                        f"plugin {impl.plugin_name!r} ({dist}) raised in {hook_name}: {exc}; "
                        f"update or block it (CKPTCORE_BLOCK_PLUGINS={impl.plugin_name})"
                    ) from exc
                for reg in result or ():
                    if info is not None and not reg.distribution:
                        fields = {f.name for f in dataclasses.fields(reg)}
                        update = {"distribution": info.distribution}
                        update["plugin_version" if "plugin_version" in fields else "version"] = info.version
                        reg = dataclasses.replace(reg, **update)
                    out.append(reg)
            self._cache[hook_name] = out
            return out

    def storage(self, scheme: str) -> StorageRegistration:
        return self._select(
            "ckptcore_storage_backends", scheme, lambda r: r.schemes, "storage for", _scheme_hint(scheme)
        )

    def atomicity(self, scheme: str) -> AtomicityRegistration:
        return self._select(
            "ckptcore_atomicity_strategies", scheme, lambda r: r.schemes, "atomic commit for", _scheme_hint(scheme)
        )

    def array_format(self, name: str) -> ArrayFormatRegistration:
        hint = _INSTALL_HINTS.get(name)
        how = f"pip install 'ckptcore[{hint}]'" if hint and hint != "zarr3" else "pip install ckptcore-zarr3"
        if not hint:
            how = f"install the plugin that provides the array format {name!r}"
        return self._select("ckptcore_array_formats", name, lambda r: (r.name,), "array format", how)

    def array_formats(self) -> list[ArrayFormatRegistration]:
        return self._collect("ckptcore_array_formats")

    def step_layout(self, name: str) -> StepLayoutRegistration:
        return self._select(
            "ckptcore_step_layouts", name, lambda r: (r.name,), "step layout", "install the plugin that provides it"
        )

    def step_layouts(self) -> list[StepLayoutRegistration]:
        return self._collect("ckptcore_step_layouts")

    def default_array_format(self) -> str:
        self._ensure_loaded()
        name = self._pm.hook.ckptcore_default_array_format()
        if not name:
            raise MissingPluginError(
                "no array format plugin is installed, so arrays cannot be saved; "
                "pip install ckptcore (which brings ckptcore-zarr3) or pass format=..."
            )
        return str(name)

    def index_metadata(self, context: Any) -> dict[str, Any]:
        self._ensure_loaded()
        out: dict[str, Any] = {}
        hook = self._pm.hook.ckptcore_index_metadata
        for impl in hook.get_hookimpls():
            value = impl.function(context=context)
            if value:
                out[impl.plugin_name] = dict(value)  # type: ignore[call-overload]
        return out

    def _not_loaded_note(self) -> str:
        """Why installed plugins may be missing: switched off by the environment, or broken."""
        if os.environ.get("CKPTCORE_DISABLE_PLUGIN_AUTOLOAD", "").lower() in ("1", "true", "yes"):
            return " (plugin autoloading is off: CKPTCORE_DISABLE_PLUGIN_AUTOLOAD is set)"
        skipped = [
            f"{i.name} ({i.distribution}): {'blocked by CKPTCORE_BLOCK_PLUGINS' if i.status == 'blocked' else 'not in CKPTCORE_PLUGINS' if i.status == 'not allowed' else i.status}"
            for i in self._infos.values()
            if i.status in ("blocked", "not allowed") or i.status.startswith("failed")
        ]
        return f" (installed but not loaded: {'; '.join(skipped)})" if skipped else ""

    def _select(self, hook_name: str, key: str, keys_of: Any, what: str, how: str) -> Any:
        matches = [r for r in self._collect(hook_name) if key in keys_of(r)]
        if not matches:
            raise MissingPluginError(f"no plugin provides {what} {key!r}: {how}{self._not_loaded_note()}")
        dists = {m.distribution for m in matches}
        if len(matches) > 1 and len(dists) > 1:
            raise PluginConflictError(
                f"{what} {key!r} is provided by several distributions: {', '.join(sorted(dists))}; "
                "uninstall one, or block one with CKPTCORE_BLOCK_PLUGINS=<entry point name>"
            )
        return matches[0]


def _scheme_hint(scheme: str) -> str:
    extra = _INSTALL_HINTS.get(scheme)
    if scheme == "file":
        return "local paths need the posix plugin, part of every ckptcore install: pip install ckptcore-posix"
    if extra:
        return f"`{scheme}://` needs the {extra} plugin: pip install 'ckptcore[{extra}]'"
    return f"install a ckptcore plugin that serves `{scheme}://` URLs"


def _env_set(var: str) -> set[str]:
    return {p.strip() for p in os.environ.get(var, "").split(",") if p.strip()}


def _hooks_of(plugin: object) -> tuple[str, ...]:
    return tuple(sorted(n for n in dir(plugin) if n.startswith("ckptcore_") and callable(getattr(plugin, n))))


def _dist_version(dist: str) -> str:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


_registry: PluginRegistry | None = None
_registry_lock = threading.Lock()


def registry() -> PluginRegistry:
    """The process-wide plugin registry (created on first use)."""
    global _registry
    if _registry is None:
        with _registry_lock:
            if _registry is None:
                _registry = PluginRegistry()
    return _registry


def reset_registry() -> None:
    """Forget every plugin; the next use reloads entry points (for tests and notebooks)."""
    global _registry
    with _registry_lock:
        _registry = None


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object or module in this process; return the name it got."""
    return registry().register(plugin, name=name)


def unregister_plugin(name: str) -> None:
    """Unregister the plugin registered under ``name``."""
    registry().unregister(name)


def list_plugins() -> list[PluginInfo]:
    """Every plugin known to this process, loaded or not, with its status."""
    return registry().infos()


def iter_registrations(kind: str) -> Iterable[Any]:
    return registry()._collect(kind)
