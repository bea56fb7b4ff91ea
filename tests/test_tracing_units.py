"""Tracing without a model or a collector: the middleware and the route-side span API around a
small Starlette app, spans caught by OpenTelemetry's in-memory exporter. What a span may carry
(prompt text only with ``log_content``), which routes are traced, and the ``--otlp-endpoint``
flag reaching the tracer."""

from __future__ import annotations

from types import SimpleNamespace

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from llamawrapper.server.tracing import Tracing, TracingMiddleware, from_settings, span_of
from llamawrapper.types import Usage

PROMPT = "my secret prompt"


def make_client(log_content: bool) -> tuple[TestClient, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing = Tracing(None, log_content=log_content, exporter=exporter)

    async def chat(request):
        span = span_of(request)
        body = SimpleNamespace(model="m", max_tokens=7, temperature=0.0, top_p=None, seed=None, n=1, stream=False,
                               message_dicts=lambda: [{"role": "user", "content": PROMPT}])
        span.start_generation("chat", body, "v2", "chatcmpl-1")
        request.scope["state"]["principal"] = SimpleNamespace(key_id="key-17")  # what the key layer sets
        handle = SimpleNamespace(metrics={"start_unix": 1000.0, "queue": 0.5, "ttft": 1.5, "latency": 3.0})
        span.finish_generation([handle], [Usage(4, 2)], ["length"])
        return JSONResponse({})

    async def plain(request):
        return JSONResponse({"traced": span_of(request) is not None})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", plain)])
    app.add_middleware(TracingMiddleware, tracing=tracing)
    return TestClient(app), exporter


def test_span_attributes_children_and_no_prompt_by_default():
    client, exporter = make_client(log_content=False)
    assert client.post("/v1/chat/completions").status_code == 200
    assert client.get("/health").json() == {"traced": False}  # only /v1/ routes are traced
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["chat m"]
    a = dict(root.attributes)
    assert a["gen_ai.request.max_tokens"] == 7 and a["gen_ai.request.temperature"] == 0.0
    assert "gen_ai.request.top_p" not in a  # not given: not invented
    assert a["gen_ai.response.finish_reasons"] == ("length",)
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (4, 2)
    assert (a["llamawrapper.model.version"], a["llamawrapper.api_key.id"]) == ("v2", "key-17")
    assert "gen_ai.input.messages" not in a
    assert all(PROMPT not in str(v) for s in spans.values() for v in dict(s.attributes).values())
    # child spans placed from the engine's clock: arrival at start_unix, then the offsets
    q, p, d = spans["queue"], spans["prefill"], spans["decode"]
    assert (q.start_time, q.end_time, p.end_time, d.end_time) == (1000 * 10**9, 1000_500_000_000, 1001_500_000_000, 1003 * 10**9)
    assert q.parent.span_id == root.context.span_id
    [event] = root.events
    assert event.name == "first_token" and event.timestamp == p.end_time


def test_prompt_text_only_with_log_content():
    client, exporter = make_client(log_content=True)
    client.post("/v1/chat/completions")
    [root] = [s for s in exporter.get_finished_spans() if s.name == "chat m"]
    assert PROMPT in root.attributes["gen_ai.input.messages"]


def test_otlp_endpoint_flag_turns_tracing_on(monkeypatch):
    from llamawrapper.server.command import settings_from_flags

    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    server, _ = settings_from_flags({"otlp_endpoint": "http://127.0.0.1:9/"})
    tracing = from_settings(server)
    assert tracing is not None and tracing.endpoint == "http://127.0.0.1:9/v1/traces"
    tracing.shutdown()
    server, _ = settings_from_flags({})
    assert from_settings(server) is None
