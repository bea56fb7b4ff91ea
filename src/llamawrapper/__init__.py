"""LlamaWrapper: one library, one command line and one OpenAI-compatible server around
Hugging Face chat models. Public names only; the modules behind them are private."""

__version__ = "0.1.0"

import os as _os

# OpenMP worker threads that spin between parallel regions fight for cores whenever the CPU is
# shared (an HTTP thread, another process) and after a loading thread exits: measured 5-15x
# slower decoding. Sleeping workers cost little here. Must be set before torch loads libgomp;
# an explicit OMP_WAIT_POLICY in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .api import LlamaWrapper
from .config import EngineSettings
from .engine import EngineConfig, RequestHandle
from .errors import (
    ContextLengthExceededError,
    GenerationError,
    InvalidModelError,
    InvalidRequestError,
    LlamaWrapperError,
    ModelError,
    ModelNotFoundError,
    PluginError,
    PluginRejectedError,
    QueueFullError,
    RequestCancelledError,
    UnsupportedModelError,
)
from .types import Result, SamplingParams, StreamEvent, Usage

__all__ = [
    "LlamaWrapper", "EngineSettings", "EngineConfig", "RequestHandle", "Result", "SamplingParams", "StreamEvent", "Usage",
    "LlamaWrapperError", "ModelError", "ModelNotFoundError", "InvalidModelError", "UnsupportedModelError",
    "InvalidRequestError", "ContextLengthExceededError", "QueueFullError", "RequestCancelledError", "GenerationError",
    "PluginError", "PluginRejectedError",
]
