"""The OpenAI-compatible HTTP server (``llamawrapper serve``): FastAPI app factory, runner,
and the ``serve`` command whose flags are derived from the settings classes. Names are
imported lazily so the CLI can register ``serve`` without importing FastAPI."""

from typing import Any

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "serve":
        from .run import serve

        return serve
    raise AttributeError(name)
