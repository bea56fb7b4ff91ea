"""The real server on smollm2, spoken to by the official ``openai`` client and by httpx: chat and
completions (streamed and not), models, usage, stop, typed errors, auth on every route, 413,
request ids in JSON logs, 32 concurrent clients, and disconnects freeing their slots."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from server_helpers import ServerProcess, openai_client, wait_until

pytestmark = pytest.mark.slow

KEY = "test-key-123"
MSG = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_folder):
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = ServerProcess(["smollm2"], "--max-batch-size", "8", "--max-queue", "64", "--max-body-bytes", "100000",
                        log_path=log, api_key=KEY)
    try:
        yield srv.wait_ready()
    finally:
        srv.terminate()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, timeout=120)


def test_chat_stream_equals_non_stream(client):
    full = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=16, temperature=0)
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    choice = full.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0 and full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=16, temperature=0, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.usage is None for c in chunks)


def test_stream_include_usage(client):
    chunks = list(client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=5, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 5 and last.usage.prompt_tokens > 5
    assert chunks[-2].choices[0].finish_reason == "length"


def test_stop_string_ends_answer(client):
    base = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=16, temperature=0).choices[0].message.content
    word = "France"
    assert word in base
    res = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=16, temperature=0, stop=[word])
    assert res.choices[0].message.content == base[: base.index(word)]
    assert res.choices[0].finish_reason == "stop"


def test_completions_and_stream(client):
    res = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert res.object == "text_completion" and res.choices[0].text and res.usage.completion_tokens == 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == res.choices[0].text
    echo = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0, echo=True)
    assert echo.choices[0].text == "The capital of France is" + res.choices[0].text


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    assert client.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_typed_client_errors(server, client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="smollm2", messages=MSG, temperature=5)
    assert bad.value.body["param"] == "temperature" and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as long_:
        client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=10**6)
    assert long_.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert missing.value.code == "model_not_found"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_error_bodies_are_openai_shaped(server):
    with server.client() as c:
        for body in ({"model": "smollm2"}, {"model": "smollm2", "messages": "x"}, {"messages": MSG}, [1, 2]):
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and "detail" not in r.json()
        assert c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
        r = c.get("/v2/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = c.post("/v1/chat/completions", json={"model": "smollm2", "messages": [{"role": "user", "content": "x" * 200_000}]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        chunked = c.post("/v1/chat/completions", content=(b" " * 50_000 for _ in range(3)),  # no Content-Length
                         headers={"content-type": "application/json"})
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"


def test_unknown_fields_accepted_and_logged_with_request_id(server):
    with server.client() as c:
        r = c.post("/v1/chat/completions", headers={"x-request-id": "rid-unknown-1"},
                   json={"model": "smollm2", "messages": MSG, "max_tokens": 2, "frobnicate": True})
    assert r.status_code == 200 and r.headers["x-request-id"] == "rid-unknown-1"

    def records() -> list[dict]:
        return [rec for rec in server.log_records() if rec.get("request_id") == "rid-unknown-1"]
    # the access line is written once the response has gone out
    wait_until(lambda: any(rec.get("status") == 200 and rec.get("path") == "/v1/chat/completions" for rec in records()),
               timeout=5)
    assert any("frobnicate" in rec["message"] for rec in records())
    assert KEY not in server.log()
    with server.client() as c:
        generated = c.get("/v1/models").headers["x-request-id"]
    assert len(generated) >= 16


def test_auth_on_every_route_but_health(server):
    with server.client() as c:
        paths = c.get("/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/metrics", "/ready"} <= set(paths)
    checked = 0
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        for path, ops in paths.items():
            for method in ops:
                url = path.replace("{model}", "smollm2")
                for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": KEY}):
                    r = anon.request(method.upper(), url, headers=headers, json={})
                    expected = 200 if path == "/health" else 401
                    assert r.status_code == expected, (method, path, headers, r.text)
                    if expected == 401:
                        assert r.json()["error"]["code"] == "invalid_api_key"
                    checked += 1
        assert anon.get("/openapi.json").status_code == 401 and anon.get("/docs").status_code == 401
    assert checked >= 24


def test_tokenize_detokenize_roundtrip(server):
    with server.client() as c:
        tok = c.post("/tokenize", json={"model": "smollm2", "prompt": "Hello world"}).json()
        assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 8192
        assert c.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "Hello world"
        assert c.post("/detokenize", json={"tokens": [10**9]}).json()["error"]["param"] == "tokens"
        chat = c.post("/tokenize", json={"messages": MSG}).json()
        assert chat["count"] > tok["count"]


def test_32_concurrent_clients_get_correct_answers(server):
    prompts = [f"What is {a} plus {a}?" for a in (2, 3, 5, 7)]

    def ask(c, p):
        return c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": p}], max_tokens=10, temperature=0)

    sync = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    expected = {p: ask(sync, p).choices[0].message.content for p in prompts}

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        jobs = [prompts[i % len(prompts)] for i in range(32)]
        answers = await asyncio.gather(*(ask_async(aclient, p) for p in jobs))
        await aclient.close()
        return jobs, answers

    async def ask_async(c, p):
        return await c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": p}], max_tokens=10, temperature=0)

    jobs, answers = asyncio.run(main())
    for p, a in zip(jobs, answers):
        assert a.choices[0].message.content == expected[p]
    assert server.metric("llamawrapper_http_requests_total", route="/v1/chat/completions", status="200") >= 32


def _wait_idle(server, cancelled_before: float, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = server.metric("llamawrapper_running_batch_size", model="smollm2")
        cancelled = server.metric("llamawrapper_engine_requests_cancelled_total", model="smollm2")
        if running == 0 and cancelled > cancelled_before:
            return {"running": running, "cancelled": cancelled}
        time.sleep(0.1)
    raise AssertionError(f"slot not freed: running={running} cancelled={cancelled} (before {cancelled_before})")


def test_disconnect_mid_stream_frees_slot(server):
    before = server.metric("llamawrapper_engine_requests_cancelled_total", model="smollm2")
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
            "max_tokens": 2000, "stream": True, "temperature": 0}
    with server.client() as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = 0
            for line in r.iter_lines():
                lines += line.startswith("data:")
                if lines >= 3:
                    break
        assert server.metric("llamawrapper_running_batch_size", model="smollm2") <= 1
    state = _wait_idle(server, before)
    assert state["running"] == 0


def test_disconnect_non_streaming_cancels(server):
    before = server.metric("llamawrapper_engine_requests_cancelled_total", model="smollm2")
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a very long story about a cat."}],
            "max_tokens": 2000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        with server.client(timeout=httpx.Timeout(60, read=2.0)) as c:
            c.post("/v1/chat/completions", json=body)
    _wait_idle(server, before)


def test_metrics_exposition(server):
    samples = {name for name, _ in server.metrics()}
    for name in ("llamawrapper_http_requests_total", "llamawrapper_http_request_duration_seconds_bucket",
                 "llamawrapper_time_to_first_token_seconds_bucket", "llamawrapper_prompt_tokens_total",
                 "llamawrapper_generation_tokens_total", "llamawrapper_queue_depth", "llamawrapper_running_batch_size",
                 "llamawrapper_prefix_cache_hit_rate"):
        assert name in samples, name
    assert server.metric("llamawrapper_generation_tokens_total", model="smollm2") > 0
    # the same system prompt and question asked many times above: the prefix cache served some of it
    assert server.metric("llamawrapper_prefix_cache_hit_rate", model="smollm2") > 0
