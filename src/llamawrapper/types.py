"""Value types that cross layers: sampling parameters, usage, stream events and results."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import InvalidRequestError

# A per-request logits processor: sees the tokens generated so far and the next-token
# logits row (1-D float tensor) and returns the row to sample from.
LogitsProcessor = Callable[[list, Any], Any]


@dataclass
class SamplingParams:
    """How one request samples and stops. Names follow OpenAI, extras follow transformers."""

    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def bad(param: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"Invalid value for '{param}': {why}", param=param)

        if self.max_tokens is not None:
            if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
                raise bad("max_tokens", f"expected an integer, got {self.max_tokens!r}.")
            if self.max_tokens < 1:
                raise bad("max_tokens", f"must be at least 1, got {self.max_tokens}.")
        for name, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise bad(name, f"expected a number, got {value!r}.")
            if not lo <= value <= hi:
                raise bad(name, f"must be between {lo:g} and {hi:g}, got {value}.")
            setattr(self, name, float(value))
        if self.top_p == 0.0:
            raise bad("top_p", "must be greater than 0.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", f"must be a non-negative integer, got {self.top_k!r}.")
        rp = self.repetition_penalty
        if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not (0.0 < rp <= 10.0):
            raise bad("repetition_penalty", f"must be a number in (0, 10], got {rp!r}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", f"expected an integer, got {self.seed!r}.")
        if len(self.stop) > 16:
            raise bad("stop", "at most 16 stop strings are allowed.")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad("stop", f"stop strings must be non-empty strings, got {s!r}.")


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class StreamEvent:
    """One step of one request: a text delta; the last event carries finish_reason and usage."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" | "length" | "tool_calls" | "cancelled" | None
    usage: Optional[Usage] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # OpenAI-shaped, on the last event of a tool call

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Result:
    """A finished answer: text, why it ended, token counts."""

    text: str
    finish_reason: str
    usage: Usage
    token_ids: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    tool_calls: Optional[list[dict[str, Any]]] = None  # OpenAI-shaped calls when finish_reason == "tool_calls"
    cache: Optional[str] = None  # "hit" | "miss" when the response cache was consulted

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
                "total_tokens": self.usage.total_tokens,
                "cached_tokens": self.usage.cached_tokens,
            },
            "metrics": dict(self.metrics),
            **({"tool_calls": self.tool_calls} if self.tool_calls else {}),
            **({"cache": self.cache} if self.cache else {}),
        }
