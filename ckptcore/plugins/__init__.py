"""The plugin system: hook specifications, the registration types plugins return, and the
manager that loads plugins through entry points and selects among their registrations."""

from ckptcore.plugins.manager import (
    PluginInfo,
    list_plugins,
    register_plugin,
    registry,
    reset_registry,
    unregister_plugin,
)

__all__ = ["PluginInfo", "list_plugins", "register_plugin", "registry", "reset_registry", "unregister_plugin"]
