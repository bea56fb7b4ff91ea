"""Value types that cross layers: sampling parameters, usage, stream events and results."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
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
    presence_penalty: float = 0.0  # OpenAI: minus this from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times how often a token was generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: bool = False  # return each generated token's log-probability
    top_logprobs: int = 0  # ...and the this many most likely tokens at each position (0-20)
    prompt_logprobs: Optional[int] = None  # log-probabilities of the prompt's tokens, with this many alternatives

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether any logit changes before selection (penalties, bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.repetition_penalty != 1.0)

    def for_choice(self, index: int) -> "SamplingParams":
        """The parameters of choice ``index`` of an ``n``-choice request: choice 0 is these
        parameters; every other choice gets its own seed derived from ``seed`` and ``index``
        (so sampled choices differ, and the same seed reproduces all of them). Without a seed
        each choice's generator is seeded at random anyway."""
        if index == 0 or self.seed is None:
            return self
        digest = hashlib.sha256(f"{self.seed}:{index}".encode()).digest()
        return replace(self, seed=int.from_bytes(digest[:8], "big") >> 1)

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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not -2.0 <= value <= 2.0:
                raise bad(name, f"must be a number between -2 and 2, got {value!r}.")
            setattr(self, name, float(value))
        self.logit_bias = _logit_bias(self.logit_bias, bad)
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", f"expected a boolean, got {self.ignore_eos!r}.")
        if not isinstance(self.logprobs, bool):
            raise bad("logprobs", f"expected a boolean, got {self.logprobs!r}.")
        tl = self.top_logprobs
        if isinstance(tl, bool) or not isinstance(tl, int) or not 0 <= tl <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {tl!r}.")
        if tl and not self.logprobs:
            raise bad("top_logprobs", "needs 'logprobs' to be true.")
        pl = self.prompt_logprobs
        if pl is not None and (isinstance(pl, bool) or not isinstance(pl, int) or not 0 <= pl <= MAX_TOP_LOGPROBS):
            raise bad("prompt_logprobs", f"must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {pl!r}.")


MAX_TOP_LOGPROBS = 20


def _logit_bias(bias: Any, bad: Callable[[str, str], InvalidRequestError]) -> dict[int, float]:
    """``{token id: bias}`` with integer ids (JSON sends them as strings) and biases in -100..100.
    Ids beyond the vocabulary are refused by the engine, which knows its size."""
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise bad("logit_bias", f"expected an object mapping token ids to numbers, got {type(bias).__name__}.")
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            if isinstance(key, bool) or isinstance(key, float):
                raise ValueError
            token = int(key)
        except (TypeError, ValueError):
            raise bad("logit_bias", f"keys must be integer token ids, got {key!r}.") from None
        if token < 0:
            raise bad("logit_bias", f"token ids must not be negative, got {token}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not -100 <= value <= 100:
            raise bad("logit_bias", f"biases must be numbers between -100 and 100, got {value!r} for token {token}.")
        out[token] = float(value)
    return out


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TokenLogprob:
    """A token and its log-probability under the model (its raw next-token distribution, before
    temperature, penalties or bias); ``top_logprobs`` lists the most likely alternatives."""

    token_id: int
    token: str  # its text; a token that is part of a multi-byte character shows its bytes escaped
    bytes: list[int]  # its UTF-8 bytes
    logprob: float
    top_logprobs: list["TokenLogprob"] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's chat shape: ``{"token", "logprob", "bytes", "top_logprobs"}``."""
        return {"token": self.token, "logprob": self.logprob, "bytes": self.bytes,
                "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in self.top_logprobs]}


@dataclass
class StreamEvent:
    """One step of one request: a text delta; the last event carries finish_reason and usage."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" | "length" | "tool_calls" | "cancelled" | None
    usage: Optional[Usage] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # OpenAI-shaped, on the last event of a tool call
    logprobs: Optional[list[TokenLogprob]] = None  # when asked: one per token of the text (not EOS)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def join_logprobs(events: list[StreamEvent]) -> Optional[list[TokenLogprob]]:
    """The log-probability entries of a whole answer (None when they were not asked for)."""
    if all(e.logprobs is None for e in events):
        return None
    return [t for e in events for t in (e.logprobs or [])]


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
    logprobs: Optional[list[TokenLogprob]] = None  # when asked: one per token of the text
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None  # when asked: one per prompt token (the first None)

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
            **({"logprobs": [t.to_dict() for t in self.logprobs]} if self.logprobs is not None else {}),
        }
