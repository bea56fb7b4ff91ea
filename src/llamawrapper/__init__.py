"""LlamaWrapper: one library, one command line and one OpenAI-compatible server around
Hugging Face chat models. Public names only; the modules behind them are private."""

__version__ = "0.1.0"

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
