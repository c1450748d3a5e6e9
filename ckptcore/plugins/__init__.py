"""The plugin system, one module per job:

* :mod:`~ckptcore.plugins.hookspecs`: the hooks (``ckptcore_*``), each documented.
* :mod:`~ckptcore.plugins.registrations`: what hooks return, and the protocols of the
  objects that do the work; :mod:`~ckptcore.plugins.address`: the format-neutral address
  of bulk data that storage plugins hand to array formats.
* :mod:`~ckptcore.plugins.manager`: loading plugins through entry points, calling hooks
  through pluggy with every answer and failure attributed to its plugin, validating and
  selecting registrations.
* :mod:`~ckptcore.plugins.compat`: whether a plugin declares that it works with this core.
* :mod:`~ckptcore.plugins.hints`: what to install when nothing provides a scheme or format.
* :mod:`~ckptcore.plugins.builtin`: the hooks the core implements itself.
"""

from ckptcore.plugins.manager import (
    PluginInfo,
    list_plugins,
    register_plugin,
    registry,
    reset_registry,
    unregister_plugin,
)

__all__ = ["PluginInfo", "list_plugins", "register_plugin", "registry", "reset_registry", "unregister_plugin"]
