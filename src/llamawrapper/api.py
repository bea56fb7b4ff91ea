"""``LlamaWrapper``: the Python API. Turns messages or prompts into token ids, hands them to the
model's engine, and returns results or streams of events."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from . import chat as chatlib
from .requests import flow
from .models import loading, registry
from .config import CacheSettings, EngineSettings
from .engine import Engine, LlamaRunner, RequestHandle
from .errors import InvalidRequestError
from .types import Result, SamplingParams, StreamEvent

log = logging.getLogger("llamawrapper")

SAMPLING_NAMES = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed", "presence_penalty",
                  "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "prompt_logprobs", "ignore_eos")
TRUNCATION = (None, "oldest")


def sampling_params(**kwargs: Any) -> SamplingParams:
    """``SamplingParams`` from keyword arguments, naming any unknown one."""
    if "n" in kwargs:
        raise InvalidRequestError("For several choices call llm.choices(messages, n=N, ...).", param="n")
    if kwargs.get("max_completion_tokens") is not None:  # OpenAI's newer name
        if kwargs.get("max_tokens") not in (None, kwargs["max_completion_tokens"]):
            raise InvalidRequestError("Give max_tokens or max_completion_tokens, not both.", param="max_completion_tokens")
        kwargs["max_tokens"] = kwargs["max_completion_tokens"]
    kwargs.pop("max_completion_tokens", None)
    unknown = sorted(set(kwargs) - set(SAMPLING_NAMES))
    if unknown:
        raise InvalidRequestError(f"Unknown sampling parameter '{unknown[0]}'; known: {', '.join(SAMPLING_NAMES)}.", param=unknown[0])
    return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None or k == "max_tokens"})


class LlamaWrapper:
    """A loaded chat model with its engine. Build with ``LlamaWrapper.load(...)``."""

    def __init__(self, loaded: loading.LoadedModel, engine: Engine) -> None:
        self.loaded = loaded
        self.engine = engine
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.custom = flow.Customizations(self)  # plugins, response cache, grammars (see load())

    @classmethod
    def load(
        cls,
        source: str = "smollm2",
        *,
        dtype: Optional[str] = None,
        device: str = "cpu",
        engine: Union[EngineSettings, dict, None] = None,
        progress: bool = True,
        plugins: Optional[list] = None,
        cache: Union[bool, str, CacheSettings, dict, None] = None,
        chat_template: Optional[str] = None,
        quantization: Optional[str] = None,
        overrides: Optional[dict[str, Any]] = None,
        adapters: Optional[dict[str, str]] = None,
    ) -> "LlamaWrapper":
        """Load a model by alias, folder, ``.gguf`` file or ``hub/id@revision``.

        ``plugins``: names (or ``{"name": ..., **options}``) switched on for this model, else the
        config file's ``[models.NAME] plugins``. ``cache``: True, a ``cache_url``
        (``redis://...``/``sqlite:///...``) or ``CacheSettings`` turn the response cache on (else
        ``[cache]``/``LLAMAWRAPPER_CACHE_*``). ``chat_template``: a template registered by a plugin.

        ``dtype``: float32 (default), bfloat16 or float16. ``quantization``: None, ``"int8"`` or
        ``"int4"`` (weight-only), ``"w8a8"`` (int8 weights and activations; cached next to the model). ``overrides``: model-config changes
        applied before loading (``num_hidden_layers``, ``rope_scaling``, ``max_position_embeddings``,
        ``attn_implementation``, ``rms_norm_eps``). ``adapters``: ``{"name": "lora/folder"}``, picked
        per request with ``adapter="name"``. Each falls back to the config file's ``[models.NAME]``."""
        from .engine.threads import set_process_threads
        from .requests import customize

        settings = EngineSettings.of(engine)
        set_process_threads(settings.threads, settings.pin_threads)
        from .models import adapters as adapterlib
        from .config import model_table

        table = model_table(source)
        adapters = adapters if adapters is not None else table.get("adapters")

        def build(in_child: bool) -> "LlamaWrapper":
            how = dict(source=registry.resolve(customize.model_source(source)), dtype=dtype or table.get("dtype") or "float32",
                       device=device, progress=progress and not in_child, quantization=quantization or table.get("quantization"),
                       overrides=overrides if overrides is not None else table.get("overrides"))
            from .engine.executor import get_executor
            from .models import load_process

            if in_child:
                loaded = load_process.get_load_process().load(handover=lambda fn: get_executor().call(fn).result(), **how)
            else:
                loaded = loading.load(**how)
                if load_process.enabled():
                    load_process.get_load_process().remember(loaded)
            rows = adapterlib.attach(loaded.model, adapters, next(loaded.model.parameters()).dtype) if adapters else None
            runner = LlamaRunner(loaded.model, fuse=settings.fuse_projections, attention_fp32=settings.attention_fp32,
                                 compile=settings.compile_decode, attention_per_row=settings.attention_per_row,
                                 kv_dtype=settings.kv_cache_dtype, onednn=settings.onednn_linear,
                                 kernel=settings.attention_kernel, int8_kernel=settings.int8_kernel,
                                 int4_kernel=settings.int4_kernel, bf16_kernel=settings.bf16_kernel,
                                 f32_kernel=settings.f32_kernel)
            runner.row_hook = rows.bind if rows is not None else None
            if runner.compiled is not None:  # compile_decode: its graphs now, not in the first request
                get_executor().call(runner.warm_up).result()
            return cls(loaded, Engine(runner, loaded.tokenizer, _eos_ids(loaded), settings.engine_config()))

        llm = _off_caller_thread(build, device)
        llm.adapters = dict(adapters or {})
        customize.apply(llm, source, plugins=plugins, cache=cache, chat_template=chat_template)
        return llm

    # -- facts -----------------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return self.engine.context_length

    @property
    def runs_as(self) -> tuple[str, Optional[str]]:
        """(dtype of the activations, quantization) this model runs with."""
        return str(self.engine.runner.dtype).removeprefix("torch."), self.loaded.quantization

    def info(self) -> dict[str, Any]:
        cfg = self.loaded.model.config
        dtype, quantization = self.runs_as
        return {
            "name": self.name,
            "source": self.loaded.source.name,
            "folder": str(self.loaded.folder),
            "architecture": cfg.model_type,
            "context_length": self.context_length,
            "dtype": dtype,
            "parameters": sum(p.numel() for p in self.loaded.model.parameters()),
            "source_sha256": self.loaded.manifest.get("source_sha256"),
            "quantization": quantization,
            "overrides": dict(self.loaded.overrides),
            "adapters": sorted(getattr(self, "adapters", {})),
            "config": self.effective_config(),
        }

    def effective_config(self) -> dict[str, Any]:
        """The model config as it runs (after overrides), JSON-ready."""
        from .models.overrides import effective_config

        return effective_config(self.loaded.model.config)

    def route(self, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Turn an ``adapter=`` keyword into the engine namespace that selects it."""
        from .models.adapters import namespace_for
        from .errors import ModelNotFoundError

        adapter = engine_kwargs.pop("adapter", None)
        if adapter:
            known = getattr(self, "adapters", {})
            if adapter not in known:
                raise ModelNotFoundError(
                    f"Adapter '{adapter}' is not loaded on '{self.name}'; loaded: {', '.join(sorted(known)) or 'none'}.")
            engine_kwargs["namespace"] = namespace_for(adapter) + (f"|{engine_kwargs['namespace']}" if engine_kwargs.get("namespace") else "")
        return engine_kwargs

    # -- text <-> tokens -------------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"text must be a string, got {type(text).__name__}.", param="text")
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def detokenize(self, token_ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = list(token_ids)
        vocab = self.engine.runner.vocab_size
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token ids must be integers in [0, {vocab}); got {bad[0]!r}.", param="tokens")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: chatlib.Messages, add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        """The rendered prompt for ``messages`` (what the model actually reads)."""
        return chatlib.render(self.tokenizer, chatlib.normalize_messages(messages), add_generation_prompt, **template_kwargs)

    def count_tokens(self, messages_or_text: chatlib.Messages) -> int:
        """Tokens of a raw text, or of the rendered prompt of a list of messages."""
        if isinstance(messages_or_text, str):
            return len(self.tokenize(messages_or_text))
        return len(self.tokenize(self.apply_chat_template(messages_or_text)))

    # -- building requests -----------------------------------------------------------------------
    def chat_prompt_ids(
        self, messages: chatlib.Messages, max_tokens: Optional[int] = None, truncate: Optional[str] = None, **template_kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat prompt, truncated by dropping old turns if asked."""
        if truncate not in TRUNCATION:
            raise InvalidRequestError(f"truncate must be one of {TRUNCATION}; got {truncate!r}.", param="truncate")
        msgs = chatlib.normalize_messages(messages)
        encode = lambda m: self.tokenize(chatlib.render(self.tokenizer, m, True, **template_kwargs))  # noqa: E731
        ids = encode(msgs)
        if truncate == "oldest" and len(ids) + (max_tokens or 1) > self.context_length:
            msgs = chatlib.truncate_oldest(msgs, lambda m: len(encode(m)) + (max_tokens or 1) <= self.context_length)
            ids = encode(msgs)
        return ids

    def submit(self, prompt_ids: list[int], params: SamplingParams, **engine_kwargs: Any) -> RequestHandle:
        """Hand token ids to the engine; the handle streams ``StreamEvent``s."""
        return self.engine.submit(prompt_ids, params, **self.route(engine_kwargs))

    def submit_chat(self, messages: chatlib.Messages, params: SamplingParams, truncate: Optional[str] = None, *,
                    response_format: Any = None, tools: Any = None, tool_choice: Any = None, cache: Optional[bool] = None,
                    **engine_kwargs: Any) -> flow.ChatHandle:
        """A chat request through plugins, output constraints and the response cache; the
        handle streams ``StreamEvent``s (the last may carry ``tool_calls``) and says
        ``cache_status``."""
        ids, params, grammar, spec = flow.prepare_chat(self.custom, messages, params, truncate=truncate,
                                                           response_format=response_format, tools=tools, tool_choice=tool_choice)
        return flow.submit(self.custom, ids, params, grammar=grammar, spec=spec, cache=cache, **self.route(engine_kwargs))

    def submit_prompt(self, prompt: Union[str, list[int]], params: SamplingParams, *, response_format: Any = None,
                      cache: Optional[bool] = None, **engine_kwargs: Any) -> flow.ChatHandle:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, add_special_tokens=True)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = prompt
        else:
            raise InvalidRequestError("prompt must be a non-empty string or list of token ids.", param="prompt")
        if not ids:
            raise InvalidRequestError("The prompt is empty.", param="prompt")
        grammar = flow.grammar_for(response_format)
        return flow.submit(self.custom, ids, params, grammar=grammar, cache=cache, **self.route(engine_kwargs))

    # -- convenience -----------------------------------------------------------------------------
    def chat(self, messages: chatlib.Messages, *, truncate: Optional[str] = None, response_format: Any = None,
             tools: Any = None, tool_choice: Any = None, cache: Optional[bool] = None, adapter: Optional[str] = None,
             **sampling: Any) -> Result:
        """Answer a user string or OpenAI-style messages. ``response_format`` constrains the
        answer (JSON object/schema, regex, choice); ``tools`` may make it a ``tool_calls`` answer;
        ``cache=False`` skips the response cache."""
        return self.submit_chat(messages, sampling_params(**sampling), truncate, response_format=response_format,
                                tools=tools, tool_choice=tool_choice, cache=cache, adapter=adapter).result()

    def choices(self, messages: chatlib.Messages, n: int = 1, *, truncate: Optional[str] = None, response_format: Any = None,
                tools: Any = None, tool_choice: Any = None, cache: Optional[bool] = None, adapter: Optional[str] = None,
                **sampling: Any) -> list[Result]:
        """``n`` answers to one conversation, generated together (OpenAI's ``n``). Sampled
        choices differ: each has its own generator, seeded from ``seed`` and its index, so the
        same seed gives the same choices (choice 0 is what ``chat`` gives with that seed)."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 128:
            raise InvalidRequestError(f"Invalid value for 'n': must be an integer between 1 and 128, got {n!r}.", param="n")
        ids, params, grammar, spec = flow.prepare_chat(self.custom, messages, sampling_params(**sampling), truncate=truncate,
                                                       response_format=response_format, tools=tools, tool_choice=tool_choice)
        handles: list[Any] = []
        try:
            for k in range(n):
                handles.append(flow.submit(self.custom, ids, params.for_choice(k), grammar=grammar, spec=spec, cache=cache,
                                           **self.route({"adapter": adapter})))
            return [h.result() for h in handles]
        finally:
            for h in handles:
                h.cancel()

    def stream(self, messages: chatlib.Messages, *, truncate: Optional[str] = None, response_format: Any = None,
               tools: Any = None, tool_choice: Any = None, cache: Optional[bool] = None, adapter: Optional[str] = None,
               **sampling: Any) -> Iterator[StreamEvent]:
        """Answer as a stream of text deltas; the last event carries finish_reason and usage.
        Closing the iterator early (``break``, Ctrl-C) cancels the generation."""
        return _cancel_on_close(self.submit_chat(messages, sampling_params(**sampling), truncate, response_format=response_format,
                                                 tools=tools, tool_choice=tool_choice, cache=cache, adapter=adapter))

    def generate(self, prompt: Union[str, list[int]], *, response_format: Any = None, cache: Optional[bool] = None,
                 adapter: Optional[str] = None, **sampling: Any) -> Result:
        """Continue a raw prompt (no chat template)."""
        return self.submit_prompt(prompt, sampling_params(**sampling), response_format=response_format, cache=cache,
                                  adapter=adapter).result()

    def stream_generate(self, prompt: Union[str, list[int]], *, response_format: Any = None, cache: Optional[bool] = None,
                        adapter: Optional[str] = None, **sampling: Any) -> Iterator[StreamEvent]:
        return _cancel_on_close(self.submit_prompt(prompt, sampling_params(**sampling), response_format=response_format, cache=cache,
                                                   adapter=adapter))

    def batch(self, items: list[chatlib.Messages], *, truncate: Optional[str] = None, response_format: Any = None,
              tools: Any = None, tool_choice: Any = None, cache: Optional[bool] = None, adapter: Optional[str] = None,
              **sampling: Any) -> list[Result]:
        """Answer many prompts or conversations together through the engine; results in order."""
        params = sampling_params(**sampling)
        if not isinstance(items, (list, tuple)):
            raise InvalidRequestError("batch() takes a list of prompts or conversations.", param="items")
        formats = response_format if isinstance(response_format, list) else [response_format] * len(items)
        if len(formats) != len(items):
            raise InvalidRequestError("A list of response formats must have one per item.", param="response_format")
        prepared = [flow.prepare_chat(self.custom, item, params, truncate=truncate, response_format=rf, tools=tools,
                                          tool_choice=tool_choice) for item, rf in zip(items, formats)]
        handles: list[Any] = []
        try:
            for ids, p, grammar, spec in prepared:
                handles.append(flow.submit(self.custom, ids, p, grammar=grammar, spec=spec, cache=cache,
                                               **self.route({"adapter": adapter})))
            return [h.result() for h in handles]
        finally:
            for h in handles:
                h.cancel()

    def close(self) -> None:
        self.engine.shutdown()
        if self.custom.cache is not None:
            self.custom.cache.close()

    def __enter__(self) -> "LlamaWrapper":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _off_caller_thread(build: Callable[[bool], Any], device: str = "cpu") -> Any:
    """Run ``build`` where it cannot slow the models already loaded, and return its result (or
    raise its error).

    With no other model loaded it runs in a short-lived thread: a thread that runs torch work
    keeps an OpenMP team for its whole life, and a second team beside the executor's made
    libgomp throttle its waiting and decoding 1.7x slower (18 vs 30 tokens/s single stream,
    measured), so the caller's thread is kept free of it. Beside loaded models (they may be
    serving) the heavy part runs in the low-priority loader process (``models/load_process.py``)
    and only the hand-over happens here: a load in this process held the GIL and cut a serving
    model's decoding to 0.22x while it ran (docs/HOST.md)."""
    from .engine.executor import get_executor
    from .engine.threads import limit_current_thread
    from .models import load_process

    box: dict[str, Any] = {}
    beside_others = get_executor().workers > 0
    in_child = beside_others and str(device) == "cpu" and load_process.enabled()

    def run() -> None:
        try:
            if beside_others:
                limit_current_thread(1)
            box["value"] = build(in_child)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=run, name="llamawrapper-load")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _cancel_on_close(handle: RequestHandle) -> Iterator[StreamEvent]:
    try:
        yield from handle
    finally:
        handle.cancel()


def _eos_ids(loaded: loading.LoadedModel) -> set[int]:
    ids: set[int] = set()
    gen = getattr(loaded.model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), loaded.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
