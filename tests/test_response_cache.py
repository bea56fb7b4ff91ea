"""The response cache: SQLite (TTL, size bound, survives a reopen and a killed writer) and a real
Redis server on loopback, and the cache through the Python API (hits replay streams, per-request
opt-out, only deterministic requests, keys cover every sampling parameter)."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from llamawrapper import LlamaWrapper
from llamawrapper.requests.response_cache import RedisCache, ResponseCache, SQLiteCache, cache_key, decode_events, encode_events
from llamawrapper.types import SamplingParams, StreamEvent, Usage

EVENTS = [StreamEvent("Hel", [1]), StreamEvent("lo", [2]), StreamEvent("!", [3], "stop", Usage(5, 3, 0))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server on a loopback port for this module."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make setup installs it with apt-get when run as root)")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def test_events_round_trip():
    back = decode_events(encode_events(EVENTS))
    assert [(e.text, e.token_ids, e.finish_reason) for e in back] == [(e.text, e.token_ids, e.finish_reason) for e in EVENTS]
    assert back[-1].usage == Usage(5, 3, 0)


def test_key_covers_every_sampling_parameter_and_the_model():
    model = {"weights": "abc", "revision": None, "chat_template": "t"}
    base = cache_key(model, [1, 2], SamplingParams(max_tokens=8, temperature=0))
    assert base == cache_key(dict(model), [1, 2], SamplingParams(max_tokens=8, temperature=0))
    variants = [SamplingParams(max_tokens=9, temperature=0), SamplingParams(max_tokens=8, temperature=0, top_k=5),
                SamplingParams(max_tokens=8, temperature=0, stop=["x"]), SamplingParams(max_tokens=8, temperature=0, seed=1),
                SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.1), SamplingParams(max_tokens=8, temperature=0, top_p=0.9)]
    keys = {cache_key(model, [1, 2], p) for p in variants}
    keys |= {cache_key({**model, "weights": "def"}, [1, 2], SamplingParams(max_tokens=8, temperature=0)),
             cache_key({**model, "chat_template": "u"}, [1, 2], SamplingParams(max_tokens=8, temperature=0)),
             cache_key({**model, "adapter": "lora1"}, [1, 2], SamplingParams(max_tokens=8, temperature=0)),
             cache_key(model, [1, 3], SamplingParams(max_tokens=8, temperature=0)),
             cache_key(model, [1, 2], SamplingParams(max_tokens=8, temperature=0), {"grammar": "g"})}
    assert base not in keys and len(keys) == len(variants) + 5


def test_sqlite_ttl_size_bound_and_reopen(tmp_path):
    path = tmp_path / "c.sqlite"
    cache = SQLiteCache(path, ttl=None, max_entries=3)
    for i in range(5):
        cache.put(f"k{i}", b"v%d" % i)
        time.sleep(0.01)
    assert len(cache) == 3 and cache.get("k0") is None and cache.get("k4") == b"v4"
    cache.close()
    reopened = SQLiteCache(path, ttl=0.2, max_entries=3)
    assert reopened.get("k4") == b"v4"  # survived closing
    assert reopened._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened.put("fresh", b"x")
    time.sleep(0.3)
    assert reopened.get("fresh") is None  # expired
    small = SQLiteCache(tmp_path / "s.sqlite", max_entries=100, max_bytes=1000)
    for i in range(10):
        small.put(f"k{i}", b"x" * 300)
    assert len(small) == 3


def test_sqlite_survives_a_killed_writer(tmp_path):
    path = tmp_path / "killed.sqlite"
    writer = ("import sys; from llamawrapper.requests.response_cache import SQLiteCache\n"
              "c = SQLiteCache(sys.argv[1], max_entries=100000)\n"
              "i = 0\n"
              "while True:\n"
              "    c.put('k%d' % i, b'v' * 2000); i += 1\n"
              "    if i == 50: print('ready', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    proc.kill()  # SIGKILL in the middle of writing
    proc.wait()
    db = sqlite3.connect(str(path))
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    count = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    assert count >= 50 and db.execute("SELECT COUNT(*) FROM responses WHERE size != 2000").fetchone()[0] == 0
    cache = SQLiteCache(path)
    assert cache.get("k10") == b"v" * 2000


def test_redis_backend_ttl_and_bound(redis_url):
    cache = RedisCache(redis_url, ttl=0.3, max_entries=3, prefix="t1:")
    cache.clear()
    for i in range(5):
        cache.put(f"k{i}", b"v%d" % i)
        time.sleep(0.01)
    assert len(cache) == 3 and cache.get("k0") is None and cache.get("k4") == b"v4"
    time.sleep(0.5)
    assert cache.get("k4") is None  # expired in Redis itself
    cache.close()


# -- through the API ------------------------------------------------------------------------------------
@pytest.fixture
def cached_llm(tiny_model_dir, lw_home):
    llm = LlamaWrapper.load(str(tiny_model_dir), progress=False, cache=True)
    yield llm
    llm.close()


def test_hit_replays_the_stream_and_says_so(cached_llm, lw_home):
    first = cached_llm.chat("hello", max_tokens=12, temperature=0)
    assert first.cache == "miss"
    assert (lw_home / "cache" / "responses.sqlite").is_file()
    second = cached_llm.chat("hello", max_tokens=12, temperature=0)
    assert second.cache == "hit" and second.text == first.text and second.token_ids == first.token_ids
    assert second.usage == first.usage and second.finish_reason == first.finish_reason
    events = list(cached_llm.stream("hello", max_tokens=12, temperature=0))
    assert len(events) == 12 and "".join(e.text for e in events) == first.text and events[-1].finish_reason == first.finish_reason
    handle = cached_llm.submit_chat("hello", SamplingParams(max_tokens=12, temperature=0))
    assert handle.cache_status == "hit"
    assert cached_llm.custom.cache.stats()["hits"] == 3 and cached_llm.custom.cache.stats()["misses"] == 1


def test_opt_out_sampling_and_other_params_miss(cached_llm):
    cached_llm.chat("hey", max_tokens=6, temperature=0)
    assert cached_llm.chat("hey", max_tokens=6, temperature=0, cache=False).cache is None
    assert cached_llm.chat("hey", max_tokens=6, temperature=0.8).cache is None  # sampled without a seed: never cached
    assert cached_llm.chat("hey", max_tokens=7, temperature=0).cache == "miss"
    assert cached_llm.chat("hey", max_tokens=6, temperature=0.8, seed=3).cache == "miss"
    assert cached_llm.chat("hey", max_tokens=6, temperature=0.8, seed=3).cache == "hit"


def test_cache_survives_reload(tiny_model_dir, lw_home):
    llm = LlamaWrapper.load(str(tiny_model_dir), progress=False, cache=True)
    first = llm.chat("persist me", max_tokens=5, temperature=0)
    llm.close()
    llm = LlamaWrapper.load(str(tiny_model_dir), progress=False, cache=True)
    again = llm.chat("persist me", max_tokens=5, temperature=0)
    llm.close()
    assert (first.cache, again.cache) == ("miss", "hit") and again.text == first.text


def test_api_with_redis(tiny_model_dir, redis_url):
    llm = LlamaWrapper.load(str(tiny_model_dir), progress=False, cache=redis_url)
    try:
        assert isinstance(llm.custom.cache, ResponseCache) and isinstance(llm.custom.cache.backend, RedisCache)
        llm.custom.cache.backend.clear()
        a = llm.chat("redis?", max_tokens=5, temperature=0)
        b = llm.chat("redis?", max_tokens=5, temperature=0)
        assert (a.cache, b.cache) == ("miss", "hit") and a.text == b.text
    finally:
        llm.close()


def test_structured_requests_are_keyed_on_the_format(cached_llm):
    rf = {"type": "choice", "choices": ["left", "right"]}
    a = cached_llm.chat("which?", max_tokens=4, temperature=0, response_format=rf)
    b = cached_llm.chat("which?", max_tokens=4, temperature=0, response_format=rf)
    c = cached_llm.chat("which?", max_tokens=4, temperature=0, response_format={"type": "choice", "choices": ["up", "down"]})
    assert (a.cache, b.cache, c.cache) == ("miss", "hit", "miss") and b.text in ("left", "right") and c.text in ("up", "down")
