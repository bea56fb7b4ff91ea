"""Plugins: pluggy hooks around every request (see ``hookspecs``), found through the
``llamawrapper`` entry-point group or registered in-process with ``register(obj, name)``, and
switched on per model (config file ``[models.NAME] plugins = [...]`` or
``LlamaWrapper.load(plugins=[...])``).

A plugin is a module or object with ``@hookimpl``-decorated functions::

    from llamawrapper.plugins import hookimpl, register

    class Shout:
        @hookimpl
        def after_response(self, text):
            return text.upper()

    register(Shout(), "shout")
    llm = LlamaWrapper.load("smollm2", plugins=["shout"])
"""

from __future__ import annotations

import pluggy

hookimpl = pluggy.HookimplMarker("llamawrapper")

from .manager import ActivePlugins, PluginError, get_manager, register, unregister  # noqa: E402

__all__ = ["hookimpl", "register", "unregister", "get_manager", "ActivePlugins", "PluginError"]
