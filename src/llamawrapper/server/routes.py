"""Route handlers: thin. Each turns a protocol request into engine submissions through
``LlamaWrapper`` and the results (or events) back into OpenAI's response shapes."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from ..errors import InvalidRequestError, LlamaWrapperError
from ..types import Usage
from . import protocol as P
from .auth import charge_streamed, charge_tokens, model_allowed, settle_completion
from .errors import APIError, from_exception, not_ready
from .logprobs import CompletionLogprobs, chat_logprobs, join
from .streaming import DONE, ClientGone, EventStream, cancel_all, merged, results_unless_disconnected, sse
from .tracing import span_of

log = logging.getLogger("llamawrapper.server")
router = APIRouter()

_ERRORS = {code: {"model": P.ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}
# each Server-Sent Event: its data is a JSON chunk of the response's shape, or "[DONE]"
_STREAMING = {200: {"content": {"text/event-stream": {"schema": {
    "type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}, "required": ["data"]}}}}}


def _state(request: Request) -> Any:
    return request.app.state.lw


def _rid(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex


def _log_unknown(body: P._Open, request: Request) -> None:
    unknown = body.unknown_fields()
    if unknown:
        log.info("ignoring unknown fields: %s", ", ".join(unknown), extra={"request_id": _rid(request), "fields": ",".join(unknown)})
    end_user = getattr(body, "user", None) or getattr(body, "safety_identifier", None)
    if end_user:  # OpenAI's end-user id: recorded with the request id for abuse tracing
        log.info("request for end user %s", end_user, extra={"request_id": _rid(request), "end_user": end_user})


def _usage_dict(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _sum_usage(usages: list[Usage], prompt_tokens: int) -> Usage:
    # OpenAI counts the prompt once per prompt, completions across every choice
    return Usage(prompt_tokens, sum(u.completion_tokens for u in usages), usages[0].cached_tokens if usages else 0)


def _params(body: P._Sampling) -> Any:
    """The request's ``SamplingParams``; OpenAI fields this server cannot honour are refused by name."""
    from ..api import sampling_params  # the api module imports torch; by now the models are loaded anyway

    refused = body.refused_field()
    if refused:
        raise InvalidRequestError(f"'{refused}' is not supported by this server.", param=refused)
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    best_of = getattr(body, "best_of", None)
    if best_of not in (None, 1, body.n):
        raise InvalidRequestError(f"Only best_of equal to n is supported; got best_of={best_of}, n={body.n}.", param="best_of")
    return sampling_params(**body.sampling())


def _check_choices(n: int, prompts: int, limit: int) -> None:
    if isinstance(n, bool) or n < 1:
        raise InvalidRequestError(f"Invalid value for 'n': must be at least 1, got {n}.", param="n")
    if n * prompts > limit:
        raise InvalidRequestError(f"At most {limit} choices per request (n x prompts); asked for {n * prompts}.", param="n")


def _submit_all(llm: Any, prompt_ids: list[list[int]], n: int, params: Any, rid: str, adapter: Optional[str] = None) -> list[Any]:
    handles: list[Any] = []
    try:
        for p, ids in enumerate(prompt_ids):
            for i in range(n):
                k = len(handles)
                handles.append(llm.submit(ids, params.for_choice(i), adapter=adapter,
                                          request_id=rid if len(prompt_ids) * n == 1 else f"{rid}-{k}"))
    except BaseException:
        cancel_all(handles)
        raise
    return handles


async def _results_or_gone(request: Request, model: str, handles: list[Any]) -> Optional[list[Any]]:
    """Every handle's result, recorded in the metrics; None when the client went away first
    (its generations are cancelled by ``results_unless_disconnected``)."""
    try:
        results = await results_unless_disconnected(handles, request.receive)
    except ClientGone:
        return None
    _record(request, model, handles, [r.usage for r in results], [r.finish_reason for r in results])
    return results


def _record(request: Request, model: str, handles: list[Any], usages: list[Usage], reasons: list[Optional[str]]) -> None:
    """A finished request into the key's token budget, the metrics and its trace span."""
    settle_completion(request, sum(u.completion_tokens for u in usages))  # the prompt was charged at admission
    metrics, served = _state(request).metrics, _served(request, model)
    for h, u, r in zip(handles, usages, reasons):
        metrics.observe_request(served, h.metrics, u.prompt_tokens, u.completion_tokens, r)
    if (span := span_of(request)) is not None:
        span.finish_generation(handles, usages, reasons)


def _served(request: Request, model: str) -> tuple[str, str]:
    """(served name, version) of the lease this request took, for metric labels."""
    return request.scope.get("state", {}).get("served") or (model, "")


def _traced(request: Request, operation: str, body: Any, lease: Any, response_id: str) -> None:
    """Remember which version answers (metric labels) and open the generation's trace span."""
    request.scope.setdefault("state", {})["served"] = (lease.name, lease.version)
    if (span := span_of(request)) is not None:
        span.start_generation(operation, body, lease.version, response_id)


# -- chat --------------------------------------------------------------------------------------------
@router.post("/v1/chat/completions", response_model=P.ChatCompletion, responses={**_ERRORS, **_STREAMING})
async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
    state, rid = _state(request), _rid(request)
    _log_unknown(body, request)
    params = _params(body)
    _check_choices(body.n, 1, state.settings.max_choices)
    use_cache = False if "no-cache" in request.headers.get("cache-control", "").lower() else None
    with await state.host.acquire_async(body.model) as lease:  # held until the engine has the requests
        _traced(request, "chat", body, lease, f"chatcmpl-{rid}")
        ids, handles = await run_in_threadpool(_submit_chats, lease.model, body, params, rid, use_cache, lease.adapter)
    charge_tokens(request, prompt=len(ids))
    cache_headers = {**_cache_headers(request, body.model, handles), **_version_header(lease)}
    completion_id, created = f"chatcmpl-{rid}", int(time.time())
    if body.stream:
        return EventStream(_chat_events(request, body, handles, completion_id, created, len(ids)), lambda: cancel_all(handles),
                           headers=cache_headers)
    results = await _results_or_gone(request, body.model, handles)
    if results is None:
        return Response(status_code=499)
    out = {
        "id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
        "choices": [{"index": i, "message": _assistant_message(r), "finish_reason": r.finish_reason,
                     "logprobs": chat_logprobs(r.logprobs)} for i, r in enumerate(results)],
        "usage": _usage_dict(_sum_usage([r.usage for r in results], len(ids))),
        "system_fingerprint": None,
    }
    return JSONResponse(out, headers=cache_headers)


def _submit_chats(llm: Any, body: P.ChatCompletionRequest, params: Any, rid: str, use_cache: Optional[bool],
                  adapter: Optional[str] = None) -> tuple[list[int], list[Any]]:
    """Plugins, response_format/tools and the response cache apply here (``llamawrapper.requests.flow``)."""
    from ..requests import flow  # imports torch, like the api module

    ids, params, grammar, spec = flow.prepare_chat(llm.custom, body.message_dicts(), params, truncate=None,
                                                       response_format=body.response_format, tools=body.tools,
                                                       tool_choice=body.tool_choice)
    handles: list[Any] = []
    try:
        for k in range(body.n):
            handles.append(flow.submit(llm.custom, ids, params.for_choice(k), grammar=grammar, spec=spec, cache=use_cache,
                                           **llm.route({"adapter": adapter, "request_id": rid if body.n == 1 else f"{rid}-{k}"})))
    except BaseException:
        cancel_all(handles)
        raise
    return ids, handles


def _cache_headers(request: Request, model: str, handles: list[Any]) -> dict[str, str]:
    statuses = [getattr(h, "cache_status", None) for h in handles]
    for status in statuses:
        _state(request).metrics.observe_cache(_served(request, model), status)
    if not any(statuses):
        return {}
    return {"x-cache": "hit" if all(s == "hit" for s in statuses) else "miss"}


def _assistant_message(r: Any) -> dict:
    if getattr(r, "tool_calls", None):
        return {"role": "assistant", "content": r.text or None, "tool_calls": r.tool_calls}
    return {"role": "assistant", "content": r.text}


async def _chat_events(request: Request, body: P.ChatCompletionRequest, handles: list[Any], cid: str, created: int,
                       prompt_tokens: int) -> AsyncIterator[bytes]:
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model, "system_fingerprint": None}
    if body.include_usage:
        base["usage"] = None

    def chunk(i: int, delta: dict, finish: Optional[str] = None, logprobs: Optional[dict] = None) -> bytes:
        return sse({**base, "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]})

    for i in range(len(handles)):
        yield chunk(i, {"role": "assistant", "content": ""})
    usages: list[Usage] = []
    reasons: list[Optional[str]] = []
    try:
        async for i, event in merged(handles):
            charge_streamed(request, len(event.token_ids or ()))
            if event.text or event.logprobs:
                yield chunk(i, {"content": event.text}, logprobs=chat_logprobs(event.logprobs))
            if getattr(event, "tool_calls", None):
                yield chunk(i, {"tool_calls": [{"index": k, **call} for k, call in enumerate(event.tool_calls)]})
            if event.finish_reason is not None:
                usages.append(event.usage or Usage(prompt_tokens, 0))
                reasons.append(event.finish_reason)
                yield chunk(i, {}, event.finish_reason)
    except LlamaWrapperError as exc:
        yield sse(from_exception(exc).body())
        return
    for line in _stream_end(request, body, handles, base, usages, reasons, prompt_tokens):
        yield line


def _stream_end(request: Request, body: Any, handles: list[Any], base: dict, usages: list[Usage],
                reasons: list[Optional[str]], prompt_tokens: int) -> list[str]:
    """The last lines of a finished stream (usage chunk if asked, ``[DONE]``), metrics recorded."""
    _record(request, body.model, handles, usages, reasons)
    usage = [sse({**base, "choices": [], "usage": _usage_dict(_sum_usage(usages, prompt_tokens))})] if body.include_usage else []
    return usage + [DONE]


# -- completions ---------------------------------------------------------------------------------------
@router.post("/v1/completions", response_model=P.Completion, responses={**_ERRORS, **_STREAMING})
async def completions(body: P.CompletionRequest, request: Request) -> Response:
    state, rid = _state(request), _rid(request)
    _log_unknown(body, request)
    params = _params(body)
    prompts = body.prompts()
    if not prompts:
        raise InvalidRequestError("The prompt is empty.", param="prompt")
    _check_choices(body.n, len(prompts), state.settings.max_choices)
    with await state.host.acquire_async(body.model) as lease:  # held until the engine has the requests
        llm = lease.model
        _traced(request, "text_completion", body, lease, f"cmpl-{rid}")
        prompt_ids = [await run_in_threadpool(_prompt_ids, llm, p) for p in prompts]
        handles = _submit_all(llm, prompt_ids, body.n, params, rid, lease.adapter)
    charge_tokens(request, prompt=sum(len(ids) for ids in prompt_ids))
    echoes = [(_prompt_text(llm, p) if body.echo else "") for p in prompts for _ in range(body.n)]
    prompt_total = sum(len(ids) for ids in prompt_ids)
    completion_id, created = f"cmpl-{rid}", int(time.time())
    if body.stream:
        firsts = [llm.detokenize(ids[:1]) for ids in prompt_ids for _ in range(body.n)]
        return EventStream(_completion_events(request, body, handles, echoes, completion_id, created, prompt_total, firsts),
                           lambda: cancel_all(handles), headers=_version_header(lease))
    results = await _results_or_gone(request, body.model, handles)
    if results is None:
        return Response(status_code=499)
    out = {
        "id": completion_id, "object": "text_completion", "created": created, "model": body.model,
        "choices": [{"index": i, "text": echoes[i] + r.text, "finish_reason": r.finish_reason,
                     "logprobs": _completion_logprobs(llm, prompt_ids[i // body.n], echoes[i], r)} for i, r in enumerate(results)],
        "usage": _usage_dict(_sum_usage([r.usage for r in results], prompt_total)),
        "system_fingerprint": None,
    }
    return JSONResponse(out, headers=_version_header(lease))


def _version_header(lease: Any) -> dict[str, str]:
    return {"x-model-version": lease.version}


def _completion_logprobs(llm: Any, prompt_ids: list[int], echo: str, r: Any) -> Optional[dict]:
    """Legacy logprobs of one choice: the echoed prompt's (when asked), then the answer's."""
    builder = CompletionLogprobs()
    head = builder.prompt(llm.detokenize(prompt_ids[:1]), r.prompt_logprobs) if r.prompt_logprobs is not None else None
    builder.offset = len(echo)
    return join(head, builder(r.logprobs))


def _prompt_ids(llm: Any, prompt: Any) -> list[int]:
    if isinstance(prompt, str):
        ids = llm.tokenize(prompt, add_special_tokens=True)
    else:
        ids = list(prompt)
        llm.detokenize(ids)  # validates the ids against the vocabulary
    if not ids:
        raise InvalidRequestError("The prompt is empty.", param="prompt")
    return ids


def _prompt_text(llm: Any, prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else llm.detokenize(prompt)


async def _completion_events(request: Request, body: P.CompletionRequest, handles: list[Any], echoes: list[str], cid: str,
                             created: int, prompt_tokens: int, first_tokens: list[str]) -> AsyncIterator[bytes]:
    base = {"id": cid, "object": "text_completion", "created": created, "model": body.model, "system_fingerprint": None}
    if body.include_usage:
        base["usage"] = None

    def chunk(i: int, text: str, finish: Optional[str] = None, logprobs: Optional[dict] = None) -> bytes:
        return sse({**base, "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": logprobs}]})

    offsets = [CompletionLogprobs(len(echo)) for echo in echoes]
    later = body.echo and body.logprobs is not None  # the prompt's logprobs are known once it is prefilled
    for i, echo in enumerate(echoes):
        if echo and not later:
            yield chunk(i, echo)
    usages: list[Usage] = []
    echoed: set[int] = set()
    reasons: list[Optional[str]] = []
    try:
        async for i, event in merged(handles):
            charge_streamed(request, len(event.token_ids or ()))
            if later and i not in echoed:
                echoed.add(i)
                prompt_lp = CompletionLogprobs().prompt(first_tokens[i], getattr(handles[i], "prompt_logprobs", None) or [None])
                yield chunk(i, echoes[i], logprobs=prompt_lp)
            if event.finish_reason is not None:
                usages.append(event.usage or Usage(0, 0))
                reasons.append(event.finish_reason)
                yield chunk(i, event.text, event.finish_reason, offsets[i](event.logprobs))
            elif event.text or event.logprobs:
                yield chunk(i, event.text, logprobs=offsets[i](event.logprobs))
    except LlamaWrapperError as exc:
        yield sse(from_exception(exc).body())
        return
    for line in _stream_end(request, body, handles, base, usages, reasons, prompt_tokens):
        yield line


# -- models, tokens ---------------------------------------------------------------------------------------
@router.get("/v1/models", response_model=P.ModelList, responses=_ERRORS)
async def list_models(request: Request) -> Response:
    data = [{"id": m["id"], "object": "model", "created": m["created"], "owned_by": "llamawrapper", "task": m["task"]}
            for m in _state(request).host.served() if model_allowed(request, m["id"])]
    return JSONResponse({"object": "list", "data": data})


@router.get("/v1/models/{model}", response_model=P.ModelCard, responses=_ERRORS)
async def get_model(model: str, request: Request) -> Response:
    served = next((m for m in _state(request).host.served() if m["id"] == model), None)
    if served is None:
        raise from_exception(_not_found(model))
    return JSONResponse({"id": served["id"], "object": "model", "created": served["created"], "owned_by": "llamawrapper",
                         "task": served["task"]})


def _not_found(model: str) -> Exception:
    from ..errors import ModelNotFoundError

    return ModelNotFoundError(f"The model '{model}' does not exist.")


@router.post("/tokenize", response_model=P.TokenizeResponse, responses=_ERRORS)
async def tokenize(body: P.TokenizeRequest, request: Request) -> Response:
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("Give exactly one of 'prompt' or 'messages'.", param="prompt")
    with await _state(request).host.acquire_async(body.model) as lease:
        llm = lease.model
        if body.messages is not None:
            ids = await run_in_threadpool(llm.chat_prompt_ids, [m.model_dump(exclude_none=True) for m in body.messages])
        else:
            ids = await run_in_threadpool(llm.tokenize, body.prompt, body.add_special_tokens)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": llm.context_length})


@router.post("/detokenize", response_model=P.DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: P.DetokenizeRequest, request: Request) -> Response:
    with await _state(request).host.acquire_async(body.model) as lease:
        return JSONResponse({"prompt": await run_in_threadpool(lease.model.detokenize, body.tokens)})


# -- probes, metrics -------------------------------------------------------------------------------------
@router.get("/health", response_model=P.Health)
async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "models": _state(request).host.statuses()})


@router.get("/ready", response_model=P.Health, responses={503: {"model": P.ErrorResponse}, 401: {"model": P.ErrorResponse}})
async def ready(request: Request) -> Response:
    state = _state(request)
    if state.draining:
        raise APIError(503, "The server is shutting down.", "service_unavailable_error", "draining")
    if not state.host.ready:
        raise not_ready(f"Models not ready: {state.host.statuses()}")
    return JSONResponse({"status": "ready", "models": state.host.statuses()})


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
                                                            401: {"model": P.ErrorResponse}})
async def metrics(request: Request) -> Response:
    m = _state(request).metrics
    return Response(m.render(), media_type=m.content_type)
