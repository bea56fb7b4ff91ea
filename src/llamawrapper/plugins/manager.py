"""The plugin manager: one pluggy ``PluginManager`` per process holding every known plugin
(built-ins, entry points of group ``llamawrapper``, in-process registrations), and
``ActivePlugins``, the ordered set switched on for one model, which runs the request hooks
and turns a hook's exception into a typed error naming the hook and the plugin."""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Iterable, Optional

import pluggy

from ..errors import InvalidRequestError, PluginError, PluginRejectedError
from . import hookspecs

log = logging.getLogger("llamawrapper.plugins")
ENTRY_POINT_GROUP = "llamawrapper"

_lock = threading.Lock()
_manager: Optional[pluggy.PluginManager] = None


def get_manager() -> pluggy.PluginManager:
    """The process-wide manager: built-ins and entry-point plugins loaded on first use."""
    global _manager
    with _lock:
        if _manager is None:
            from .builtins import BUILTINS

            pm = pluggy.PluginManager("llamawrapper")
            pm.add_hookspecs(hookspecs)
            for name, plugin in BUILTINS.items():
                pm.register(plugin, name=name)
            try:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            except Exception as exc:  # one broken third-party package must not take the library down
                log.warning("could not load plugins of entry-point group %r: %r", ENTRY_POINT_GROUP, exc)
            _manager = pm
        return _manager


def register(plugin: Any, name: Optional[str] = None) -> str:
    """Register a plugin object or module in-process (replacing one of the same name)."""
    pm = get_manager()
    name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    if pm.get_plugin(name) is not None:
        pm.unregister(name=name)
    pm.register(plugin, name=name)
    return name


def unregister(name: str) -> None:
    pm = get_manager()
    if pm.get_plugin(name) is not None:
        pm.unregister(name=name)


def _collect(hook_name: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    hook = getattr(get_manager().hook, hook_name)
    for impl in hook.get_hookimpls():
        def add(name: str, value: Any, description: str = "", _p=impl.plugin_name) -> None:
            found[name] = value
        try:
            impl.function(add)
        except Exception as exc:
            raise PluginError(f"Plugin '{impl.plugin_name}' failed in hook {hook_name}: {exc}", hook_name, impl.plugin_name) from exc
    return found


def registered_models() -> dict[str, str]:
    """Aliases added by ``register_models`` hooks: name → source."""
    return _collect("register_models")


def registered_chat_templates() -> dict[str, str]:
    """Templates added by ``register_chat_templates`` hooks: name → Jinja source."""
    return _collect("register_chat_templates")


def _normalize(spec: Iterable[Any]) -> list[tuple[str, dict]]:
    out = []
    for item in spec or []:
        if isinstance(item, str):
            out.append((item, {}))
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            out.append((item["name"], {k: v for k, v in item.items() if k != "name"}))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            out.append((item[0], dict(item[1] or {})))
        else:
            raise InvalidRequestError(f"A plugin is a name, {{'name': ..., **options}} or (name, options); got {item!r}.",
                                      param="plugins")
    return out


class ActivePlugins:
    """The plugins switched on for one model, in order, with their options."""

    def __init__(self, model: str, enabled: Iterable[Any] = (), options: Optional[dict[str, dict]] = None) -> None:
        self.model = model
        pm = get_manager()
        self.enabled = _normalize(enabled)
        for name, opts in self.enabled:
            if pm.get_plugin(name) is None:
                known = ", ".join(sorted(n for n, _ in pm.list_name_plugin()))
                raise InvalidRequestError(f"Unknown plugin '{name}'; known: {known}.", param="plugins")
            opts.update({k: v for k, v in ((options or {}).get(name) or {}).items() if k not in opts})

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.enabled]

    def _impls(self, hook_name: str):
        by_plugin = {impl.plugin_name: impl for impl in getattr(get_manager().hook, hook_name).get_hookimpls()}
        for name, opts in self.enabled:
            impl = by_plugin.get(name)
            if impl is not None:
                yield name, opts, impl

    def _call(self, hook_name: str, name: str, opts: dict, impl: Any, **kwargs: Any) -> Any:
        args = {"model": self.model, "options": opts, **kwargs}
        try:
            return impl.function(*[args[a] for a in impl.argnames])
        except InvalidRequestError as exc:
            raise PluginRejectedError(f"Plugin '{name}' refused the request in hook {hook_name}: {exc}", hook_name, name,
                                      exc.param) from exc
        except Exception as exc:
            raise PluginError(f"Plugin '{name}' failed in hook {hook_name}: {type(exc).__name__}: {exc}", hook_name, name) from exc

    def before_request(self, messages: list[dict], params: Any) -> tuple[list[dict], Any]:
        """Run every ``before_request`` hook in order; each sees the previous one's changes."""
        messages = [dict(m) for m in messages]
        if self.enabled and dataclasses.is_dataclass(params):
            params = dataclasses.replace(params)  # hooks may mutate it; other requests share the original
        for name, opts, impl in self._impls("before_request"):
            out = self._call("before_request", name, opts, impl, messages=messages, params=params)
            if isinstance(out, tuple) and len(out) == 2:
                messages, params = list(out[0]), out[1]
            elif isinstance(out, list):
                messages = out
        return messages, params

    def stream_filters(self) -> list["NamedFilter"]:
        filters = []
        for name, opts, impl in self._impls("stream_filter"):
            f = self._call("stream_filter", name, opts, impl)
            if f is not None:
                filters.append(NamedFilter(name, f))
        return filters

    def after_response(self, text: str) -> str:
        for name, opts, impl in self._impls("after_response"):
            out = self._call("after_response", name, opts, impl, text=text)
            if isinstance(out, str):
                text = out
        return text

    def __bool__(self) -> bool:
        return bool(self.enabled)


class NamedFilter:
    """A plugin's stream filter whose failures name the plugin."""

    def __init__(self, plugin: str, inner: Any) -> None:
        self.plugin, self.inner = plugin, inner

    def _run(self, method: str, *args: Any) -> str:
        try:
            return getattr(self.inner, method)(*args)
        except Exception as exc:
            raise PluginError(f"Plugin '{self.plugin}' failed in its stream filter: {type(exc).__name__}: {exc}",
                              "stream_filter", self.plugin) from exc

    def feed(self, text: str) -> str:
        return self._run("feed", text)

    def flush(self) -> str:
        return self._run("flush")
