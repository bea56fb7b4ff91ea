"""Per-model customization at load time: aliases added by plugins, the config file's
``[models.NAME]`` table (plugins and their options, chat template, cache switch) and the
response cache settings, applied to a freshly loaded ``LlamaWrapper``."""

from __future__ import annotations

from typing import Any, Optional, Union

from ..config import CacheSettings, home_dir, model_table
from ..errors import InvalidRequestError
from ..plugins import ActivePlugins
from ..plugins.manager import registered_chat_templates, registered_models
from .response_cache import ResponseCache, open_backend


def model_source(name: str) -> str:
    """``name``, or the source a plugin registered under that alias."""
    return registered_models().get(name, name)


def cache_settings(cache: Union[bool, str, CacheSettings, dict, None], table: dict) -> Optional[CacheSettings]:
    """The effective cache settings, or None when the cache is off."""
    if isinstance(cache, CacheSettings):
        settings = cache
    elif isinstance(cache, dict):
        settings = CacheSettings(**{"enabled": True, **cache})
    elif isinstance(cache, str):
        settings = CacheSettings(enabled=True, url=cache)
    else:
        settings = CacheSettings()
        if cache is not None or "cache" in table:
            settings = settings.model_copy(update={"enabled": bool(table.get("cache") if cache is None else cache)})
    return settings if settings.enabled else None


def open_cache(settings: CacheSettings) -> ResponseCache:
    """The cache's backend, its TTL capped by the ``retention_days`` setting, sealed with the
    process's encryption key when one is set."""
    from ..security.crypto import active_cipher
    from ..security.retention import capped_ttl

    backend = open_backend(settings.url, home_dir() / "cache", capped_ttl(settings.ttl), settings.max_entries,
                           int(settings.max_mb * 1024 * 1024))
    return ResponseCache(backend, cipher=active_cipher(), where=f"The response cache ({settings.url or 'sqlite, cache folder'})")


def apply(llm: Any, name: str, *, plugins: Optional[list] = None, cache: Union[bool, str, CacheSettings, dict, None] = None,
          chat_template: Optional[str] = None) -> None:
    """Switch on ``llm``'s plugins, chat template and response cache."""
    table = model_table(name) or (model_table(llm.name) if llm.name != name else {})
    template_name = chat_template or table.get("chat_template")
    if template_name:
        templates = registered_chat_templates()
        if template_name not in templates:
            raise InvalidRequestError(f"Unknown chat template '{template_name}'; registered: {', '.join(sorted(templates)) or 'none'}.",
                                      param="chat_template")
        llm.tokenizer.chat_template = templates[template_name]
    enabled = plugins if plugins is not None else table.get("plugins", [])
    llm.custom.plugins = ActivePlugins(name, enabled, table.get("plugin_options") or {})
    settings = cache_settings(cache, table)
    llm.custom.cache = open_cache(settings) if settings is not None else None
