"""Micro-batching: the worker that runs a task model's forward passes on the process's executor.

Callers (Python calls, HTTP handlers on the event loop, CLI) ``submit`` a list of inputs and
get a ``Future`` of one output row per input. The batcher is an executor worker
(``engine/executor.py``): it reports work once a waiting request's batching window has passed or a
full batch is waiting, and each ``step()`` runs one batched forward over up to ``max_batch``
inputs taken in arrival order, so concurrent requests share forwards. A big request is cut into
several steps, with chat engines' steps in between.

The window is only waited when it can pay: a request that arrives within ``window`` seconds of
the previous one (concurrent callers: the 32 HTTP clients of the benchmark, threads) waits for
company; a lone request (a Python call, one client in turn) and a request that fills a batch on
its own go at once. A fixed 4 ms window cost a lone one-text call ~4 ms of its ~15 ms here.

``observe`` (set by the server) gets every forward's batch size, for the ``/metrics`` histogram.

A forward that raises is retried request by request, so a request that fails alone fails alone
and the others in its batch get their answers."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ..engine.executor import get_executor

log = logging.getLogger("llamawrapper.tasks")

Forward = Callable[[list[Any]], Sequence[Any]]  # inputs -> one output row per input


@dataclass(eq=False)  # identity: a request is itself, whatever its rows
class _Request:
    items: list[Any]
    future: Future
    order: list[int]  # positions of ``items`` in the order they are fed (longest first)
    rows: list[Any] = field(default_factory=list)
    next: int = 0  # how many of ``order`` have been taken into a batch
    done: int = 0
    arrived: float = field(default_factory=time.monotonic)
    ready: float = 0.0  # when it may go without a full batch (arrival, or arrival + window)

    def __post_init__(self) -> None:
        self.rows = [None] * len(self.items)


class MicroBatcher:
    """Batches ``forward`` calls of one task model across concurrent requests."""

    def __init__(self, forward: Forward, *, max_batch: int = 32, window: float = 0.004, name: str = "task",
                 size: Optional[Callable[[Any], int]] = None) -> None:
        self.forward, self.max_batch, self.window, self.name = forward, max(1, int(max_batch)), float(window), name
        self._size = size or (lambda item: len(item) if isinstance(item, str) else sum(len(x) for x in item))
        self._lock = threading.Lock()
        self._queue: deque[_Request] = deque()
        self._closed = False
        self._attached = False
        self._last_arrival = float("-inf")
        self.batches = 0  # forwards run (the tests read it)
        self.batched_inputs = 0
        self.observe: Optional[Callable[[int], None]] = None  # gets each forward's batch size (server metrics)

    # -- any thread --------------------------------------------------------------------------------
    def submit(self, items: Sequence[Any]) -> Future:
        """A future of ``forward``'s rows for ``items``, in their order."""
        future: Future = Future()
        items = list(items)
        if not items:
            future.set_result([])
            return future
        executor = get_executor()
        if executor.on_thread():  # called from torch work on the executor itself: no queue to wait on
            try:
                future.set_result(list(self.forward(items)))
            except BaseException as exc:
                future.set_exception(exc)
            return future
        order = sorted(range(len(items)), key=lambda i: -self._size(items[i]))  # less padding per batch
        with self._lock:
            if self._closed:
                future.set_exception(RuntimeError(f"the {self.name} model is closed"))
                return future
            request = _Request(items, future, order)
            company = request.arrived - self._last_arrival < self.window  # concurrent callers: worth waiting
            self._last_arrival = request.arrived
            wait = company and self.window > 0 and len(items) < self.max_batch
            request.ready = request.arrived + (self.window if wait else 0.0)
            self._queue.append(request)
            if not self._attached:
                executor.attach(self)
                self._attached = True
        if wait:
            timer = threading.Timer(self.window, executor.wake)  # the executor sleeps until someone has work
            timer.daemon = True
            timer.start()
        else:
            executor.wake()
        return future

    def run(self, items: Sequence[Any]) -> list[Any]:
        """``submit`` and wait (plain Python use)."""
        return self.submit(items).result()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending, self._queue = list(self._queue), deque()
        for req in pending:
            if not req.future.done():
                req.future.set_exception(RuntimeError(f"the {self.name} model was unloaded"))
        get_executor().detach(self)

    # -- the executor thread (Worker protocol) --------------------------------------------------------
    def has_work(self) -> bool:
        with self._lock:
            if not self._queue:
                return False
            waiting = sum(len(r.items) - r.next for r in self._queue if r.next < len(r.items))
            if waiting == 0:
                return False  # everything queued is taken (a request stays queued until delivered)
            now = time.monotonic()
            return waiting >= self.max_batch or any(now >= r.ready for r in self._queue if r.next < len(r.items))

    def step(self) -> None:
        batch = self._take()
        if not batch:
            return
        items = [req.items[i] for req, i in batch]
        try:
            rows = list(self.forward(items))
            if len(rows) != len(items):
                raise RuntimeError(f"{self.name} forward returned {len(rows)} rows for {len(items)} inputs")
        except Exception as exc:
            if len({id(req) for req, _ in batch}) == 1:
                self._fail(batch[0][0], exc)
                return
            log.warning("a batched %s forward failed (%s); retrying request by request", self.name, exc)
            for req, group in itertools.groupby(batch, key=lambda pair: pair[0]):
                positions = [i for _, i in group]
                try:
                    self._deliver(req, positions, list(self.forward([req.items[i] for i in positions])))
                except Exception as one_exc:
                    self._fail(req, one_exc)
            return
        self.batches += 1
        self.batched_inputs += len(items)
        if self.observe is not None:
            try:
                self.observe(len(items))
            except Exception:  # metrics never fail a request
                log.exception("recording a batch size failed")
        start = 0
        for req, group in itertools.groupby(batch, key=lambda pair: pair[0]):
            positions = [i for _, i in group]
            self._deliver(req, positions, rows[start:start + len(positions)])
            start += len(positions)

    def on_idle(self) -> None:
        pass

    def fail_all(self, exc: BaseException) -> None:
        with self._lock:
            pending, self._queue = list(self._queue), deque()
        for req in pending:
            if not req.future.done():
                req.future.set_exception(exc)

    # -- helpers ---------------------------------------------------------------------------------------
    def _take(self) -> list[tuple[_Request, int]]:
        batch: list[tuple[_Request, int]] = []
        with self._lock:
            for req in self._queue:
                while req.next < len(req.order) and len(batch) < self.max_batch:
                    batch.append((req, req.order[req.next]))
                    req.next += 1
                if len(batch) >= self.max_batch:
                    break
        return batch

    def _deliver(self, req: _Request, positions: list[int], rows: Sequence[Any]) -> None:
        for i, row in zip(positions, rows):
            req.rows[i] = row
        req.done += len(positions)
        if req.done == len(req.items):
            with self._lock:
                if req in self._queue:
                    self._queue.remove(req)
            if not req.future.done():
                req.future.set_result(req.rows)

    def _fail(self, req: _Request, exc: BaseException) -> None:
        with self._lock:
            if req in self._queue:
                self._queue.remove(req)
        if not req.future.done():
            req.future.set_exception(exc)
