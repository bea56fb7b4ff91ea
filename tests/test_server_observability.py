"""Traces and latency metrics of a real server process: OpenTelemetry spans exported over
OTLP/HTTP to a receiver this test runs on loopback (decoded with ``opentelemetry-proto``), and
the vLLM-named histograms on ``/metrics``. The server serves the tiny random-weight model
(what it says does not matter here, only how long and how many tokens)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from server_helpers import ServerProcess

SECRET = "the-prompt-text-must-not-leave-the-server-7c1f"


class OTLPReceiver:
    """A minimal OTLP/HTTP collector: POST /v1/traces with an ExportTraceServiceRequest."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                              ExportTraceServiceResponse)

        self.spans: list = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    for rs in request.resource_spans:
                        service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name")
                        for ss in rs.scope_spans:
                            receiver.spans.extend((service, span) for span in ss.spans)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, predicate, timeout: float = 30.0) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [s for _, s in self.spans if predicate(s)]
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"no matching span within {timeout} s; got {[s.name for _, s in self.spans]}")

    def children_of(self, span) -> list:
        with self.lock:
            return [s for _, s in self.spans if s.parent_span_id == span.span_id and s.trace_id == span.trace_id]

    def close(self) -> None:
        self.server.shutdown()


def attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        kind = v.WhichOneof("value")
        out[a.key] = [getattr(x, x.WhichOneof("value")) for x in v.array_value.values] if kind == "array_value" else getattr(v, kind)
    return out


@pytest.fixture(scope="module")
def receiver():
    r = OTLPReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, receiver):
    log = tmp_path_factory.mktemp("observability") / "server.log"
    srv = ServerProcess([f"tiny={tiny_model_dir}"], log_path=log,
                        env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100",
                             "OTEL_SERVICE_NAME": "llamawrapper-test"})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.terminate()


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.mark.slow
def test_chat_span_follows_genai_conventions_and_incoming_traceparent(server, receiver):
    with server.client() as c:
        r = c.post("/v1/chat/completions", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}, json={
            "model": "tiny", "messages": [{"role": "user", "content": SECRET}], "max_tokens": 6, "temperature": 0.5,
            "top_p": 0.9, "seed": 3})
    assert r.status_code == 200
    body = r.json()
    [span] = receiver.wait_for(lambda s: s.trace_id.hex() == TRACE_ID and s.name == "chat tiny")
    assert span.parent_span_id.hex() == PARENT_ID  # the caller's span is our parent
    assert span.kind == 2  # SPAN_KIND_SERVER
    a = attrs(span)
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "tiny"
    assert a["gen_ai.request.max_tokens"] == 6
    assert a["gen_ai.request.temperature"] == pytest.approx(0.5)
    assert a["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert a["gen_ai.response.id"] == body["id"]
    assert a["gen_ai.response.finish_reasons"] == [body["choices"][0]["finish_reason"]]
    assert a["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"]
    assert a["llamawrapper.model.version"] == r.headers["x-model-version"]
    assert a["http.response.status_code"] == 200

    # queue -> prefill -> decode as child spans, in order, inside the request's span
    children = {s.name: s for s in receiver.children_of(span)}
    assert {"queue", "prefill", "decode"} <= set(children)
    q, p, d = children["queue"], children["prefill"], children["decode"]
    assert q.end_time_unix_nano <= p.start_time_unix_nano + 1000 and p.end_time_unix_nano <= d.start_time_unix_nano + 1000
    slack = 50_000_000  # 50 ms: the engine's wall clock is read at submit, the span's a moment earlier
    assert span.start_time_unix_nano - slack <= q.start_time_unix_nano
    assert d.end_time_unix_nano <= span.end_time_unix_nano + slack
    [first] = [e for e in span.events if e.name == "first_token"]
    assert first.time_unix_nano == p.end_time_unix_nano

    # no prompt text anywhere unless log_content is on
    with receiver.lock:
        dump = json.dumps([str(s) for _, s in receiver.spans])
    assert SECRET not in dump


@pytest.mark.slow
def test_streamed_and_refused_requests_are_traced(server, receiver):
    with server.client() as c:
        with c.stream("POST", "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            frames = [line for line in r.iter_lines() if line.startswith("data: {")]
        chat_id = json.loads(frames[0][6:])["id"]
        bad = c.post("/v1/chat/completions", json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
    assert bad.status_code == 404
    [span] = receiver.wait_for(lambda s: attrs(s).get("gen_ai.response.id") == chat_id)
    a = attrs(span)
    assert a["llamawrapper.stream"] is True
    assert a["gen_ai.usage.output_tokens"] == json.loads(frames[-1][6:])["usage"]["completion_tokens"]
    assert {c.name for c in receiver.children_of(span)} >= {"queue", "prefill", "decode"}
    # a stream the client leaves early is marked cancelled
    with server.client() as c:
        with c.stream("POST", "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 400,
                "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()
            left_id = json.loads(next(line for line in lines if line.startswith("data: {"))[6:])["id"]
    [left] = receiver.wait_for(lambda s: attrs(s).get("gen_ai.response.id") == left_id)
    assert attrs(left)["gen_ai.response.finish_reasons"] == ["cancelled"]
    # a refused request still has its span, marked with the HTTP status (no GenAI response)
    refused = receiver.wait_for(lambda s: attrs(s).get("http.response.status_code") == 404)
    assert attrs(refused[0])["error.type"] == "404"


@pytest.mark.slow
def test_latency_histograms_follow_the_engine(server):
    before = {n: server.metric(n, model="tiny") for n in (
        "llamawrapper_time_to_first_token_seconds_count", "llamawrapper_inter_token_latency_seconds_count",
        "llamawrapper_e2e_request_latency_seconds_count", "llamawrapper_request_queue_time_seconds_count",
        "llamawrapper_generation_tokens_total", "llamawrapper_request_generation_tokens_count")}
    completions = []
    with server.client() as c:
        for k in range(3):
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": f"count {k}", "max_tokens": 4 + k,
                                                "temperature": 0})
            assert r.status_code == 200
            completions.append(r.json()["usage"]["completion_tokens"])
    delta = {n: server.metric(n, model="tiny") - v for n, v in before.items()}
    assert delta["llamawrapper_time_to_first_token_seconds_count"] == 3
    assert delta["llamawrapper_e2e_request_latency_seconds_count"] == 3
    assert delta["llamawrapper_request_queue_time_seconds_count"] == 3
    assert delta["llamawrapper_request_generation_tokens_count"] == 3
    assert delta["llamawrapper_generation_tokens_total"] == sum(completions)
    # one gap between every two successive tokens of a request
    assert delta["llamawrapper_inter_token_latency_seconds_count"] == sum(n - 1 for n in completions)
    assert server.metric("llamawrapper_num_requests_running", model="tiny") == 0
    assert 0 <= server.metric("llamawrapper_kv_cache_usage_perc", model="tiny") <= 1
    assert server.metric("llamawrapper_prefix_cache_queries_total", model="tiny") > 0


def test_traces_endpoint_resolution(monkeypatch):
    from llamawrapper.server.tracing import traces_endpoint

    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert traces_endpoint(None) is None
    assert traces_endpoint("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_endpoint("http://collector:4318/v1/traces") == "http://collector:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318/")
    assert traces_endpoint(None) == "http://otel:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4318/custom")
    assert traces_endpoint(None) == "http://traces:4318/custom"
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert traces_endpoint("http://collector:4318") is None
