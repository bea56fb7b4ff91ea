"""A real server on smollm2 with one slot and a one-request queue: /ready is 503 until the model
loads, a burst larger than the queue gets 429s (never 5xx) that the ``openai`` client raises as
``RateLimitError``, and SIGTERM lets the in-flight request finish, then exits 0."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from server_helpers import ServerProcess, answers_after_idle

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_folder):
    srv = ServerProcess(["smollm2"], "--max-batch-size", "1", "--max-queue", "1", "--drain-timeout", "120",
                        log_path=tmp_path_factory.mktemp("lifecycle") / "server.log")
    try:
        yield srv
    finally:
        srv.terminate()


def _wait_metric(server, name: str, value: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.metric(name, model="smollm2") == value:
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} never reached {value}")


def test_ready_is_503_until_the_model_is_loaded(server):
    server.wait_listening()
    first = httpx.get(server.url + "/ready", timeout=10)
    assert first.status_code == 503 and first.json()["error"]["code"] == "model_not_ready"
    chat = httpx.post(server.url + "/v1/chat/completions", json={"model": "smollm2", "messages": MSG}, timeout=10)
    assert chat.status_code in (503, 200)  # 200 only if loading finished in between
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    server.wait_ready()
    ready = httpx.get(server.url + "/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["models"] == {"smollm2": "ready"}


def test_burst_beyond_queue_gets_429_never_5xx(server):
    server.wait_ready()
    body = {"model": "smollm2", "messages": MSG, "max_tokens": 8, "temperature": 0}

    def one(_):
        return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(one, range(12)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= 2, statuses
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["usage"]["completion_tokens"] == 8
    assert server.metric("llamawrapper_engine_requests_rejected_total", model="smollm2") == statuses.count(429)


def test_openai_client_raises_rate_limit_error(server):
    server.wait_ready()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    running = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=1000, stream=True)
    chunks = iter(running)
    while not next(chunks).choices[0].delta.content:  # decoding: it holds the only slot
        pass
    queued = ThreadPoolExecutor(1).submit(client.chat.completions.create, model="smollm2", messages=MSG, max_tokens=4)
    _wait_metric(server, "llamawrapper_queue_depth", 1)
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=4)
    assert exc.value.response.headers["retry-after"]
    running.close()  # disconnect: frees the slot for the queued one
    assert queued.result(timeout=120).usage.completion_tokens == 4


def test_an_idle_connection_stays_open_past_the_clients_own_keep_alive(server):
    """httpx and the openai client reuse a connection idle up to 5 s: were the server to close
    idle connections at 5 s too (uvicorn's default), a request sent just as it closes one is
    reset. A connection idle 7 s still answers its next request, on the same socket."""
    server.wait_ready()
    first, second = answers_after_idle(server.url + "/health", idle=7)
    assert first == second == (200, {"status": "ok", "models": {"smollm2": "ready"}})


def test_sigterm_drains_in_flight_then_exits_0(server):
    server.wait_ready()
    result = {}

    def long_request():
        r = httpx.post(server.url + "/v1/chat/completions", timeout=300,
                       json={"model": "smollm2", "messages": MSG, "max_tokens": 48, "temperature": 0, "seed": 1})
        result["status"], result["body"] = r.status_code, r.json()

    t = threading.Thread(target=long_request)
    t.start()
    _wait_metric(server, "llamawrapper_running_batch_size", 1)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(server.url + "/health", timeout=5)
    t.join(300)
    assert result["status"] == 200, result
    assert result["body"]["usage"]["completion_tokens"] == 48 or result["body"]["choices"][0]["finish_reason"] == "stop"
    assert server.proc.wait(120) == 0
    assert any("draining" in rec.get("message", "") for rec in server.log_records())
