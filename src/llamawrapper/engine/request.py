"""One request's life inside the engine, and the handle its caller holds.

The handle is the only thing shared between the engine's worker thread and the caller: the
engine pushes ``StreamEvent``s (or an exception) into it; the caller iterates it from a plain
thread (``for event in handle``) or from asyncio (``async for event in handle``) and may
``cancel()`` it at any time.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Optional

from ..errors import RequestCancelledError
from ..types import LogitsProcessor, Result, SamplingParams, StreamEvent, Usage, join_logprobs

_ids = itertools.count(1)


class RequestHandle:
    """A running request: iterate for events, ``result()`` to wait for the whole answer."""

    def __init__(self, request_id: str, on_cancel: Any = None) -> None:
        self.request_id = request_id
        self._lock = threading.Lock()
        self._sync: queue.SimpleQueue = queue.SimpleQueue()
        self._aq: Optional[asyncio.Queue] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._on_cancel = on_cancel
        self.cancelled = False
        self.done = False
        # "start_unix": wall-clock arrival (places trace spans); seconds from arrival: "queue"
        # (until admitted), "ttft", "latency" (until finished); "itl": the gaps between successive
        # tokens (a list). Read by the server's latency histograms and traces.
        self.metrics: dict[str, Any] = {"start_unix": time.time()}
        self._last_token_at: Optional[float] = None
        self.prompt_logprobs: Optional[list[Any]] = None  # set before the first event when asked for

    # -- engine side -------------------------------------------------------------------------
    def _push(self, item: StreamEvent | BaseException) -> None:
        if isinstance(item, StreamEvent) and item.token_ids:
            now = time.perf_counter()
            if self._last_token_at is not None:
                self.metrics.setdefault("itl", []).append(now - self._last_token_at)
            self._last_token_at = now
        with self._lock:
            if self._aq is None:
                self._sync.put(item)
                return
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass

    # -- caller side -------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop generating; the engine frees the request's slot within one step."""
        if not self.cancelled and not self.done:
            self.cancelled = True
            if self._on_cancel is not None:
                self._on_cancel()

    def __iter__(self) -> Iterator[StreamEvent]:
        if self._aq is not None:
            raise RuntimeError("this handle is already consumed from asyncio")
        while True:
            item = self._sync.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._aq is None:
                self._aq, self._loop = asyncio.Queue(), loop
                while not self._sync.empty():
                    self._aq.put_nowait(self._sync.get_nowait())
        while True:
            item = await self._aq.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def result(self) -> Result:
        """Block until the request finishes; return the whole answer."""
        result = collect(iter(self), self.metrics)
        result.prompt_logprobs = self.prompt_logprobs
        return result

    async def aresult(self) -> Result:
        parts, last = [], None
        async for event in self:
            parts.append(event)
            last = event
        result = _assemble(parts, last, self.metrics)
        result.prompt_logprobs = self.prompt_logprobs
        return result


def collect(events: Iterator[StreamEvent], metrics: dict[str, float] | None = None) -> Result:
    parts, last = [], None
    for event in events:
        parts.append(event)
        last = event
    return _assemble(parts, last, metrics or {})


def _assemble(parts: list[StreamEvent], last: Optional[StreamEvent], metrics: dict[str, float]) -> Result:
    if last is None or last.finish_reason is None:
        raise RequestCancelledError("the request ended without a final event")
    return Result(
        text="".join(e.text for e in parts),
        finish_reason=last.finish_reason,
        usage=last.usage or Usage(0, 0),
        token_ids=[t for e in parts for t in e.token_ids],
        metrics=dict(metrics),
        logprobs=join_logprobs(parts),
    )



@dataclass
class Request:
    """Engine-side state of one request."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    handle: RequestHandle
    namespace: str = ""
    logits_processor: Optional[LogitsProcessor] = None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = field(default_factory=time.perf_counter)
    # filled in by the engine
    kv: Any = None  # SequenceKV while prefilling
    prefilled: int = 0
    cached_tokens: int = 0
    origin: tuple[int, ...] = ()  # serials of the prefix-cache blocks its KV's first positions hold (kv_cache.py)
    in_slot: bool = False  # its KV is in its decode slot (which ``Engine._compact`` may cache from)
    output_ids: list[int] = field(default_factory=list)
    detok: Any = None
    stopper: Any = None
    generator: Any = None
    first_token_at: Optional[float] = None
    prompt_logprobs: Optional[list[Any]] = None  # filled while prefilling when the params ask for them
    lookup: Any = None  # speculative.PromptLookup, once the request drafts

    @property
    def kv_length(self) -> int:
        """Positions whose KV is stored once prefill is done (the newest token has none yet)."""
        return len(self.prompt_ids) + max(len(self.output_ids) - 1, 0)

    @property
    def budget(self) -> int:
        return len(self.prompt_ids) + self.max_tokens
