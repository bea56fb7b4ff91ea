"""Structured output and tool calls: grammars from response formats, constrained decoding through
the engine (a random-weight model must still produce valid output), 24 JSON schemas on the real
model validated with jsonschema, regex and choice formats, streams, and OpenAI-shaped tool calls."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from llamawrapper import LlamaWrapper
from llamawrapper.errors import InvalidRequestError
from llamawrapper.requests.structured import tools as toolslib
from llamawrapper.requests.structured.grammar import grammar_for

S = {"type": "string", "maxLength": 24}

SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"city": S, "country": S}, "required": ["city", "country"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000}}, "required": ["price"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "maxItems": 4}},
     "required": ["scores"]},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {"first": S, "last": S}, "required": ["first", "last"]}},
     "required": ["person"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {"c": {"type": "integer", "maximum": 999}},
     "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]},
    {"type": "object", "properties": {"title": S, "subtitle": S}, "required": ["title"]},  # optional field
    {"type": "object", "properties": {"id": {"type": "integer", "maximum": 99999}, "note": {"type": ["string", "null"], "maxLength": 20}},
     "required": ["id", "note"]},
    {"type": "object", "properties": {"status": {"const": "done"}, "count": {"type": "integer", "maximum": 50}}, "required": ["status", "count"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
     "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "maximum": 100}, S]}}, "required": ["value"]},
    {"type": "object", "properties": {"day": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]}, "hour": {"type": "integer", "minimum": 0, "maximum": 23}},
     "required": ["day", "hour"]},
    {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90}, "lon": {"type": "number", "minimum": -180, "maximum": 180}},
     "required": ["lat", "lon"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["code"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {"type": "array", "items": {"type": "integer", "maximum": 9}, "maxItems": 2}}},
     "required": ["matrix"]},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "maximum": 99}, "y": {"type": "integer", "maximum": 99}}, "required": ["x", "y"]}},
     "type": "object", "properties": {"start": {"$ref": "#/$defs/pt"}, "end": {"$ref": "#/$defs/pt"}}, "required": ["start", "end"]},
    {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["answer", "confidence"]},
    {"type": "array", "items": {"type": "integer", "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"email": {"type": "string", "format": "email"}}, "required": ["email"]},
    {"type": "object", "properties": {"meta": {"type": "object", "properties": {"version": {"type": "integer", "maximum": 9}, "beta": {"type": "boolean"}},
     "required": ["version"]}, "name": S}, "required": ["meta", "name"]},
    {"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 10}, "minItems": 3, "maxItems": 3}},
     "required": ["words"]},
]
PROMPTS = ["Describe a person.", "Name a city.", "Pick a color.", "Is water wet?", "Price of a book?", "Tag this post about cooking.",
           "Give test scores.", "Who wrote Hamlet?", "Nest some data.", "Title a blog post.", "Make a record.", "Report a task.",
           "Build an order.", "Give a value.", "When do we meet?", "Where is Paris?", "Airport code of Paris?", "A small matrix.",
           "A line segment.", "Is the sky blue?", "Some digits.", "Contact email?", "Describe a release.", "Three words."]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    llm = LlamaWrapper.load(str(tiny_model_dir), progress=False)
    yield llm
    llm.close()


# -- request validation (no model needed) --------------------------------------------------------------
def test_unsupported_schema_feature_is_named():
    with pytest.raises(InvalidRequestError, match='"not"') as info:
        grammar_for({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}})
    assert info.value.param == "response_format.json_schema.schema"
    with pytest.raises(InvalidRequestError, match="uniqueItems"):
        grammar_for({"type": "json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": True}}})
    with pytest.raises(InvalidRequestError, match="'if'"):
        grammar_for({"type": "json_schema", "json_schema": {"schema": {"if": {"type": "string"}, "then": {"maxLength": 3}}}})


@pytest.mark.parametrize("rf", [{"type": "xml"}, "json", {"type": "regex"}, {"type": "choice", "choices": []}, {"type": "json_schema"}])
def test_malformed_response_format_is_invalid_request(rf):
    with pytest.raises(InvalidRequestError):
        grammar_for(rf)


def test_unknown_string_format_is_refused():
    with pytest.raises(InvalidRequestError, match="uri-template"):
        grammar_for({"type": "json_schema", "json_schema": {"schema": {"type": "string", "format": "uri-template"}}})


def test_text_format_means_no_constraint():
    assert grammar_for(None) is None and grammar_for({"type": "text"}) is None


def test_tool_validation_errors_name_the_culprit():
    fn = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}
    with pytest.raises(InvalidRequestError, match="not in 'tools'"):
        toolslib.parse_tools([fn], {"type": "function", "function": {"name": "g"}})
    with pytest.raises(InvalidRequestError) as info:
        toolslib.parse_tools([{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}])
    assert info.value.param == "tools[0].function.parameters"
    with pytest.raises(InvalidRequestError):
        toolslib.parse_tools([fn], "sometimes")
    with pytest.raises(InvalidRequestError):
        toolslib.parse_tools(None, "required")
    assert toolslib.parse_tools([fn]).choice == "auto"


def test_tool_messages_render_for_templates_without_tool_support():
    spec = toolslib.parse_tools([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}], "auto")
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                                                                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "4 C"}]
    out = toolslib.render_messages(msgs, spec, native=False)
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    assert out[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    assert out[3] == {"role": "user", "content": "<tool_response>\n4 C\n</tool_response>"}
    calls = toolslib.parse_calls(out[2]["content"])
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'} and calls[0]["id"].startswith("call_")
    assert toolslib.parse_calls("plain answer") is None


# -- constrained decoding through the engine (random weights: only the grammar makes it valid) --------------
def test_random_model_output_still_matches_schema_and_ends_at_grammar_end(tiny):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "boolean"}},
              "required": ["n", "b"], "additionalProperties": False}
    res = tiny.chat("hi", max_tokens=60, temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    jsonschema.validate(json.loads(res.text), schema)
    assert res.finish_reason == "stop"  # EOS forced when the grammar completed, long before max_tokens
    free = tiny.chat("hi", max_tokens=20, temperature=0)
    assert free.finish_reason == "length"  # the same model unconstrained rambles to the limit


def test_regex_choice_and_sampled_requests_on_random_model(tiny):
    res = tiny.chat("hi", max_tokens=20, temperature=0, response_format={"type": "regex", "regex": "[0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", res.text) and res.finish_reason == "stop"
    for seed in range(3):
        res = tiny.chat("hi", max_tokens=10, temperature=1.0, seed=seed, response_format={"type": "choice", "choices": ["alpha", "beta", "gamma"]})
        assert res.text in ("alpha", "beta", "gamma")


def test_stream_with_schema_concatenates_to_valid_json(tiny):
    schema = {"type": "object", "properties": {"k": {"enum": ["x", "y"]}}, "required": ["k"], "additionalProperties": False}
    events = list(tiny.stream("hi", max_tokens=30, temperature=0, response_format={"type": "json_schema", "json_schema": {"schema": schema}}))
    assert len(events) > 2 and events[-1].finish_reason == "stop"
    jsonschema.validate(json.loads("".join(e.text for e in events)), schema)


def test_forced_tool_call_on_random_model_has_valid_arguments(tiny):
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["city", "days"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": params}},
             {"type": "function", "function": {"name": "other", "parameters": {"type": "object", "properties": {}}}}]
    res = tiny.chat("hi", tools=tools, tool_choice={"type": "function", "function": {"name": "forecast"}}, max_tokens=60, temperature=0)
    assert res.finish_reason == "tool_calls" and res.text == ""
    (call,) = res.tool_calls
    assert call["type"] == "function" and call["function"]["name"] == "forecast"
    jsonschema.validate(json.loads(call["function"]["arguments"]), params)


# -- the real model ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_24_schemas_on_smollm2_all_parse_and_validate(smollm2):
    assert len(SCHEMAS) == len(PROMPTS) >= 20
    formats = [{"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": s}} for i, s in enumerate(SCHEMAS)]
    results = smollm2.batch([f"{p} Answer in JSON." for p in PROMPTS], max_tokens=96, temperature=0, response_format=formats)
    for schema, res in zip(SCHEMAS, results):
        assert res.finish_reason == "stop", (schema, res.text)
        jsonschema.validate(json.loads(res.text), schema)


@pytest.mark.slow
def test_json_object_and_choice_on_smollm2(smollm2):
    res = smollm2.chat("Give me a JSON object describing a cat with a name and an age.", max_tokens=80, temperature=0,
                       response_format={"type": "json_object"})
    assert isinstance(json.loads(res.text), dict)
    res = smollm2.chat("Is Paris the capital of France? Answer yes or no.", max_tokens=5, temperature=0,
                       response_format={"type": "choice", "choices": ["yes", "no"]})
    assert res.text == "yes"


WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_call_on_smollm2(smollm2, choice):
    res = smollm2.chat("What's the weather in Paris?", tools=WEATHER, tool_choice=choice, max_tokens=40, temperature=0)
    assert res.finish_reason == "tool_calls"
    args = json.loads(res.tool_calls[0]["function"]["arguments"])
    jsonschema.validate(args, WEATHER[0]["function"]["parameters"])
    assert args["city"] == "Paris"


@pytest.mark.slow
def test_tool_choice_none_and_follow_up_turn_on_smollm2(smollm2):
    res = smollm2.chat("What's the weather in Paris?", tools=WEATHER, tool_choice="none", max_tokens=16, temperature=0)
    assert res.tool_calls is None and res.text
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    follow = [{"role": "user", "content": "What's the weather in Paris?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
              {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    res = smollm2.chat(follow, tools=WEATHER, tool_choice="none", max_tokens=24, temperature=0)
    assert res.tool_calls is None and res.finish_reason in ("stop", "length")
    assert "18" in res.text or "sunny" in res.text.lower()
    events = list(smollm2.stream(follow, tools=WEATHER, tool_choice="auto", max_tokens=24, temperature=0))
    last = events[-1]
    if last.tool_calls:  # auto may call again; then the arguments must still be valid
        jsonschema.validate(json.loads(last.tool_calls[0]["function"]["arguments"]), WEATHER[0]["function"]["parameters"])
    else:
        assert "".join(e.text for e in events).strip()
