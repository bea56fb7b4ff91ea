"""What happens around the engine for one request: plugin hooks, output constraints (response
format, tools), the response cache, and ``ChatHandle`` — the handle callers get back, which
looks like the engine's ``RequestHandle`` (iterate, ``async for``, ``result()``, ``cancel()``)
and applies stream filters, tool-call parsing and ``after_response`` hooks to what it yields.

    messages ─ before_request hooks ─ tools rendering ─ template ─ prompt ids ─┬─ cache hit → replay
                                                                                └─ engine (+ grammar)
    events ─ tool-call hold-back ─ stream filters ─ caller;  result ─ after_response hooks
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, AsyncIterator, Callable, Iterator, Optional

from .. import chat as chatlib
from ..errors import InvalidRequestError, RequestCancelledError
from ..plugins import ActivePlugins
from .response_cache import ResponseCache, cache_key, is_deterministic
from .structured import tools as toolslib
from .structured.grammar import GrammarCompiler, grammar_for
from ..types import Result, SamplingParams, StreamEvent, Usage, join_logprobs


class Customizations:
    """Per-model extras: the plugins switched on, the response cache, the grammar compiler."""

    def __init__(self, llm: Any, plugins: Optional[ActivePlugins] = None, cache: Optional[ResponseCache] = None) -> None:
        self.llm = llm
        self.plugins = plugins or ActivePlugins(llm.name)
        self.cache = cache
        self._grammar: Optional[GrammarCompiler] = None

    @property
    def grammar(self) -> GrammarCompiler:
        if self._grammar is None:
            engine = self.llm.engine
            self._grammar = GrammarCompiler(self.llm.tokenizer, engine.runner.vocab_size, engine.eos_token_ids)
        return self._grammar

    def identity(self) -> dict[str, Any]:
        """What identifies the model's behaviour in a cache key."""
        loaded = self.llm.loaded
        manifest = loaded.manifest or {}
        template = getattr(self.llm.tokenizer, "chat_template", None) or ""
        return {
            "weights": manifest.get("source_sha256") or str(loaded.folder),
            "revision": getattr(loaded.source, "revision", None),
            "dtype": str(self.llm.engine.runner.dtype),
            "quantization": manifest.get("quantization") or getattr(loaded, "quantization", None),
            "adapter": manifest.get("adapter") or getattr(loaded, "adapter", None),
            "overrides": getattr(loaded, "overrides", None) or None,
            "chat_template": hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else str(template),
        }


def prepare_chat(custom: Customizations, messages: chatlib.Messages, params: SamplingParams, *, truncate: Optional[str],
                 response_format: Any = None, tools: Any = None, tool_choice: Any = None) -> tuple[list[int], SamplingParams, Optional[str], Optional[toolslib.ToolSpec]]:
    """Prompt ids, (possibly hook-changed) params, grammar and tool spec of a chat request."""
    llm = custom.llm
    msgs, params = custom.plugins.before_request(chatlib.normalize_messages(messages), params)
    spec = toolslib.parse_tools(tools, tool_choice)
    grammar = grammar_for(response_format)
    if spec is not None and spec.active:
        if grammar is not None:
            raise InvalidRequestError("response_format cannot be combined with tools unless tool_choice is 'none'.",
                                      param="response_format")
        grammar = toolslib.tool_grammar(spec)
    native = toolslib.template_supports_tools(llm.tokenizer)
    msgs = toolslib.render_messages(msgs, spec, native)
    template_kwargs = {"tools": toolslib.openai_tools(spec)} if native and spec is not None and spec.active else {}
    ids = llm.chat_prompt_ids(msgs, params.max_tokens, truncate, **template_kwargs)
    return ids, params, grammar, spec


def submit(custom: Customizations, prompt_ids: list[int], params: SamplingParams, *, grammar: Optional[str] = None,
           spec: Optional[toolslib.ToolSpec] = None, cache: Optional[bool] = None, **engine_kwargs: Any) -> "ChatHandle":
    """Answer from the cache or hand the request to the engine, behind a ``ChatHandle``."""
    if grammar is not None:
        if engine_kwargs.get("logits_processor") is not None:
            raise InvalidRequestError("A custom logits_processor cannot be combined with response_format or tools.",
                                      param="response_format")
        engine_kwargs["logits_processor"] = custom.grammar.processor(grammar)
    key = None
    if custom.cache is not None and cache is not False and is_deterministic(params):
        # Engine options that change the answer (namespace, adapter, ...) are part of the key too.
        options = {k: v for k, v in engine_kwargs.items() if k not in ("request_id", "logits_processor")}
        constraint = {"grammar": grammar, "tools": spec.choice if spec is not None else None, "engine": options}
        if engine_kwargs.get("namespace"):  # a LoRA adapter (or other namespace) changes the answer
            constraint["namespace"] = engine_kwargs["namespace"]
        key = cache_key(custom.identity(), prompt_ids, params, constraint)
        events = custom.cache.lookup(key)
        if events is not None:
            replay = Replay(events, engine_kwargs.get("request_id") or "")
            return ChatHandle(replay, custom.plugins, spec, cache_status="hit")
    handle = custom.llm.engine.submit(prompt_ids, params, **engine_kwargs)
    store = (lambda events, k=key: custom.cache.store(k, events)) if key is not None else None
    return ChatHandle(handle, custom.plugins, spec, cache_status="miss" if key is not None else None, on_done=store)


class Replay:
    """A cached answer, replayed with the interface of the engine's ``RequestHandle``."""

    def __init__(self, events: list[StreamEvent], request_id: str) -> None:
        self.events = events
        self.request_id = request_id
        self.started = time.perf_counter()
        self.metrics: dict[str, float] = {}
        self.cancelled = False
        self.done = False

    def cancel(self) -> None:
        self.cancelled = True

    def _timed(self, i: int, event: StreamEvent) -> StreamEvent:
        now = time.perf_counter() - self.started
        if i == 0:
            self.metrics["ttft"] = now
        if event.finish_reason is not None:
            self.metrics["latency"] = now
            self.done = True
        return event

    def __iter__(self) -> Iterator[StreamEvent]:
        for i, event in enumerate(self.events):
            if self.cancelled:
                yield StreamEvent("", [], "cancelled", event.usage or Usage(0, 0))
                return
            yield self._timed(i, event)

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        for event in self:
            yield event


class ChatHandle:
    """The caller's handle: the engine's (or the cache's) events after post-processing.

    ``cache_status`` is ``"hit"``, ``"miss"`` or None (the cache was not consulted)."""

    def __init__(self, source: Any, plugins: ActivePlugins, spec: Optional[toolslib.ToolSpec] = None, *,
                 cache_status: Optional[str] = None, on_done: Optional[Callable[[list[StreamEvent]], None]] = None) -> None:
        self.source = source
        self.request_id = source.request_id
        self.cache_status = cache_status
        self.plugins = plugins
        self.filters = plugins.stream_filters()
        self.spec = spec
        self.on_done = on_done
        self.raw: list[StreamEvent] = []
        active = spec is not None and spec.active
        self.mode: Optional[str] = None if active else "text"  # "text" | "tool" once decided
        if active and spec.choice != "auto":
            self.mode = "tool"
        self.held = ""

    @property
    def metrics(self) -> dict[str, float]:
        return self.source.metrics

    @property
    def done(self) -> bool:
        return self.source.done

    @property
    def cancelled(self) -> bool:
        return self.source.cancelled

    def cancel(self) -> None:
        self.source.cancel()

    # -- transformation ---------------------------------------------------------------------------
    def _filter(self, text: str, final: bool) -> str:
        for f in self.filters:
            text = f.feed(text) + (f.flush() if final else "")
        return text

    def _transform(self, event: StreamEvent) -> StreamEvent:
        self.raw.append(event)
        text, final = event.text, event.finish_reason is not None
        if self.mode != "text":
            self.held += text
            text = ""
            if self.mode is None and self.held.lstrip():  # "auto": the first characters decide
                self.mode = "tool" if self.held.lstrip().startswith("<") else "text"
                if self.mode == "text":
                    text, self.held = self.held, ""
        tool_calls, finish = None, event.finish_reason
        if final and self.mode != "text":
            tool_calls = toolslib.parse_calls(self.held)
            if tool_calls and finish == "stop":
                finish = "tool_calls"
            elif not tool_calls:
                text, self.held = self.held, ""  # cut short (length): the raw text is all there is
        text = self._filter(text, final)
        if final and self.on_done is not None and finish != "cancelled":
            self.on_done(self.raw)
        return StreamEvent(text, event.token_ids, finish, event.usage, tool_calls=tool_calls, logprobs=event.logprobs)

    def __iter__(self) -> Iterator[StreamEvent]:
        try:
            for event in self.source:
                yield self._transform(event)
        except BaseException:  # a failing stream filter (or the caller) ends the generation too
            self.source.cancel()
            raise

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        try:
            async for event in self.source:
                yield self._transform(event)
        except BaseException:
            self.source.cancel()
            raise

    # -- whole results ------------------------------------------------------------------------------
    def _assemble(self, events: list[StreamEvent]) -> Result:
        if not events or events[-1].finish_reason is None:
            raise RequestCancelledError("the request ended without a final event")
        last = events[-1]
        text = "".join(e.text for e in events)
        if last.tool_calls is None:
            text = self.plugins.after_response(text)
        return Result(text=text, finish_reason=last.finish_reason, usage=last.usage or Usage(0, 0),
                      token_ids=[t for e in events for t in e.token_ids], metrics=dict(self.metrics),
                      tool_calls=last.tool_calls, cache=self.cache_status, logprobs=join_logprobs(events),
                      prompt_logprobs=getattr(self.source, "prompt_logprobs", None))

    def result(self) -> Result:
        return self._assemble(list(self))

    async def aresult(self) -> Result:
        return self._assemble([e async for e in self])
