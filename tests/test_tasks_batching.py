"""The micro-batcher on the executor: concurrent requests share forwards, a big request is cut
into batches, results come back in each request's order, a failing request fails alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from llamawrapper.engine.executor import get_executor
from llamawrapper.tasks.batching import MicroBatcher


class Recorder:
    def __init__(self, poison: str = "") -> None:
        self.calls: list[list[str]] = []
        self.threads: set[str] = set()
        self.poison = poison

    def __call__(self, items: list[str]) -> list[str]:
        self.calls.append(list(items))
        self.threads.add(threading.current_thread().name)
        if self.poison and self.poison in items:
            raise ValueError("poisoned input")
        return [s.upper() for s in items]


def test_concurrent_requests_share_forwards_on_the_executor_thread():
    forward = Recorder()
    batcher = MicroBatcher(forward, max_batch=64, window=0.05, name="test")
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: batcher.run([f"a{i}", f"b{i}"]), range(16)))
    finally:
        batcher.close()
    assert results == [[f"A{i}", f"B{i}"] for i in range(16)]
    assert sum(len(c) for c in forward.calls) == 32
    assert len(forward.calls) < 16  # requests met in shared forwards
    assert forward.threads == {get_executor().name}


def test_big_request_is_cut_into_batches_and_keeps_its_order():
    forward = Recorder()
    batcher = MicroBatcher(forward, max_batch=4, window=0.0, name="test")
    try:
        items = ["x" * (i % 7) + str(i) for i in range(10)]
        assert batcher.run(items) == [s.upper() for s in items]
    finally:
        batcher.close()
    assert [len(c) for c in forward.calls] == [4, 4, 2]
    assert all(len(c[0]) >= len(c[-1]) for c in forward.calls)  # longest first: less padding


def test_a_failing_request_leaves_its_batch_mates_unharmed():
    forward = Recorder(poison="bad")
    batcher = MicroBatcher(forward, max_batch=64, window=0.1, name="test")
    gate = threading.Event()
    busy = get_executor().call(gate.wait)  # the executor is busy: the three requests queue together
    try:
        good1 = batcher.submit(["one", "two"])
        bad = batcher.submit(["three", "bad"])
        good2 = batcher.submit(["four"])
        gate.set()
        busy.result(timeout=10)
        assert good1.result(timeout=10) == ["ONE", "TWO"]
        assert good2.result(timeout=10) == ["FOUR"]
        with pytest.raises(ValueError, match="poisoned"):
            bad.result(timeout=10)
    finally:
        batcher.close()
    assert len(forward.calls[0]) == 5  # all three were in one batch before the retry


def test_closed_batcher_fails_new_requests():
    batcher = MicroBatcher(Recorder(), name="test")
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.run(["x"])
    assert batcher.run([]) == []


def test_a_lone_request_goes_at_once_and_a_close_follower_waits_for_company():
    """The window is waited only by a request that arrives within it of the previous one."""
    forward = Recorder()
    batcher = MicroBatcher(forward, max_batch=64, window=3600.0, name="test")  # a window nobody would sit out
    try:
        assert batcher.run(["alone"]) == ["ALONE"]  # would hang for an hour if a lone request waited
        first = batcher.submit(["a"])  # arrives within the window of "alone": waits for company...
        second = batcher.submit(["b", "c"])
        assert not batcher.has_work()  # ...as does the second: neither is due, no full batch yet
        assert batcher.run([f"x{i}" for i in range(61)]) == [f"X{i}" for i in range(61)]  # fills the batch of 64
        assert first.result(timeout=10) == ["A"] and second.result(timeout=10) == ["B", "C"]
    finally:
        batcher.close()
    assert forward.calls[0] == ["alone"]
    assert len(forward.calls) == 2 and sorted(forward.calls[1][:3]) == ["a", "b", "c"]
