"""The executor: one thread per process that runs the torch work of every loaded model.

Every engine (and every task model's batcher) is a *worker* attached to the process's one
``Executor``. Its thread steps each worker that has work, in turn, one step at a time, and
sleeps when none has. Why one thread: every thread that runs torch owns an OpenMP team for
life, and libgomp throttles its workers once the process has more OpenMP threads than cores;
measured on this code, an idle second engine with its own thread halved the first one's speed
(docs/HOST.md). With one executor thread there is one team, whatever the number of models.

Work that must run on that thread but is not a step (release memory, change the thread count,
a one-off forward pass) goes through ``call(fn)``, which runs ``fn`` between two steps.

A worker implements::

    has_work() -> bool      # cheap, called under the executor's lock
    step() -> None          # one bounded unit of torch work (a prefill chunk + a decode step)
    on_idle() -> None       # the process has nothing to do: give memory back
    fail_all(exc) -> None   # the worker's step raised: fail what it holds, the others go on
"""

from __future__ import annotations

import atexit
import functools
import logging
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Optional, Protocol

log = logging.getLogger("llamawrapper.engine")


class Worker(Protocol):
    def has_work(self) -> bool: ...
    def step(self) -> None: ...
    def on_idle(self) -> None: ...
    def fail_all(self, exc: BaseException) -> None: ...


class Executor:
    """One thread that steps every attached worker round-robin."""

    def __init__(self, name: str = "llamawrapper-executor") -> None:
        self.name = name
        self._cv = threading.Condition()
        self._workers: list[Worker] = []
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.steps = 0

    # -- any thread --------------------------------------------------------------------------------
    def attach(self, worker: Worker) -> None:
        with self._cv:
            if worker not in self._workers:
                self._workers.append(worker)
            self._ensure_thread()
            self._cv.notify()

    def detach(self, worker: Worker) -> None:
        with self._cv:
            if worker in self._workers:
                self._workers.remove(worker)

    @property
    def workers(self) -> int:
        with self._cv:
            return len(self._workers)

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def busy(self) -> bool:
        """Whether any worker has work right now (loads use it to stay out of the way)."""
        with self._cv:
            return any(w.has_work() for w in self._workers)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the executor thread between two steps; the future holds its result."""
        future: Future = Future()
        if self.on_thread():
            _run_into(fn, future)
            return future
        with self._cv:
            if self._closed:
                future.set_exception(RuntimeError("the executor is shut down"))
                return future
            self._jobs.append((fn, future))
            self._ensure_thread()
            self._cv.notify()
        return future

    def on_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
            thread = self._thread
        if thread is not None and not self.on_thread():
            thread.join(timeout)

    # -- the executor thread -------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        idle_done = False
        while True:
            with self._cv:
                while not self._closed and not self._jobs and not any(w.has_work() for w in self._workers):
                    if not idle_done:
                        break  # give memory back once, outside the lock, then sleep
                    self._cv.wait()
                if self._closed:
                    jobs, self._jobs = list(self._jobs), deque()
                    break
                jobs, self._jobs = list(self._jobs), deque()
                workers = [w for w in self._workers if w.has_work()]
            for fn, future in jobs:
                _run_into(fn, future)
            if not jobs and not workers and not idle_done:
                for w in self._snapshot():
                    _quietly(w.on_idle)
                jobs = workers = w = None
                idle_done = True
                continue
            idle_done = False
            for w in workers:
                self.steps += 1
                try:
                    w.step()
                except Exception as exc:  # one worker's failure fails its requests, not the others'
                    log.exception("a step failed")
                    _quietly(functools.partial(w.fail_all, exc))
            # this loop's locals would hold the last job and worker while it waits: an engine that
            # left (a model closed or unloaded) must not stay alive, with its weights, until the next step
            jobs = workers = fn = future = w = None
        for fn, future in jobs:
            future.set_exception(RuntimeError("the executor is shut down"))

    def _snapshot(self) -> list[Worker]:
        with self._cv:
            return list(self._workers)


def _run_into(fn: Callable[[], Any], future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as exc:  # handed to whoever waits on the future
        future.set_exception(exc)


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        log.exception("executor housekeeping failed")


_executor: Optional[Executor] = None
_lock = threading.Lock()


def get_executor() -> Executor:
    """The process's executor (created on first use)."""
    global _executor
    with _lock:
        if _executor is None or _executor._closed:
            _executor = Executor()
        return _executor


@atexit.register
def _shutdown_at_exit() -> None:
    # Stop stepping before the interpreter tears torch down under the thread.
    if _executor is not None:
        _executor.shutdown(timeout=2.0)
