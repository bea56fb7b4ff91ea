"""Structured output, tool calls and the response cache through a real ``llamawrapper serve`` on
smollm2, spoken to by the official ``openai`` client: ``response_format``, ``tools``/``tool_choice``
(and a follow-up ``tool`` turn), a 400 naming an unsupported schema feature, ``x-cache: hit|miss``,
``Cache-Control: no-cache``, cached streams, and hit/miss counters in ``/metrics``."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from server_helpers import ServerProcess, openai_client

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_folder):
    tmp = tmp_path_factory.mktemp("server-structured")
    env = {"LLAMAWRAPPER_CACHE_ENABLED": "true", "LLAMAWRAPPER_CACHE_URL": f"sqlite:///{tmp / 'responses.sqlite'}"}
    srv = ServerProcess(["smollm2"], "--max-batch-size", "8", log_path=tmp / "server.log", env=env)
    try:
        yield srv.wait_ready()
    finally:
        srv.terminate()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, timeout=300)


def test_response_format_json_schema(client):
    res = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Describe a person as JSON."}],
                                         max_tokens=48, temperature=0,
                                         response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert res.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(res.choices[0].message.content), PERSON)


def test_unsupported_schema_feature_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}})
    assert "not" in info.value.message and info.value.body["param"].startswith("response_format")


def test_tool_call_and_follow_up(client):
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    res = client.chat.completions.create(model="smollm2", messages=msgs, tools=WEATHER, tool_choice="required", max_tokens=40, temperature=0)
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER[0]["function"]["parameters"])
    follow = msgs + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    res = client.chat.completions.create(model="smollm2", messages=follow, tools=WEATHER, tool_choice="none", max_tokens=24, temperature=0)
    assert res.choices[0].message.tool_calls is None and res.choices[0].message.content


def test_streamed_tool_call(client):
    chunks = list(client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=WEATHER,
                                                 tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                                 max_tokens=40, temperature=0, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER[0]["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_cache_headers_no_cache_streams_and_metrics(client, server):
    msgs = [{"role": "user", "content": "Name three colors."}]
    raw = client.chat.completions.with_raw_response.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0)
    first = raw.parse()
    assert raw.headers["x-cache"] == "miss"
    raw = client.chat.completions.with_raw_response.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0)
    assert raw.headers["x-cache"] == "hit" and raw.parse().choices[0].message.content == first.choices[0].message.content
    raw = client.chat.completions.with_raw_response.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0,
                                                           extra_headers={"Cache-Control": "no-cache"})
    assert "x-cache" not in raw.headers and raw.parse().choices[0].message.content == first.choices[0].message.content
    raw = client.chat.completions.with_raw_response.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0.9)
    assert "x-cache" not in raw.headers  # sampled without a seed: not cacheable
    with client.chat.completions.with_streaming_response.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0,
                                                                stream=True) as resp:
        assert resp.headers["x-cache"] == "hit"
        chunks = list(resp.parse())
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1 and "".join(content) == first.choices[0].message.content  # replayed as a stream
    assert server.metric("llamawrapper_response_cache_requests_total", model="smollm2", result="hit") >= 2
    assert server.metric("llamawrapper_response_cache_requests_total", model="smollm2", result="miss") >= 1
