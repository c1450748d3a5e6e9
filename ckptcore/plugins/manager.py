"""Finding, loading, calling and selecting plugins.

**Loading.** Plugins are discovered through the ``ckptcore`` entry-point group, lazily, the
first time the core needs a hook. Each entry point, in name order, is

* skipped when the environment says so (status ``blocked`` / ``not allowed``);
* skipped with a logged warning when its distribution declares a ``ckptcore`` range that
  excludes the running core (status ``incompatible: <reason>``);
* skipped with a logged warning when it fails to import or pluggy rejects one of its hook
  signatures (status ``failed: <error>``);
* skipped with a logged error when it implements a ``ckptcore_*`` hook that does not exist,
  found by pluggy's ``check_pending()`` (status ``failed: unknown hook ckptcore_array_format
  (did you mean ckptcore_array_formats?)``).

The others keep working. :func:`register_plugin` applies the same checks but raises the
:class:`~ckptcore.errors.PluginError` instead: its caller is there to read it.

**Calling.** Every hook is called through pluggy. A monitor added with
``add_hookcall_monitoring`` sees each call with the implementations it runs and turns an
exception raised by any of them into a ``PluginError`` naming the plugin, its
distribution and the hook, with the advice to update or block it. Hooks whose answers are
kept per plugin (the registration hooks, whose registrations carry their distribution, and
``ckptcore_index_metadata``, stored under the plugin's name) are called once per
implementing plugin, through pluggy's ``subset_hook_caller``: pluggy drops ``None``
answers from a joint call, so a joint call cannot say who answered what. Hook wrappers
therefore wrap each plugin's answer. Registrations are validated when collected (their
type, and their worker object against its protocol) and cached until a plugin is
registered or unregistered.

Environment switches (read when plugins are first loaded):

* ``CKPTCORE_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry points (register plugins yourself).
* ``CKPTCORE_PLUGINS=a,b``: load only these entry-point names.
* ``CKPTCORE_BLOCK_PLUGINS=a,b``: never load these entry-point names.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any

import pluggy

from ckptcore.errors import MissingPluginError, PluginConflictError, PluginError
from ckptcore.plugins import hookspecs
from ckptcore.plugins.compat import core_range_excludes
from ckptcore.plugins.hints import KNOWN_FORMATS, format_hint, scheme_hint
from ckptcore.plugins.registrations import (
    ArrayFormatRegistration,
    AtomicityRegistration,
    CheckpointExporterRegistration,
    CheckpointLayoutRegistration,
    StepLayoutRegistration,
    StorageRegistration,
    missing_methods,
)

log = logging.getLogger("ckptcore.plugins.manager")

ENTRY_POINT_GROUP = "ckptcore"
BUILTIN = "ckptcore.plugins.builtin"
CORE_DISTRIBUTION = "ckptcore"
IN_PROCESS = "(registered in process)"

REGISTRATION_HOOKS: dict[str, type] = {
    "ckptcore_storage_backends": StorageRegistration,
    "ckptcore_atomicity_strategies": AtomicityRegistration,
    "ckptcore_step_layouts": StepLayoutRegistration,
    "ckptcore_array_formats": ArrayFormatRegistration,
    "ckptcore_checkpoint_layouts": CheckpointLayoutRegistration,
    "ckptcore_checkpoint_exporters": CheckpointExporterRegistration,
}
"""Each registration hook and the type of what it returns."""

_WORKER_NOUNS = {"backend": "storage backend", "strategy": "atomicity strategy", "layout": "layout", "format": "format",
                 "exporter": "exporter"}


@dataclass(frozen=True)
class PluginInfo:
    """What ``ckptcore plugins`` shows for one plugin."""

    name: str
    distribution: str
    version: str
    hooks: tuple[str, ...]
    status: str  # "builtin", "loaded", "registered", "blocked", "not allowed", "incompatible: ...", "failed: ..."


class PluginRegistry:
    """The pluggy manager plus the registrations its plugins returned."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._pm.add_hookcall_monitoring(self._before_call, self._after_call)
        self._lock = threading.RLock()
        self._loaded = False
        self._infos: dict[str, PluginInfo] = {}
        self._cache: dict[str, list[Any]] = {}

    @property
    def hook(self) -> Any:
        """pluggy's hook relay: ``registry().hook.ckptcore_...(**kwargs)``."""
        self._ensure_loaded()
        return self._pm.hook

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
            try:
                self._pm.check_pending()  # each plugin passed on its own; this holds for all together
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"plugin validation failed after loading: {exc}") from exc
            self._loaded = True

    def _register_builtins(self) -> None:
        from ckptcore.plugins import builtin

        self._pm.register(builtin, name=BUILTIN)
        self._infos[BUILTIN] = PluginInfo(
            BUILTIN, CORE_DISTRIBUTION, _dist_version(CORE_DISTRIBUTION), self._hooks_of(builtin), "builtin"
        )

    def _load_entry_points(self) -> None:
        allow = _env_set("CKPTCORE_PLUGINS")
        block = _env_set("CKPTCORE_BLOCK_PLUGINS")
        core_version = _dist_version(CORE_DISTRIBUTION)
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
            reason = core_range_excludes(ep.dist, core_version) if ep.dist is not None else None
            if reason:
                log.warning("ckptcore plugin %r is skipped: %s; install a release of %s made for it", ep.name, reason, dist)
                self._infos[ep.name] = PluginInfo(ep.name, dist, version, (), f"incompatible: {reason}")
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not break the others
                log.warning(
                    "ckptcore plugin %r from distribution %s %s failed to load and is skipped: %s: %s",
                    ep.name, dist, version, type(exc).__name__, exc,
                )
                self._infos[ep.name] = PluginInfo(ep.name, dist, version, (), f"failed: {type(exc).__name__}: {exc}")
                continue
            info = PluginInfo(ep.name, dist, version, self._hooks_of(plugin), "loaded")
            try:
                self._register_checked(plugin, info)
            except _Rejected as rejected:
                log.log(
                    rejected.level, "ckptcore plugin %r from distribution %s %s is skipped: %s",
                    ep.name, dist, version, rejected.error,
                )
                self._infos[ep.name] = dataclasses.replace(info, status=f"failed: {rejected.reason}")

    def _register_checked(self, plugin: object, info: PluginInfo) -> str:
        """Register ``plugin`` under ``info.name`` and check its hooks; :class:`_Rejected` if they are wrong."""
        try:
            name = self._pm.register(plugin, name=info.name)
        except pluggy.PluginValidationError as exc:  # a known hook with the wrong signature
            reason = " ".join(str(exc).split())
            raise _Rejected(reason, self._error(info, f"has a hook pluggy rejects: {reason}"), logging.WARNING) from exc
        except ValueError as exc:  # pluggy: this object is registered already, under another name
            reason = str(exc).splitlines()[0]
            raise _Rejected(reason, self._error(info, f"cannot be registered: {reason}"), logging.WARNING) from exc
        if name is None:
            raise PluginError(f"plugin {info.name!r} is blocked from registering")
        self._infos[name] = info
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            reason = _unknown_hooks_reason(self._pm, exc.plugin) or " ".join(str(exc).split())
            self._pm.unregister(name=name)
            self._infos.pop(name, None)
            error = self._error(info, f"implements an {reason}: nothing calls it; fix the hook's name in the plugin")
            raise _Rejected(reason, error, logging.ERROR) from exc
        self._cache.clear()
        return name

    # -- in-process registration ---------------------------------------------------

    def register(self, plugin: object, name: str | None = None, distribution: str | None = None) -> str:
        """Register a plugin object or module in this process; return its name."""
        self._ensure_loaded()
        with self._lock:
            chosen = name or self._pm.get_canonical_name(plugin)
            if self._pm.has_plugin(chosen) or self._pm.is_registered(plugin):
                raise PluginError(f"plugin {chosen!r} is already registered; unregister_plugin() it first")
            info = PluginInfo(chosen, distribution or IN_PROCESS, "", self._hooks_of(plugin), "registered")
            try:
                return self._register_checked(plugin, info)
            except _Rejected as rejected:
                raise rejected.error from rejected.__cause__

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

    def _hooks_of(self, plugin: object) -> tuple[str, ...]:
        """The ``ckptcore`` hooks ``plugin`` implements (as pluggy will see them)."""
        names = set()
        for attr in dir(plugin):
            opts = self._pm.parse_hookimpl_opts(plugin, attr)
            if opts is not None:
                names.add(opts.get("specname") or attr)
        return tuple(sorted(names))

    # -- calling hooks -------------------------------------------------------------

    def _before_call(self, hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("calling %s on %s", hook_name, ", ".join(i.plugin_name for i in hook_impls) or "no plugin")

    def _after_call(
        self, outcome: pluggy.Result[Any], hook_name: str, hook_impls: Sequence[pluggy.HookImpl],
        kwargs: Mapping[str, Any],
    ) -> None:
        """Turn an exception raised by an implementation into a PluginError that names it."""
        exc = outcome.exception
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, PluginError):
            return
        impl = _raising_impl(exc, hook_impls)
        answering = [i for i in hook_impls if not (i.wrapper or i.hookwrapper)]
        if impl is None and len({i.plugin_name for i in answering}) == 1:
            impl = answering[0]
        if impl is not None:
            info = self._info_of(impl.plugin_name)
            error = self._error(info, f"raised in {hook_name}: {type(exc).__name__}: {exc}")
        else:
            names = ", ".join(f"{i.plugin_name!r} ({self._info_of(i.plugin_name).distribution})" for i in hook_impls)
            error = PluginError(
                f"a plugin raised in {hook_name}: {type(exc).__name__}: {exc} (one of {names}); "
                "update or block it (CKPTCORE_BLOCK_PLUGINS=<name>)"
            )
        error.__cause__ = exc
        outcome.force_exception(error)

    def _info_of(self, plugin_name: str) -> PluginInfo:
        return self._infos.get(plugin_name) or PluginInfo(plugin_name, IN_PROCESS, "", (), "registered")

    @staticmethod
    def _error(info: PluginInfo, what: str, advice: str = "update or block it") -> PluginError:
        version = f" {info.version}" if info.version else ""
        return PluginError(
            f"plugin {info.name!r} ({info.distribution}{version}) {what}; "
            f"{advice} (CKPTCORE_BLOCK_PLUGINS={info.name})"
        )

    def _per_plugin(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """``hook_name`` called through pluggy once per implementing plugin: ``[(plugin name, answer)]``.

        In pluggy's call order; plugins that answer ``None`` are left out. Wrappers of other
        plugins stay in each call.
        """
        self._ensure_loaded()
        hook = getattr(self._pm.hook, hook_name)
        answering = [i for i in reversed(hook.get_hookimpls()) if not (i.wrapper or i.hookwrapper)]
        out = []
        for impl in answering:
            others = [i.plugin for i in answering if i.plugin is not impl.plugin]
            answer = self._pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)
            for value in answer:
                out.append((impl.plugin_name, value))
        return out

    def _collect(self, hook_name: str) -> list[Any]:
        """Every registration the plugins returned for ``hook_name``, validated, with its distribution."""
        self._ensure_loaded()
        with self._lock:
            if hook_name in self._cache:
                return self._cache[hook_name]
            out: list[Any] = []
            for plugin_name, answer in self._per_plugin(hook_name):
                info = self._info_of(plugin_name)
                for reg in self._registrations(info, hook_name, answer):
                    if not reg.distribution:
                        fields = {f.name for f in dataclasses.fields(reg)}
                        update = {"distribution": info.distribution}
                        update["plugin_version" if "plugin_version" in fields else "version"] = info.version
                        reg = dataclasses.replace(reg, **update)
                    out.append(reg)
            self._cache[hook_name] = out
            return out

    def _registrations(self, info: PluginInfo, hook_name: str, answer: Any) -> list[Any]:
        """``answer`` checked: an iterable of the hook's registration type whose workers fulfil their protocol."""
        expected = REGISTRATION_HOOKS[hook_name]
        if isinstance(answer, (str, bytes, Mapping)) or dataclasses.is_dataclass(answer) or not isinstance(
            answer, Iterable
        ):
            raise self._error(
                info, f"returned {type(answer).__name__} from {hook_name}, not a list of {expected.__name__}"
            )
        regs = list(answer)
        for reg in regs:
            if not isinstance(reg, expected):
                raise self._error(
                    info, f"returned a {type(reg).__name__} from {hook_name}, where a {expected.__name__} belongs"
                )
            field_name, protocol = expected.WORKER  # type: ignore[attr-defined]
            worker = getattr(reg, field_name)
            missing = missing_methods(worker, protocol)
            if missing:
                has_no = ", ".join(f"{m}()" for m in missing)
                raise self._error(
                    info,
                    f"returned an unusable {_describe(reg)} from {hook_name}: its {_WORKER_NOUNS[field_name]} "
                    f"object ({type(worker).__name__}) has no {has_no}, which {protocol.__name__} requires",
                )
        return regs

    # -- selecting -----------------------------------------------------------------

    def storage(self, scheme: str) -> StorageRegistration:
        return self._select(  # type: ignore[no-any-return]
            "ckptcore_storage_backends", scheme, lambda r: r.schemes, "storage for", scheme_hint(scheme)
        )

    def atomicity(self, scheme: str) -> AtomicityRegistration:
        return self._select(  # type: ignore[no-any-return]
            "ckptcore_atomicity_strategies", scheme, lambda r: r.schemes, "atomic commit for", scheme_hint(scheme)
        )

    def array_format(self, name: str) -> ArrayFormatRegistration:
        return self._select(  # type: ignore[no-any-return]
            "ckptcore_array_formats", name, lambda r: (r.name,), "array format", format_hint(name)
        )

    def array_formats(self) -> list[ArrayFormatRegistration]:
        return self._collect("ckptcore_array_formats")

    def step_layout(self, name: str) -> StepLayoutRegistration:
        return self._select(  # type: ignore[no-any-return]
            "ckptcore_step_layouts", name, lambda r: (r.name,), "step layout", "install the plugin that provides it"
        )

    def step_layouts(self) -> list[StepLayoutRegistration]:
        return self._collect("ckptcore_step_layouts")

    def checkpoint_layouts(self) -> list[CheckpointLayoutRegistration]:
        """The layouts of other systems' checkpoints, in registration order."""
        return self._collect("ckptcore_checkpoint_layouts")

    def checkpoint_exporter(self, name: str) -> CheckpointExporterRegistration:
        """The exporter ``convert(..., to=name)`` writes with."""
        installed = ", ".join(["ckptcore", *sorted({r.name for r in self.checkpoint_exporters()})])
        known = KNOWN_FORMATS.get(name)
        how = known.install if known is not None else "install the plugin that provides it"
        return self._select(  # type: ignore[no-any-return]
            "ckptcore_checkpoint_exporters", name, lambda r: (r.name,), "checkpoint exporter",
            f"{how} (installed: {installed})",
        )

    def checkpoint_exporters(self) -> list[CheckpointExporterRegistration]:
        return self._collect("ckptcore_checkpoint_exporters")

    def default_array_format(self) -> str:
        name = self.hook.ckptcore_default_array_format()
        if not name:
            raise MissingPluginError(
                "no array format plugin is installed, so arrays cannot be saved; "
                "pip install ckptcore (which brings ckptcore-zarr3) or pass format=..."
            )
        return str(name)

    def index_metadata(self, context: Any) -> dict[str, Any]:
        """Each plugin's ``ckptcore_index_metadata`` answer, under the plugin's name."""
        out: dict[str, Any] = {}
        for plugin_name, value in self._per_plugin("ckptcore_index_metadata", context=context):
            if not value:
                continue
            if not isinstance(value, Mapping):
                raise self._error(
                    self._info_of(plugin_name),
                    f"returned {type(value).__name__} from ckptcore_index_metadata, not a mapping",
                )
            out[plugin_name] = dict(value)
        return out

    def _not_loaded_note(self) -> str:
        """Why installed plugins may be missing: switched off by the environment, incompatible, or broken."""
        if os.environ.get("CKPTCORE_DISABLE_PLUGIN_AUTOLOAD", "").lower() in ("1", "true", "yes"):
            return " (plugin autoloading is off: CKPTCORE_DISABLE_PLUGIN_AUTOLOAD is set)"
        why = {"blocked": "blocked by CKPTCORE_BLOCK_PLUGINS", "not allowed": "not in CKPTCORE_PLUGINS"}
        skipped = [
            f"{i.name} ({i.distribution}): {why.get(i.status, i.status)}"
            for i in self._infos.values()
            if i.status in why or i.status.startswith(("failed", "incompatible"))
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


class _Rejected(Exception):
    """A plugin that must not stay registered: ``reason`` for its status, ``error`` to raise."""

    def __init__(self, reason: str, error: PluginError, level: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.level = level


def _unknown_hooks_reason(pm: pluggy.PluginManager, plugin: object) -> str:
    """``"unknown hook X (did you mean Y?)"`` for the hooks of ``plugin`` that have no spec."""
    known = sorted(n for n in dir(pm.hook) if n.startswith(hookspecs.PROJECT + "_") and getattr(pm.hook, n).has_spec())
    unknown = []
    for caller in pm.get_hookcallers(plugin) or ():
        if caller.has_spec() or all(i.optionalhook for i in caller.get_hookimpls() if i.plugin is plugin):
            continue
        close = difflib.get_close_matches(caller.name, known, n=1)
        unknown.append(f"{caller.name} (did you mean {close[0]}?)" if close else caller.name)
    if not unknown:
        return ""
    return ("unknown hook " if len(unknown) == 1 else "unknown hooks ") + ", ".join(sorted(unknown))


def _raising_impl(exc: BaseException, hook_impls: Sequence[pluggy.HookImpl]) -> pluggy.HookImpl | None:
    """The implementation whose code raised ``exc``: the outermost of their frames in its traceback."""
    codes = {}
    for impl in hook_impls:
        function = inspect.unwrap(impl.function)
        code = getattr(getattr(function, "__func__", function), "__code__", None)
        if code is not None:
            codes[code] = impl
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in codes:
            return codes[tb.tb_frame.f_code]
        tb = tb.tb_next
    return None


def _describe(reg: Any) -> str:
    if isinstance(reg, StorageRegistration):
        return f"storage registration for {', '.join(repr(s) for s in reg.schemes)}"
    if isinstance(reg, AtomicityRegistration):
        return f"atomicity registration {reg.name!r}"
    if isinstance(reg, StepLayoutRegistration):
        return f"step layout {reg.name!r}"
    return f"array format {reg.name!r}"


def _env_set(var: str) -> set[str]:
    return {p.strip() for p in os.environ.get(var, "").split(",") if p.strip()}


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
    """Register a plugin object or module in this process; return the name it got.

    Raises :class:`~ckptcore.errors.PluginError` when the name or the object is registered
    already, when a hook has the wrong signature, or when the plugin implements a
    ``ckptcore_*`` hook that does not exist (a misspelling: nothing would ever call it).
    """
    return registry().register(plugin, name=name)


def unregister_plugin(name: str) -> None:
    """Unregister the plugin registered under ``name``."""
    registry().unregister(name)


def list_plugins() -> list[PluginInfo]:
    """Every plugin known to this process, loaded or not, with its status."""
    return registry().infos()
