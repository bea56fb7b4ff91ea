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

from .api import LlamaWrapper
from .config import EngineSettings
from .engine import EngineConfig, RequestHandle
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
from .models.host import ModelHost
from .types import Result, SamplingParams, StreamEvent, Usage
from .tasks import pipeline

__all__ = [
    "LlamaWrapper", "ModelHost", "pipeline", "EngineSettings", "EngineConfig", "RequestHandle", "Result", "SamplingParams",
    "StreamEvent", "Usage",
    "LlamaWrapperError", "ModelError", "ModelNotFoundError", "ModelConflictError", "ModelHashMismatchError",
    "ModelUnavailableError", "InvalidModelError", "UnsupportedModelError",
    "InvalidRequestError", "ContextLengthExceededError", "QueueFullError", "RequestCancelledError", "GenerationError",
    "PluginError", "PluginRejectedError",
]
