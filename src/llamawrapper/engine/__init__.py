"""Generation engine: continuous batching, KV and prefix caches, sampling, stop rules, streaming."""

from .engine import Engine, EngineConfig
from .request import RequestHandle
from .runner import LlamaRunner

__all__ = ["Engine", "EngineConfig", "LlamaRunner", "RequestHandle"]
