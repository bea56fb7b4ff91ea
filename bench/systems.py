"""The systems under test, each behind one method: ``run(prompts, new_tokens, arrivals)`` serves a
set of requests (token ids) and returns what each caller saw (``RequestRecord``s) plus the
generated token ids.

- ``hf_sequential``: plain transformers, one ``model.generate`` per request, in arrival order;
- ``hf_padded``: all requests left-padded into one ``generate`` call;
- ``llamacpp``: llama.cpp through ``llama-cpp-python`` on the same GGUF, one request at a time
  (its ``Llama`` object reuses the KV of the longest common prefix with the previous prompt);
- ``engine``: this project's engine through the Python API, every request submitted from its
  own thread at its arrival time. ``engine:quantization=int8:dtype=bfloat16`` passes load options.

Every system decodes greedily and generates exactly ``new_tokens`` per request (EOS ignored).
Serial peers can be bounded (``max_requests``/``time_budget_s``): requests beyond the bound are
extrapolated from the measured ones' median service time and flagged ``measured=False``.
"""

from __future__ import annotations

import inspect
import os
import statistics
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from .metrics import RequestRecord, now


class Unavailable(Exception):
    """The system cannot run here (library missing, option unsupported); the reason is reported."""


ServeOne = Callable[[list[int], int], tuple[float, float, list[int]]]  # -> (first_token_t, end_t, token_ids)


def serve_serially(prompts: list[list[int]], new_tokens: int, serve_one: ServeOne, max_requests: int,
                   time_budget_s: float) -> tuple[list[RequestRecord], list[list[int]], float]:
    """All requests arrive at t0 and are served one after another, as a hand-written loop does."""
    t0 = now()
    records: list[RequestRecord] = []
    outputs: list[list[int]] = []
    services, prefills = [], []
    for ids in prompts:
        if records and (len(records) >= max_requests or now() - t0 > time_budget_s):
            break
        start = now()
        first, end, toks = serve_one(ids, new_tokens)
        services.append(end - start)
        prefills.append(first - start)
        records.append(RequestRecord(len(ids), len(toks), 0.0, first - t0, end - t0))
        outputs.append(toks)
    clock = records[-1].latency_s
    service, prefill = statistics.median(services), statistics.median(prefills)
    for ids in prompts[len(records):]:
        records.append(RequestRecord(len(ids), new_tokens, 0.0, clock + prefill, clock + service, measured=False))
        clock += service
    return records, outputs, clock


class _FirstCall:
    """A transformers logits processor that only notes when generation produced its first logits."""

    def __init__(self) -> None:
        self.first: Optional[float] = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.first is None:
            self.first = now()
        return scores


class HFSystem:
    """Plain transformers, as a user writes it by hand (``padded=False``: one call per request)."""

    def __init__(self, folder: Path, padded: bool, threads: int, max_requests: int = 10**9, time_budget_s: float = 1e9) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        # EOS is an ordinary token here, as with the engine's ignore_eos: every request runs to new_tokens
        self.model.generation_config.eos_token_id = None
        self.padded = padded
        self.max_requests, self.time_budget_s = max_requests, time_budget_s
        self.name = "hf_padded" if padded else "hf_sequential"

    def _generate(self, batch: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        from transformers import LogitsProcessorList

        torch = self.torch
        width = max(len(p) for p in batch)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        timer = _FirstCall()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=self.pad_id, logits_processor=LogitsProcessorList([timer]))
        return timer.first or now(), [row[width:].tolist() for row in out]

    def _one(self, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        first, toks = self._generate([ids], new_tokens)
        return first, now(), toks[0]

    def run(self, prompts: list[list[int]], new_tokens: int, arrivals: Optional[list[float]] = None):
        if not self.padded:
            return serve_serially(prompts, new_tokens, self._one, self.max_requests, self.time_budget_s)
        t0 = now()  # a padded batch starts when its last member has arrived: all arrive at t0 here
        first, toks = self._generate(prompts, new_tokens)
        end = now()
        records = [RequestRecord(len(p), len(t), 0.0, first - t0, end - t0) for p, t in zip(prompts, toks)]
        return records, toks, end - t0


class LlamaCppSystem:
    """llama.cpp through ``llama-cpp-python`` on the GGUF file, greedy, one request at a time."""

    name = "llamacpp"

    def __init__(self, gguf: Optional[Path], threads: int, n_ctx: int = 2048, max_requests: int = 10**9, time_budget_s: float = 1e9,
                 extra_bufts: bool = False) -> None:
        try:
            import llama_cpp
        except ImportError as exc:
            raise Unavailable(f"llama-cpp-python is not installed ({exc}); `pip install -e .[bench]` + `pip install llama-cpp-python`")
        if gguf is None:
            raise Unavailable("this model has no GGUF file to give llama.cpp")
        self.version = getattr(llama_cpp, "__version__", None)
        # llama-cpp-python 0.3.36 built here crashes (SIGSEGV in decode) on any batch of more than one
        # token when its extra CPU buffer types (AMX / repacked weights) are on; the Llama class has no
        # switch for them, so its default model params are wrapped while it loads.
        import llama_cpp.llama as lmod

        default = lmod.llama_cpp.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = extra_bufts
            return p

        lmod.llama_cpp.llama_model_default_params = params
        try:
            self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                                       n_threads_batch=threads, verbose=False)
        finally:
            lmod.llama_cpp.llama_model_default_params = default
        self.extra_bufts = extra_bufts
        self.max_requests, self.time_budget_s = max_requests, time_budget_s

    def _one(self, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        toks: list[int] = []
        first = None
        for token in self.llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if first is None:
                first = now()
            toks.append(int(token))
            if len(toks) >= new_tokens:
                break
        return first or now(), now(), toks

    def reset(self) -> None:
        """Forget the KV of the previous prompt (each workload starts cold)."""
        self.llm.reset()

    def run(self, prompts: list[list[int]], new_tokens: int, arrivals: Optional[list[float]] = None):
        return serve_serially(prompts, new_tokens, self._one, self.max_requests, self.time_budget_s)


def parse_options(spec: str) -> tuple[str, dict[str, Any]]:
    """``"engine:quantization=int8:dtype=bfloat16"`` -> ``("engine", {...})``."""
    kind, *parts = spec.split(":")
    opts: dict[str, Any] = {}
    for part in parts:
        key, _, value = part.partition("=")
        opts[key] = None if value in ("", "none", "None") else int(value) if value.isdigit() else value
    return kind, opts


class EngineSystem:
    """This project's engine through the Python API (``LlamaWrapper.load`` + ``submit``)."""

    def __init__(self, model: str, threads: int, load_options: dict[str, Any], engine_options: dict[str, Any]) -> None:
        from llamawrapper import LlamaWrapper

        params = inspect.signature(LlamaWrapper.load).parameters
        unknown = [k for k in load_options if k not in params]
        if unknown:
            raise Unavailable(f"LlamaWrapper.load has no option {unknown[0]!r} yet (options: {', '.join(p for p in params if p != 'cls')})")
        self.llm = LlamaWrapper.load(model, progress=False, engine={"threads": threads, **engine_options}, **load_options)
        self.tokenizer = self.llm.tokenizer
        self.name = "engine"

    def sampling(self, new_tokens: int):
        from llamawrapper.types import SamplingParams

        return SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until the worker has finished its last step (final events are sent mid-step)."""
        deadline = now() + timeout
        while now() < deadline:
            s = self.llm.engine.snapshot()
            if not (s["running"] or s["prefilling"] or s["queue_depth"]):
                return
            threading.Event().wait(0.005)

    def clear_prefix_cache(self) -> None:
        self.wait_idle()
        self.llm.engine.prefix_cache.clear()

    def run(self, prompts: list[list[int]], new_tokens: int, arrivals: Optional[list[float]] = None):
        arrivals = arrivals or [0.0] * len(prompts)
        params = self.sampling(new_tokens)
        records: list[Optional[RequestRecord]] = [None] * len(prompts)
        outputs: list[list[int]] = [[] for _ in prompts]
        errors: list[BaseException] = []
        start = threading.Barrier(len(prompts) + 1)
        t0_box: list[float] = []

        def client(i: int) -> None:
            try:
                start.wait()
                t0 = t0_box[0]
                delay = t0 + arrivals[i] - now()
                if delay > 0:
                    threading.Event().wait(delay)
                arrived = now()
                first = None
                for event in self.llm.submit(prompts[i], params):
                    if first is None and event.token_ids:
                        first = now()
                    outputs[i].extend(event.token_ids)
                end = now()
                records[i] = RequestRecord(len(prompts[i]), len(outputs[i]), arrived - t0, (first or end) - arrived, end - arrived)
            except BaseException as exc:  # reported after the run
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(prompts))]
        for t in threads:
            t.start()
        t0_box.append(now())
        start.wait()
        for t in threads:
            t.join()
        wall = now() - t0_box[0]
        if errors:
            raise errors[0]
        return [r for r in records if r is not None], outputs, wall


def build(spec: str, model: str, folder: Path, gguf: Optional[Path], threads: int, settings: Any) -> Any:
    """The system named by ``spec`` (see the module docstring), loaded and ready."""
    kind, opts = parse_options(spec)
    bounded = dict(max_requests=settings.peer_max_requests, time_budget_s=settings.peer_time_budget_s)
    if kind == "hf_sequential":
        return HFSystem(folder, padded=False, threads=threads, **bounded)
    if kind == "hf_padded":
        return HFSystem(folder, padded=True, threads=threads)
    if kind == "llamacpp":
        return LlamaCppSystem(gguf, threads, extra_bufts=bool(opts.get("extra_bufts", 0)), **bounded)
    if kind == "engine":
        engine_keys = {"max_batch_size", "max_queue", "max_tokens_in_flight", "prefill_chunk", "prefix_cache_mb", "compile_decode",
                       "onednn_linear", "attention_kernel"}
        engine_opts = {k: v for k, v in opts.items() if k in engine_keys}
        load_opts = {k: v for k, v in opts.items() if k not in engine_keys}
        return EngineSystem(model, threads, load_opts, engine_opts)
    raise ValueError(f"unknown system {spec!r}; known: hf_sequential, hf_padded, llamacpp, engine[:key=value...]")


def default_threads(settings: Any) -> int:
    return settings.threads or os.cpu_count() or 1
