"""The hook specifications plugins implement (with ``@llamawrapper.plugins.hookimpl``).

Request hooks receive ``model`` (the name the model was loaded as) and ``options`` (this
plugin's table from the config file, or the options given to ``LlamaWrapper.load``); a hook
implementation may take any subset of a spec's arguments.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pluggy

hookspec = pluggy.HookspecMarker("llamawrapper")


@hookspec
def register_models(register: Callable[..., None]) -> None:
    """Add model aliases: ``register(name, source, description="")`` where ``source`` is a folder,
    a ``.gguf`` file or a hub id[@revision]."""


@hookspec
def register_chat_templates(register: Callable[..., None]) -> None:
    """Add named chat templates: ``register(name, jinja_source)``; a model uses one with
    ``chat_template = "name"`` in its config table or ``LlamaWrapper.load(chat_template=...)``."""


@hookspec
def before_request(messages: list, params: Any, model: str, options: dict) -> Optional[Any]:
    """See (and change) a chat request before templating. Mutate ``messages``/``params`` in
    place, or return a new messages list, or a ``(messages, params)`` pair. Raise to refuse
    the request (an ``InvalidRequestError`` becomes a 400 naming the hook)."""


@hookspec
def stream_filter(model: str, options: dict) -> Optional[Any]:
    """Return an object with ``feed(text) -> str`` and ``flush() -> str`` that rewrites the
    answer's text deltas as they stream (it may hold text back), or None."""


@hookspec
def after_response(text: str, model: str, options: dict) -> Optional[str]:
    """See (and change) a finished answer's text; return the new text or None to keep it.
    Runs on complete results, after the stream filters."""
