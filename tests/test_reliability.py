"""The reliability suite on the single server (docs/RELIABILITY.md; the Ray app's half is in
tests/test_ray_serve.py): one ``llamawrapper serve smollm2`` process for the module (a batch of
20, a queue of 16, keys and limits in a real Redis, the response cache in a SQLite file),
restarted once by the kill -9 test on the same cache file, stopped by the SIGTERM test. The
tests run in this order and share the process: its start is a good part of the cost.

- a soak of 64 clients for 60 s (the first wave, 4x the queue, released together);
- 20 streaming clients that vanish mid-answer: the engine's slots are free within a second;
- Redis stopped and started again while clients ask: limited keys fail closed, then recover;
- kill -9 while answers are being written to the response cache: the restarted server reads
  the cache and serves no wrong entry;
- SIGTERM with 16 streams in flight: all of them end, exit status 0.

Statuses, headers and stream contents are what the tests look at, through httpx and the
official ``openai`` client."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from server_helpers import ServerProcess, describe_soak, redis_outage, soak, vanishing_streams

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
ADMIN = "admin-secret-for-the-reliability-tests"
BATCH, QUEUE = 20, 16
PREFIX_CACHE_MB = 16


class Served:
    """The module's server, restartable on the same settings (and cache file)."""

    def __init__(self, folder, redis) -> None:
        self.folder, self.redis, self.starts = folder, redis, 0
        self.cache_file = folder / "cache" / "responses.sqlite"
        self.server = self._start()

    def _start(self) -> ServerProcess:
        self.starts += 1
        server = ServerProcess(["smollm2"], "--max-batch-size", str(BATCH), "--max-queue", str(QUEUE),
                               "--drain-timeout", "120", "--admin-key", ADMIN, "--state-url", self.redis.url,
                               "--audit-file", str(self.folder / "audit.jsonl"),
                               log_path=self.folder / f"server-{self.starts}.log",
                               env={"LLAMAWRAPPER_CACHE_ENABLED": "true",
                                    "LLAMAWRAPPER_CACHE_URL": f"sqlite:///{self.cache_file}",
                                    # a prefix cache that is full by the end of the soak's warm-up (the
                                    # default 256 MiB fills for the first hundred-odd answers): its
                                    # growth to the budget is not what the soak looks for
                                    "LLAMAWRAPPER_PREFIX_CACHE_MB": str(PREFIX_CACHE_MB)})
        server.api_key = ADMIN
        return server.wait_ready(timeout=300)

    def restart(self) -> ServerProcess:
        self.server = self._start()
        return self.server

    def admin(self) -> httpx.Client:
        return self.server.client(timeout=60)

    def key(self, **limits) -> str:
        r = self.admin().post("/admin/keys", json={"name": f"reliability-{time.time()}", **limits})
        assert r.status_code == 201, r.text
        return r.json()["key"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_folder, restartable_redis):
    served = Served(tmp_path_factory.mktemp("reliability"), restartable_redis)
    try:
        yield served
    finally:
        served.server.terminate()


def _engine(server: ServerProcess) -> tuple[float, float]:
    """(requests in the decode batch, requests waiting) for smollm2, from /metrics."""
    samples = server.metrics()
    value = lambda name: sum(v for (n, ls), v in samples.items() if n == name and dict(ls).get("model") == "smollm2")  # noqa: E731
    return value("llamawrapper_running_batch_size"), value("llamawrapper_queue_depth")


def test_redis_response_cache_is_skipped_while_redis_is_down(restartable_redis):
    """The response cache in Redis (the Ray app's shared cache) with Redis stopped: lookups and
    stores are skipped (a miss, no error), and the cache is used again once Redis is back."""
    from llamawrapper.requests.response_cache import RedisCache, ResponseCache, encode_events
    from llamawrapper.types import StreamEvent, Usage

    events = [StreamEvent("Hi", [1]), StreamEvent("!", [2], "stop", Usage(3, 2, 0))]
    cache = ResponseCache(RedisCache(restartable_redis.url.replace("/0", "/2")))
    cache.store("k1", events)
    restartable_redis.stop()
    try:
        assert cache.lookup("k1") is None  # skipped: the request runs on the engine
        cache.store("k2", events)  # skipped too
        assert cache.stats() == {"hits": 0, "misses": 0, "stores": 1, "skipped": 2}
    finally:
        restartable_redis.start()
    assert encode_events(cache.lookup("k1")) == encode_events(events) and cache.lookup("k2") is None
    assert cache.stats() == {"hits": 1, "misses": 1, "stores": 1, "skipped": 2}


def _step_seconds(server: ServerProcess, window: float = 2.0) -> float:
    """Mean time of the engine's decode steps over ``window`` seconds (at least one step)."""
    name = "llamawrapper_engine_decode_steps_total"
    t0, before = time.monotonic(), server.metric(name, model="smollm2")
    time.sleep(window)
    while (after := server.metric(name, model="smollm2")) == before:
        time.sleep(0.05)
    return (time.monotonic() - t0) / (after - before)


def _caches(server: ServerProcess) -> dict:
    """MiB held by the engine's KV slots and prefix cache, and answers given so far."""
    m = server.metrics()
    value = lambda name: sum(v for (n, ls), v in m.items() if n == name)  # noqa: E731
    return {"kv_mib": round(value("llamawrapper_kv_cache_bytes") / 2**20, 1),
            "prefix_mib": round(value("llamawrapper_prefix_cache_bytes") / 2**20, 1),
            "finished": value("llamawrapper_engine_requests_finished_total")}


def test_soak_64_clients_for_60_s(served):
    """64 clients ask for 60 s, every other answer streamed, a 429 honoured by waiting its
    Retry-After; their first requests go out together (64 = 4x the queue). Only 200 and 429
    (with Retry-After and ``queue_full``), every request answered, and the server's resident
    memory at the end within 5 % of its size after the warm-up (the first 30 s: on a busy
    machine the first full batches of answers take that long, and the engine's KV slots reach
    their size in it; the prefix cache is held to 16 MiB, about 1 % of the process, so that
    its filling does not count as growth)."""
    server = served.server
    key = served.key()
    result = soak(server.url, {"Authorization": f"Bearer {key}"}, lambda: [server.proc.pid], clients=64, seconds=60,
                  warmup=30, probe=lambda: _caches(server))
    print("\nsoak, single server:", describe_soak(result))
    assert not result["unexpected"] and not result["hung"], result["unexpected"][:10]
    # the first wave, 64 requests released together against a batch of 20 and a queue of 16
    wave = result["first_wave"]
    assert len(wave) == 64 and set(wave) == {200, 429} and wave.count(429) >= 64 - BATCH - QUEUE - 8, wave
    assert set(result["statuses"]) <= {200, 429} and result["statuses"][200] > wave.count(200), result["statuses"]
    assert result["rss_end"] <= 1.05 * result["rss_warm"], describe_soak(result)
    assert _engine(server) == (0, 0)  # every slot given back


def test_vanishing_streams_free_their_slots_within_a_second(served):
    """20 streams being answered together; once each has its first words the clients close
    their connections: the engine reports no request running or waiting within a second, all
    20 counted as cancelled, and the next request is answered."""
    server = served.server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=served.key(), max_retries=0, timeout=120)
    cancelled_before = server.metric("llamawrapper_engine_requests_cancelled_total", model="smollm2")
    # in waves of 8: the queue (16) takes requests faster than the engine moves them into its batch
    streams, (busy, step), gone = vanishing_streams(client, 20, 8, lambda: (_engine(server), _step_seconds(server)))
    while _engine(server) != (0, 0):
        assert time.monotonic() - gone < 5, f"slots still held 5 s after the clients left: {_engine(server)}"
        time.sleep(0.02)
    freed = time.monotonic() - gone
    print(f"\n20 vanished streams: slots free {freed:.2f} s after the last client closed "
          f"(a decode step of the 20 took {step:.2f} s)")
    assert busy == (20, 0)  # all twenty were being answered
    # within a second; a step is not interrupted, so on a machine so busy that one step of the
    # batch takes longer, within the step in progress (twice the measured mean, for its spread)
    assert freed <= max(1.0, 2 * step), f"slots freed only after {freed:.2f} s (steps of {step:.2f} s)"
    assert len(streams) == 20
    assert server.metric("llamawrapper_engine_requests_cancelled_total", model="smollm2") - cancelled_before == 20
    answer = client.chat.completions.create(model="smollm2", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_redis_stopped_mid_load_fails_closed_then_recovers(served):
    """Clients with a limited key and with the bootstrap admin key keep asking while Redis is
    stopped for 5 s and started again: the limited key gets 503 ``state_unavailable`` with
    Retry-After while Redis is away (its limits cannot be checked), never a 500; the admin key
    (no shared state) is answered throughout; the limited key is answered again once Redis is back."""
    server, redis = served.server, served.redis
    limited = served.key(rpm=100000, tpm=10000000)

    def asker(key: str):
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

        def ask() -> tuple[int, str]:
            r = http.post("/v1/chat/completions", json={"model": "smollm2", "max_tokens": 4, "temperature": 0.8,
                                                        "messages": [{"role": "user", "content": "Say hello."}]})
            return r.status_code, "" if r.status_code == 200 else \
                f"{r.json()['error']['code']} retry-after={r.headers.get('retry-after')}"
        return ask

    outage = redis_outage(redis, [("limited", asker(limited))] * 3 + [("admin", asker(ADMIN))] * 3,
                          recovered_by="limited")
    log, down, up = outage["log"], outage["down"], outage["up"]
    unexpected = [e for e in log if (e[1], e[2], e[3]) not in {("limited", 200, ""), ("admin", 200, ""),
                                                               ("limited", 503, "state_unavailable retry-after=1")}]
    assert not unexpected, unexpected[:10]
    while_down = [status for t, who, status, _ in log if who == "limited" and down + 1.0 < t < up - 1.0]
    before = [status for t, who, status, _ in log if who == "limited" and t < down]
    print(f"\nRedis down 5 s: {len(log)} requests; limited key {before.count(200)}x200 before, "
          f"{while_down.count(503)}x503 of {len(while_down)} while down, answered again {outage['recovered']:.2f} s "
          f"after restart; admin key {sum(who == 'admin' for _, who, _, _ in log)}x200")
    assert before and set(before) == {200}
    assert while_down and set(while_down) == {503}  # fails closed while Redis is away
    assert any(who == "admin" and down + 1.0 < t < up - 1.0 for t, who, _, _ in log)  # the rest is still served


def test_kill_9_during_cache_writes_then_restart_serves_no_corrupt_entry(served):
    """24 greedy questions (the cache keeps each answer as it finishes), 12 at a time; once 6
    are answered the server gets SIGKILL in the middle of the others. The restarted server on
    the same cache file answers every question sent before the kill again: each answer given
    before the kill comes from the cache (``x-cache: hit``), and every entry it serves from the
    cache is the answer it computes afresh (``Cache-Control: no-cache``) and the one the first
    server gave."""
    server = served.server
    key = served.key()
    questions = [(f"Name a word that rhymes with '{w}'.", 4 + i % 9) for i, w in enumerate(
        "cat dog sun moon tree star blue red fish bird cake lake hat mat pen ten fox box car bar rain train "
        "snow glow".split())]
    assert len(questions) == 24
    before: dict[int, str] = {}
    sent: set[int] = set()
    answered_6 = threading.Event()
    children = __import__("psutil").Process(server.proc.pid).children(recursive=True)

    def ask(http: httpx.Client, i: int, **headers):
        text, tokens = questions[i]
        return http.post("/v1/chat/completions", headers=headers, json={
            "model": "smollm2", "max_tokens": tokens, "temperature": 0, "messages": [{"role": "user", "content": text}]})

    def first(i: int) -> None:
        if answered_6.is_set():
            return
        sent.add(i)
        try:
            with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
                r = ask(http, i)
        except httpx.TransportError:
            return  # in flight when the server died
        assert r.status_code == 200, r.text
        before[i] = r.json()["choices"][0]["message"]["content"]
        if len(before) >= 6:
            answered_6.set()

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(first, i) for i in range(24)]
        assert answered_6.wait(300)
        os.kill(server.proc.pid, signal.SIGKILL)
        for f in futures:
            f.result(timeout=60)
    assert server.proc.wait(30) == -signal.SIGKILL
    for child in children:  # a loader process of the killed server must not linger
        try:
            child.wait(10)
        except Exception:
            child.kill()
            pytest.fail(f"child process {child.pid} outlived the killed server")
    server.terminate()
    print(f"\nkill -9: {len(before)} answered, {len(sent) - len(before)} in flight at the kill")

    server = served.restart()
    asked = sorted(sent)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        with ThreadPoolExecutor(12) as pool:
            again = dict(zip(asked, pool.map(lambda i: ask(http, i), asked)))
            assert all(r.status_code == 200 for r in again.values()), [r.text for r in again.values() if r.status_code != 200][:3]
            hits = [i for i, r in again.items() if r.headers.get("x-cache") == "hit"]
            fresh = dict(zip(hits, pool.map(lambda i: ask(http, i, **{"Cache-Control": "no-cache"}), hits)))
    print(f"after restart: {len(hits)} of the {len(asked)} questions sent before the kill answered from the cache")
    # an answer is stored before its last event is sent: each one given before the kill is in the cache
    assert set(before) <= set(hits), sorted(set(before) - set(hits))
    for i in hits:
        cached = again[i].json()
        assert cached["choices"][0]["finish_reason"] in ("stop", "length")
        assert cached["choices"][0]["message"]["content"] == fresh[i].json()["choices"][0]["message"]["content"], i
        assert cached["usage"] == fresh[i].json()["usage"], i
        if i in before:
            assert cached["choices"][0]["message"]["content"] == before[i], i
    with sqlite3.connect(str(served.cache_file)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_sigterm_with_16_streams_in_flight_drains_and_exits_0(served):
    server = served.server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=served.key(), max_retries=0, timeout=300)
    streaming = threading.Barrier(16 + 1, timeout=300)

    def stream(i: int) -> tuple[str, list]:
        chunks = client.chat.completions.create(
            model="smollm2", stream=True, max_tokens=24, temperature=0.8,
            messages=[{"role": "user", "content": f"Tell me about the history of the number {i}."}])
        text, reasons = [], []
        with chunks:  # closed on the way out, also when the test fails
            for n, chunk in enumerate(chunks):
                for choice in chunk.choices:
                    text.append(choice.delta.content or "")
                    if choice.finish_reason:
                        reasons.append(choice.finish_reason)
                if n == 1:
                    streaming.wait()
        return "".join(text), reasons

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(stream, i) for i in range(16)]
        streaming.wait()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no new connection is taken while draining
            httpx.get(server.url + "/health", timeout=5)
        results = [f.result(timeout=300) for f in futures]
    assert all(text.strip() and reasons in (["stop"], ["length"]) for text, reasons in results), results
    assert server.proc.wait(120) == 0, server.log()[-3000:]
    assert any("draining" in rec.get("message", "") for rec in server.log_records())
