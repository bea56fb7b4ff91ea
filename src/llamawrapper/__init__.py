"""LlamaWrapper: one library, one command line and one OpenAI-compatible server around
Hugging Face chat models. Public names only; the modules behind them are private."""

__version__ = "0.1.0"

import os as _os

# OpenMP workers that spin long between parallel regions fight for the cores whenever the CPU is
# shared (an HTTP thread, another process): measured 3-15x slower decoding. Workers that spin
# briefly, then sleep, cost nothing on a quiet machine (single stream: 30.7 tok/s vs 29.5 spinning,
# 18.2 sleeping at once) and were fastest under load (12.3 vs 6.9 spinning, 10.0 sleeping).
# Must be set before torch loads libgomp; values already in the environment win.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from .config import EngineSettings
from .errors import (
    ContextLengthExceededError,
    GenerationError,
    InvalidModelError,
    InvalidRequestError,
    LlamaWrapperError,
    ModelConflictError,
    ModelError,
    ModelHashMismatchError,
    ModelNotFoundError,
    ModelUnavailableError,
    PluginError,
    PluginRejectedError,
    QueueFullError,
    RequestCancelledError,
    UnsupportedModelError,
)
from .types import Result, SamplingParams, StreamEvent, Usage

# The names below pull in torch and transformers (seconds): imported on first use, so that a
# command that needs neither (``llamawrapper keys list``, ``admin``, ``--help``) starts at once.
_LAZY = {"LlamaWrapper": ".api", "ModelHost": ".models.host", "pipeline": ".tasks",
         "EngineConfig": ".engine", "RequestHandle": ".engine"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llamawrapper' has no attribute {name!r}")


__all__ = [
    "LlamaWrapper", "ModelHost", "pipeline", "EngineSettings", "EngineConfig", "RequestHandle", "Result", "SamplingParams",
    "StreamEvent", "Usage",
    "LlamaWrapperError", "ModelError", "ModelNotFoundError", "ModelConflictError", "ModelHashMismatchError",
    "ModelUnavailableError", "InvalidModelError", "UnsupportedModelError",
    "InvalidRequestError", "ContextLengthExceededError", "QueueFullError", "RequestCancelledError", "GenerationError",
    "PluginError", "PluginRejectedError",
]
