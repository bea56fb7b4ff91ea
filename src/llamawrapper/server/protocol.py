"""The OpenAI wire format: request bodies the server accepts and the response bodies it sends.

Request models accept unknown fields (``extra="allow"``: they are logged, not fatal), except the
fields OpenAI defines that this server cannot honour (``REFUSED``): those are refused by name
unless absent or at their no-op value. Range checks of sampling values stay in
``SamplingParams`` so the library and the server agree.
Response models are exact OpenAI shapes, so the official client's typed objects parse them;
they also document the API in ``/openapi.json``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

# Ranges documented in the schema; SamplingParams checks the same ones for library callers.
_SEED = dict(ge=-(2**63), lt=2**64)  # what a torch generator accepts
StopString = Annotated[str, Field(min_length=1)]


# OpenAI-defined request fields this server cannot honour -> the values that are harmless no-ops.
REFUSED: dict[str, tuple] = {
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
    "functions": (None,), "function_call": (None,), "reasoning_effort": (None,), "verbosity": (None,),
    "service_tier": (None, "auto", "default"), "store": (None, False), "metadata": (None, {}),
    "suffix": (None, ""),
}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted(k for k in (self.model_extra or {}) if k not in REFUSED)

    def refused_field(self) -> Optional[str]:
        """The first OpenAI field given that this server cannot honour, if any."""
        extra = self.model_extra or {}
        return next((k for k in sorted(extra) if k in REFUSED and extra[k] not in REFUSED[k]), None)


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # an assistant turn that called tools
    tool_call_id: Optional[str] = None  # a tool result answers this call


class StreamOptions(_Open):
    include_usage: bool = False


class _Sampling(_Open):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Union[StopString, Annotated[list[StopString], Field(max_length=16)], None] = None
    seed: Optional[int] = Field(None, **_SEED)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # logged with the request id
    safety_identifier: Optional[str] = None  # logged with the request id
    prompt_cache_key: Optional[str] = None  # prompts are cached by prefix anyway; accepted
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, Any]] = None  # token id (as a string) -> -100..100; checked by SamplingParams
    # transformers' names for the extras
    top_k: Optional[int] = Field(None, ge=0)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10)
    # vLLM's extra: generate up to max_tokens even past the end-of-sequence token (benchmarks)
    ignore_eos: Optional[bool] = None

    def sampling(self) -> dict[str, Any]:
        return dict(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, stop=self.stop,
                    seed=self.seed, top_k=self.top_k, repetition_penalty=self.repetition_penalty,
                    presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                    logit_bias=self.logit_bias, ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    # structured output and tools: validated by the library (llamawrapper.requests.structured)
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None  # honoured either way: an answer makes at most one call
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        if self.max_completion_tokens is not None:
            out["max_tokens"] = self.max_completion_tokens
        out.update(logprobs=self.logprobs, top_logprobs=self.top_logprobs)
        return out

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)  # legacy: the top alternatives per token
    best_of: Optional[int] = Field(None, ge=1)  # only best_of == n (or 1) is honoured

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        if self.logprobs is not None:
            out.update(logprobs=True, top_logprobs=self.logprobs)
            if self.echo:  # the echoed prompt's tokens get log-probabilities too
                out["prompt_logprobs"] = self.logprobs
        return out

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            return [p]
        return list(p)


class TokenizeRequest(_Open):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = False


class DetokenizeRequest(_Open):
    model: Optional[str] = None
    tokens: list[int]


# -- responses ---------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text, valid for the tool's parameters schema


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    tool_calls: Optional[list[ToolCall]] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None
    refusal: Optional[list[TokenLogprob]] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Optional[str]
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: Optional[str] = None


class DeltaToolCall(BaseModel):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[ToolCallFunction] = None


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: Optional[str] = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[UsageInfo] = None
    system_fingerprint: Optional[str] = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[str] = None
    logprobs: Optional[CompletionLogprobs] = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None
    system_fingerprint: Optional[str] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llamawrapper"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str
    models: dict[str, str] = Field(default_factory=dict)


async def json_object(request: Any) -> dict:
    """A free-form JSON object body (the admin routes validate their fields themselves)."""
    from ..errors import InvalidRequestError

    try:
        body = await request.json()
    except ValueError:
        raise InvalidRequestError("The body is not valid JSON.", param="body") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The body must be a JSON object.", param="body")
    return body
