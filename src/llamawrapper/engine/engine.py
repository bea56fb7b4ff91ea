"""The engine: one per loaded model, a worker thread that batches every request it is given.

Each iteration of the worker (a *step*): drop cancelled requests, admit waiting ones within
the configured limits, prefill up to ``prefill_chunk`` prompt tokens (reusing cached
prefixes), then run one batched decode step for every running sequence. A request joins the
decode batch the step after its prefill ends and leaves it the step it finishes, so no request
waits for another's length.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

from ..errors import ContextLengthExceededError, GenerationError, InvalidRequestError, LlamaWrapperError, QueueFullError
from ..types import LogitsProcessor, SamplingParams, StreamEvent, TokenLogprob, Usage
from .detokenizer import StreamingDetokenizer
from .executor import Executor, get_executor
from .kv_cache import PackWriter, SequenceKV, SlotCache
from .prefix_cache import PrefixCache
from .request import Request, RequestHandle
from .runner import LlamaRunner
from .sampling import Sampler, make_generator
from .speculative import lookup_of, speculable
from .stopping import StopStringMatcher

log = logging.getLogger("llamawrapper.engine")

MAX_DRAFT = 32  # the most draft tokens ``prompt_lookup`` may ask for per verify step


@dataclass
class EngineConfig:
    max_batch_size: int = 32
    max_queue: int = 256
    max_tokens_in_flight: int = 65536
    prefill_chunk: int = 256
    prefix_cache_bytes: int = 256 * 1024 * 1024
    prefix_block_size: int = 16
    prompt_lookup: int = 0  # max draft tokens of prompt-lookup speculative decoding; 0 = off


@dataclass
class EngineStats:
    steps: int = 0
    decode_steps: int = 0
    prefill_tokens: int = 0
    prefill_forwards: int = 0  # forwards that prefilled prompt chunks (several requests' when packed)
    generated_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0
    verify_steps: int = 0  # decode steps that verified prompt-lookup drafts
    draft_tokens: int = 0  # draft tokens proposed (and verified)
    accepted_draft_tokens: int = 0  # ...of which the answer took


class Engine:
    """Continuous-batching generation over a ``LlamaRunner``, stepped by the process's
    executor thread (``executor.py``) together with every other loaded model."""

    def __init__(self, runner: LlamaRunner, tokenizer: Any, eos_token_ids: Iterable[int], config: EngineConfig | None = None,
                 executor: Optional[Executor] = None) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = set(int(t) for t in eos_token_ids)
        self.config = config or EngineConfig()
        k = self.config.prompt_lookup
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_DRAFT:
            raise InvalidRequestError(f"Invalid value for 'prompt_lookup': expected an integer from 0 (off) to {MAX_DRAFT}, "
                                      f"got {k!r}.", param="prompt_lookup")
        self.context_length = runner.context_length
        self.lookup_min_ngram = 2  # shortest n-gram a draft may be looked up by (speculative.py; benches vary it)
        # drafts are verified exactly only in float32: with bf16 activations (bf16, int8, int4 models)
        # a T-token forward's logits differ from T one-token steps enough to change greedy answers
        # ...and not with int8 activations (w8a8): a T-token forward attends with other float sums
        self.speculate = bool(k) and runner.dtype == torch.float32 and not getattr(runner, "quantizes_activations", False)
        if k and not self.speculate:
            log.warning("prompt_lookup is ignored for a %s model: speculative decoding is exact only in float32",
                        "w8a8" if getattr(runner, "quantizes_activations", False) else str(runner.dtype).replace("torch.", ""))
        self.verify_packed = True  # verify steps run projections on real positions only (False: on the padded batch)
        self.pack_prefill = True  # several requests' prompt chunks in one forward (False: one forward per request)
        self.share_prefix = True  # decode attention reads a prefix common to several rows from one of them (kv_cache.py)
        self.slots = SlotCache(runner.n_layers, runner.n_kv_heads, runner.head_dim, runner.kv_dtype, self.config.max_batch_size,
                               block=self.config.prefix_block_size)
        self.prefix_cache = PrefixCache(self.config.prefix_cache_bytes, self.config.prefix_block_size)
        self.stats = EngineStats()
        self.sampler = Sampler(tokenizer)
        self._lock = threading.Lock()
        self._incoming: deque[Request] = deque()
        self._waiting: deque[Request] = deque()
        self._prefilling: list[Request] = []
        self._running: list[Request] = []
        self._closed = False
        self.executor = executor or get_executor()
        self.executor.attach(self)

    # -- public, any thread --------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        namespace: str = "",
        logits_processor: Optional[LogitsProcessor] = None,
        request_id: str | None = None,
    ) -> RequestHandle:
        """Queue a request; raise ``QueueFullError`` at once when the queue is full."""
        if not prompt_ids:
            raise InvalidRequestError("The prompt is empty.", param="prompt")
        max_tokens = self.check_context(len(prompt_ids), params.max_tokens)
        if params.logit_bias and max(params.logit_bias) >= self.runner.vocab_size:
            raise InvalidRequestError(f"Invalid value for 'logit_bias': token id {max(params.logit_bias)} is outside the "
                                      f"vocabulary (0..{self.runner.vocab_size - 1}).", param="logit_bias")
        handle = RequestHandle(request_id or "", on_cancel=self.executor.wake)
        req = Request(list(prompt_ids), params, max_tokens, handle, namespace, logits_processor)
        if request_id:
            req.id = request_id
        handle.request_id = req.id
        with self._lock:
            if self._closed:
                raise GenerationError("the engine is shut down")
            if len(self._incoming) + len(self._waiting) >= self.config.max_queue:
                self.stats.rejected += 1
                raise QueueFullError(f"The request queue is full ({self.config.max_queue} waiting).", retry_after=1.0)
            self._incoming.append(req)
        self.executor.wake()
        return handle

    def check_context(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """The effective max_tokens; raise if prompt + max_tokens exceeds the context."""
        room = self.context_length - prompt_tokens
        if max_tokens is None:
            if room < 1:
                raise ContextLengthExceededError(prompt_tokens, 1, self.context_length)
            return room
        if max_tokens > room:
            raise ContextLengthExceededError(prompt_tokens, max_tokens, self.context_length)
        return max_tokens

    def snapshot(self) -> dict[str, Any]:
        """Counters and gauges for metrics and tests."""
        with self._lock:
            queued = len(self._incoming) + len(self._waiting)
        pc = self.prefix_cache.stats
        return {
            "queue_depth": queued,
            "running": len(self._running),
            "kv_tokens": sum(r.kv_length for r in list(self._running)) + sum(r.prefilled for r in list(self._prefilling)),
            "max_tokens_in_flight": self.config.max_tokens_in_flight,
            "prefilling": len(self._prefilling),
            "slot_cache_bytes": self.slots.nbytes,
            "prefix_cache_bytes": pc.bytes,
            "prefix_cache_peak_bytes": pc.peak_bytes,
            "prefix_cache_budget_bytes": pc.budget_bytes,
            "prefix_cache_blocks": pc.blocks,
            "prefix_cache_hit_rate": pc.hit_rate,
            "prefix_cache_hit_tokens": pc.hit_tokens,
            "prefix_cache_lookup_tokens": pc.lookup_tokens,
            "prefix_cache_evictions": pc.evictions,
            **vars(self.stats),
        }

    @property
    def in_flight(self) -> int:
        """Requests queued, prefilling or decoding."""
        with self._lock:
            return len(self._incoming) + len(self._waiting) + len(self._prefilling) + len(self._running)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Refuse new requests, fail the ones still held, and leave the executor."""
        with self._lock:
            self._closed = True
        if self.executor.on_thread():
            self._close()
            return
        try:
            self.executor.call(self._close).result(timeout)
        except Exception:  # the executor is gone (interpreter exit): nothing is stepping any more
            self._close()

    def _close(self) -> None:
        self.executor.detach(self)
        with self._lock:
            pending, self._incoming = list(self._incoming), deque()
        for req in pending + list(self._waiting) + self._prefilling + self._running:
            self._fail(req, GenerationError("the engine shut down"))
        self._waiting, self._prefilling, self._running = deque(), [], []
        self.slots.reset()

    # -- executor worker (executor thread only) ---------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self._incoming or self._waiting or self._prefilling or self._running)

    def on_idle(self) -> None:
        if self.slots.nbytes > 64 * 1024 * 1024:
            self.slots.reset()

    def fail_all(self, exc: BaseException) -> None:
        """A step failed as a whole: fail the requests it was working on; the engine goes on."""
        for req in self._prefilling + self._running:
            self._fail(req, exc)
        self._prefilling, self._running = [], []

    def step(self) -> None:
        with self._lock:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        self.stats.steps += 1
        self._drop_cancelled()
        self._admit()
        self._prefill()
        self._decode()

    def _drop_cancelled(self) -> None:
        for pool in (self._waiting, self._prefilling):
            for req in [r for r in pool if r.handle.cancelled]:
                pool.remove(req)
                self._finish(req, "cancelled", emit="")
        if any(r.handle.cancelled for r in self._running):
            for req in self._running:
                if req.handle.cancelled:
                    self._finish(req, "cancelled", emit="")
            self._compact([r for r in self._running if not r.handle.cancelled])

    def _admit(self) -> None:
        cfg = self.config
        in_flight = sum(r.budget for r in self._prefilling + self._running)
        while self._waiting:
            req = self._waiting[0]
            active = len(self._prefilling) + len(self._running)
            if active >= cfg.max_batch_size:
                break
            if active and in_flight + req.budget > cfg.max_tokens_in_flight:
                break
            with self._lock:  # never in neither pool: ``in_flight`` (read by a draining host) counts both
                self._waiting.popleft()
                self._prefilling.append(req)
            req.handle.metrics["queue"] = time.perf_counter() - req.arrival
            in_flight += req.budget

    # -- prefill -----------------------------------------------------------------------------------
    def _prefill(self) -> None:
        """Spend up to ``prefill_chunk`` prompt tokens this step, in groups: each group is one
        forward (``_prefill_group``, ``_prefill_forward``), and a prompt finished by one group is in the prefix cache
        before the next group's requests look theirs up."""
        budget = self.config.prefill_chunk
        while budget > 0:
            group = self._prefill_group(budget)
            if not group:
                return
            budget -= sum(count for _, count in group)
            self.stats.prefill_forwards += 1
            self._prefill_forward(group)

    def _prefill_group(self, budget: int) -> list[tuple[Request, int]]:
        """The prefilling requests (in arrival order) whose next chunks make the next forward,
        with their token counts. A request not started yet waits while one ahead of it that is
        still prefilling shares a longer prompt prefix than the cache holds for it (it will find
        that prefix cached then, instead of computing it again); a request that wants prompt
        log-probabilities, or a runner with per-row adapters, gets a forward of its own."""
        group: list[tuple[Request, int]] = []
        alone = self.runner.row_hook is not None or not self.pack_prefill
        for req in list(self._prefilling):
            if budget <= 0 or (group and alone):
                break
            try:
                if req.kv is None:
                    if self._should_wait(req):
                        continue
                    self._start(req)
                own = req.prompt_logprobs is not None
                if group and own:
                    break
                count = min(len(req.prompt_ids) - req.prefilled, budget)
                group.append((req, count))
                budget -= count
                if own:
                    break
            except Exception as exc:
                if req in self._prefilling:
                    self._prefilling.remove(req)
                self._fail(req, exc)
        return group

    def _should_wait(self, req: Request) -> bool:
        """Whether ``req`` (not started) should wait for a request ahead of it that is still
        prefilling: their prompts share at least one block more than the prefix cache holds for
        ``req`` now, so that block would otherwise be computed twice."""
        if req.params.prompt_logprobs is not None:  # it does not read the prefix cache anyway
            return False
        block = self.prefix_cache.block_size
        first = req.prompt_ids[:block]
        ahead = []
        for other in self._prefilling:
            if other is req:
                break
            if other.kv is not None and other.namespace == req.namespace and other.prompt_ids[:block] == first:
                ahead.append(other)
        if not ahead:
            return False
        usable = len(req.prompt_ids) - 1  # the last prompt token is always prefilled
        need = self.prefix_cache.cached_tokens(req.prompt_ids, req.namespace, limit=usable) + block
        head = req.prompt_ids[:need]
        return need <= usable and any(other.prompt_ids[:need] == head for other in ahead)

    def _prefill_forward(self, group: list[tuple[Request, int]]) -> None:
        """One forward over the next chunks of ``group``'s requests. A lone chunk reads and writes
        its request's ``SequenceKV`` directly (with every position's logits when it asks prompt
        log-probabilities); several are packed: the projections and MLP run on their real tokens
        only, attention per request over its own KV (``PackWriter``). Logits only at the last
        token of each prompt the forward completes (none for a chunk that does not end its prompt)."""
        reqs = [r for r, _ in group]
        starts, counts = [r.prefilled for r in reqs], [c for _, c in group]
        ends = [a + c == len(r.prompt_ids) for r, a, c in zip(reqs, starts, counts)]  # prompts this forward completes
        B, T = len(group), max(counts)
        rows, positions, flat, last = [], [], [], []
        for i, (req, a, c) in enumerate(zip(reqs, starts, counts)):
            chunk = req.prompt_ids[a : a + c]
            rows.append(chunk + [chunk[-1]] * (T - c))  # padding: never projected, never attended to
            positions.append(list(range(a, a + c)) + [a + c - 1] * (T - c))
            flat.extend(range(i * T, i * T + c))
            if ends[i]:
                last.append(len(flat) - 1)
        tokens, pos = torch.tensor(rows), torch.tensor(positions)
        length = max(a + c for a, c in zip(starts, counts))
        # each query sees its own prompt up to itself; padding queries repeat their row's last one
        mask = (torch.arange(length).view(1, 1, -1) <= pos.unsqueeze(2)).view(B, 1, T, length)
        try:
            self.runner.bind_rows([r.namespace for r in reqs])
            if B > 1:  # logits only at the last token of each prompt it completes (none: no head at all)
                view = PackWriter([r.kv for r in reqs], starts, counts)
                logits = self.runner.forward(tokens, pos, view, mask, flat=torch.tensor(flat), pack=True,
                                             logits_at=torch.tensor(last), logits=bool(last))
            else:
                req, a, c = reqs[0], starts[0], counts[0]
                every = req.prompt_logprobs is not None
                logits = self.runner.forward(tokens, pos, req.kv.chunk(a, c), mask, every=every, logits=every or ends[0])
                if every:  # position p predicts prompt token p + 1
                    targets = req.prompt_ids[a + 1 : a + c + 1]
                    if targets:
                        req.prompt_logprobs += self.sampler.positions(logits[0, : len(targets)], targets, req.params.prompt_logprobs)
                    logits = logits[:, -1]
        except Exception as exc:
            for req in reqs:
                if req in self._prefilling:
                    self._prefilling.remove(req)
                self._fail(req, exc)
            return
        self._prefilled(group, logits)

    def _prefilled(self, group: list[tuple[Request, int]], logits: Optional[torch.Tensor]) -> None:
        """Count the chunks just prefilled (``logits``: one row per request whose prompt is now
        complete, in ``group``'s order; None if none is); those requests join the decode batch and
        get their first token, then store their prompt's blocks in the prefix cache and their KV in
        their slot (that copying is not in their time to first token)."""
        finishing = []
        for i, (req, count) in enumerate(group):
            req.prefilled += count
            req.kv.length = req.prefilled
            self.stats.prefill_tokens += count
            if req.prefilled == len(req.prompt_ids):
                req.handle.prompt_logprobs = req.prompt_logprobs  # before the first event, which may end it
                finishing.append(i)
        if not finishing:
            return
        reqs = [group[i][0] for i in finishing]
        # room for every request admitted so far at once, not one doubling after another
        want = min(self.config.max_batch_size, len(self._running) + len(self._prefilling))
        self.slots.ensure(want, max(len(r.prompt_ids) + r.max_tokens for r in reqs))
        first = len(self._running)
        with self._lock:  # from one pool to the other at once (``in_flight``; the batch's size in metrics)
            for req in reqs:
                self._prefilling.remove(req)
                self._running.append(req)
        self._select_and_accept(reqs, logits)
        for slot, req in enumerate(reqs, start=first):
            try:
                stored = self.prefix_cache.insert(req.prompt_ids, lambda a, b, kv=req.kv.data: kv[:, :, :, a:b], req.namespace)
                # the blocks it read from the cache, then those it computed and stored (its own values)
                own = stored[len(req.origin):]
                req.origin += tuple(itertools.takewhile(lambda serial: serial is not None, own))
                self.slots.put(slot, req.kv, req.origin)  # room made above (``_compact`` reads a finished one's)
                req.in_slot = True
            except Exception as exc:
                self._fail(req, exc)
            req.kv = None
        if any(req.handle.done for req in reqs):
            self._compact([r for r in self._running if not r.handle.done])

    def _start(self, req: Request) -> None:
        r = self.runner
        req.kv = SequenceKV(r.n_layers, r.n_kv_heads, r.head_dim, r.kv_dtype, capacity=len(req.prompt_ids))
        cached: list[torch.Tensor] = []
        if req.params.prompt_logprobs is None:  # else every prompt position is computed for its logits
            cached, req.origin = self.prefix_cache.lookup(req.prompt_ids, req.namespace, limit=len(req.prompt_ids) - 1)
        else:
            req.prompt_logprobs = [None]  # nothing predicts the first prompt token
        if cached:
            req.kv.load_prefix(cached)
            req.prefilled = req.cached_tokens = req.kv.length
        req.detok = StreamingDetokenizer(self.tokenizer)
        req.stopper = StopStringMatcher(req.params.stop)
        req.generator = None if req.params.greedy else make_generator(req.params.seed)

    # -- decode ------------------------------------------------------------------------------------
    def _decode(self) -> None:
        running = self._running
        if not running:
            return
        if self.speculate:
            drafts = self._drafts(running)
            if any(drafts):
                self._verify(running, drafts)
                return
        B = len(running)
        positions = torch.tensor([r.kv_length for r in running])
        length = int(positions.max()) + 1
        self.slots.ensure(B, length)
        tokens = torch.tensor([[r.output_ids[-1]] for r in running])
        mask = (torch.arange(length).unsqueeze(0) <= positions.unsqueeze(1)).view(B, 1, 1, length)
        self.runner.bind_rows([r.namespace for r in running])
        logits = self.runner.forward(tokens, positions.unsqueeze(1), self.slots.decode_view(B, positions, length, self.share_prefix), mask)
        self.stats.decode_steps += 1
        greedy = logits.argmax(dim=-1).tolist()
        self._select_and_accept(running, logits, greedy)
        self._compact([r for r in running if not r.handle.done])

    # -- prompt-lookup speculative decoding (speculative.py) --------------------------------------
    def _drafts(self, running: list[Request]) -> list[list[int]]:
        """Each row's draft: empty for requests that cannot be verified exactly, and never more
        tokens than ``max_tokens`` leaves room for after the verify step's own token."""
        k = self.config.prompt_lookup
        out = []
        for r in running:
            room = min(k, r.max_tokens - len(r.output_ids) - 1)
            out.append(lookup_of(r, self.lookup_min_ngram).draft(room) if room > 0 and speculable(r) else [])
        return out

    def _verify(self, running: list[Request], drafts: list[list[int]]) -> None:
        """One forward over every running row, fed ``[last token] + draft`` (drafts padded to
        the longest; a row without one is a plain decode row in position 0), logits only where
        they are read; then each row takes its tokens (``_accept_draft``) or, without a draft,
        is selected as in a plain step. Packed (``verify_packed``, unless per-row adapters need
        the batch layout), only the real positions go through the projections and the MLP; the
        padding exists only in attention."""
        B = len(running)
        T = 1 + max(len(d) for d in drafts)
        base = torch.tensor([r.kv_length for r in running])
        positions = base.unsqueeze(1) + torch.arange(T)  # [B, T]
        length = int(base.max()) + T
        self.slots.ensure(B, length)
        rows, flat, starts = [], [], []
        for i, (r, d) in enumerate(zip(running, drafts)):
            fed = [r.output_ids[-1]] + d
            rows.append(fed + [fed[-1]] * (T - len(fed)))  # padding: its logits are never computed
            starts.append(len(flat))
            flat.extend(range(i * T, i * T + len(fed)))
        mask = (torch.arange(length).view(1, 1, length) <= positions.unsqueeze(2)).view(B, 1, T, length)
        self.runner.bind_rows([r.namespace for r in running])
        logits = self.runner.forward(torch.tensor(rows), positions, self.slots.span_view(positions, length), mask,
                                     flat=torch.tensor(flat), pack=self.verify_packed and self.runner.row_hook is None)
        self.stats.decode_steps += 1
        self.stats.verify_steps += 1
        greedy = logits.argmax(dim=-1).tolist()
        plain = [i for i, d in enumerate(drafts) if not d]
        if plain:
            at = [starts[i] for i in plain]
            self._select_and_accept([running[i] for i in plain], logits[torch.tensor(at)], [greedy[j] for j in at])
        for i, d in enumerate(drafts):
            if d:
                self._accept_draft(running[i], d, greedy[starts[i] : starts[i] + len(d) + 1])
        self._compact([r for r in running if not r.handle.done])

    def _accept_draft(self, req: Request, draft: list[int], picks: list[int]) -> None:
        """Take the model's picks while they confirm the draft, then its first differing pick
        (so 1..len(draft)+1 tokens), each through ``_accept`` (stop rules, max_tokens, EOS)."""
        accepted = 0
        try:
            for j, token in enumerate(picks):
                self._accept(req, token)
                hit = j < len(draft) and token == draft[j]
                accepted += hit
                if req.handle.done or not hit:
                    break
        except Exception as exc:
            self._fail(req, exc)
        self.stats.draft_tokens += len(draft)
        self.stats.accepted_draft_tokens += accepted

    def _select_and_accept(self, reqs: list[Request], logits: torch.Tensor, greedy: Optional[list[int]] = None) -> None:
        """Select every row's next token in one batched pass (``sampling.Sampler``), then
        accept each; a row whose processing fails fails its request alone."""
        tokens = self.sampler.select(logits, reqs, greedy, on_error=self._fail)
        entries = self.sampler.logprobs(logits, reqs, tokens)
        for req, token, entry in zip(reqs, tokens, entries):
            if token is None:
                continue
            try:
                self._accept(req, token, entry)
            except Exception as exc:
                self._fail(req, exc)

    def _accept(self, req: Request, token: int, logprob: Optional[TokenLogprob] = None) -> None:
        """Emit the text of the request's next token, finish it if a stop rule fires."""
        lps = [logprob] if logprob is not None else None
        now = time.perf_counter()
        if req.first_token_at is None:
            req.first_token_at = now
            req.handle.metrics["ttft"] = now - req.arrival
        req.output_ids.append(token)
        self.stats.generated_tokens += 1
        if token in self.eos_token_ids and not req.params.ignore_eos:
            self._finish_text(req, "stop", "", req.detok.flush(), token, [] if lps else None)  # EOS has no text
            return
        text, stopped = req.stopper.feed(req.detok.add(token))
        if stopped:
            self._finish(req, "stop", emit=text, token_ids=[token], logprobs=lps)
        elif len(req.output_ids) >= req.max_tokens:
            self._finish_text(req, "length", text, req.detok.flush(), token, lps)
        else:
            req.handle._push(StreamEvent(text, [token], logprobs=lps))

    def _finish_text(self, req: Request, reason: str, text: str, tail: str, token: int,
                     logprobs: Optional[list[TokenLogprob]] = None) -> None:
        """Finish with ``text`` (already through the stop matcher), then the detokenizer's
        held-back ``tail`` and the matcher's held-back text, in stream order; a stop string
        completed by the tail still ends the answer before it."""
        more, stopped = req.stopper.feed(tail)
        text += more
        if stopped:
            reason = "stop"
        else:
            text += req.stopper.flush()
        self._finish(req, reason, emit=text, token_ids=[token], logprobs=logprobs)

    # -- endings -------------------------------------------------------------------------------------
    def _usage(self, req: Request) -> Usage:
        return Usage(len(req.prompt_ids), len(req.output_ids), req.cached_tokens)

    def _finish(self, req: Request, reason: str, emit: str, token_ids: list[int] | None = None,
                logprobs: Optional[list[TokenLogprob]] = None) -> None:
        req.handle.done = True
        req.handle.metrics["latency"] = time.perf_counter() - req.arrival
        if reason == "cancelled":
            self.stats.cancelled += 1
        else:
            self.stats.finished += 1
        if logprobs is None and req.params.logprobs:
            logprobs = []
        req.handle._push(StreamEvent(emit, token_ids or [], reason, self._usage(req), logprobs=logprobs))

    def _fail(self, req: Request, exc: BaseException) -> None:
        if req.handle.done:
            return
        req.handle.done = True
        self.stats.failed += 1
        if not isinstance(exc, LlamaWrapperError):
            log.warning("request %s failed: %r", req.id, exc)
            exc = GenerationError(f"generation failed: {exc}")
        req.handle._push(exc)

    def _compact(self, keep: list[Request]) -> None:
        """Keep ``keep`` (in order) in slots 0..n-1; cache the finished ones' KV as prefixes."""
        old = {id(r): i for i, r in enumerate(self._running)}
        for req in self._running:  # (one whose KV never reached its slot, failed on the way, has nothing to give)
            if req.handle.done and req.output_ids and not req.handle.cancelled and req.in_slot:
                slot = old[id(req)]
                seq = req.prompt_ids + req.output_ids[:-1]
                self.prefix_cache.insert(seq, lambda a, b, s=slot: self.slots.export(s, a, b), req.namespace)
        for j, req in enumerate(keep):
            i = old[id(req)]
            if i != j:
                self.slots.move(i, j, req.kv_length)
        self._running = keep
