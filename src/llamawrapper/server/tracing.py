"""OpenTelemetry traces of the HTTP server, exported over OTLP/HTTP.

On when ``--otlp-endpoint`` (``LLAMAWRAPPER_OTLP_ENDPOINT``) or the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (and
``OTEL_SDK_DISABLED`` is not ``true``); off, nothing of OpenTelemetry's SDK is imported.

- ``TracingMiddleware`` opens one SERVER span per ``/v1/...`` request, as a child of the incoming
  W3C ``traceparent`` when there is one, and ends it when the last byte is sent (a stream's
  too), with the HTTP status; 5xx marks it as an error.
- Generation routes describe it with the GenAI semantic conventions (``start_generation``,
  ``finish_generation``): ``gen_ai.operation.name``, ``gen_ai.request.*``, ``gen_ai.response.id``,
  ``gen_ai.response.finish_reasons``, ``gen_ai.usage.*``; the model version and API key id
  (from the key layer's ``principal`` in the request state) as ``llamawrapper.*`` attributes;
  per choice, child spans ``queue``, ``prefill`` and ``decode`` placed by the engine's timings,
  and a ``first_token`` event. Prompt text is recorded (``gen_ai.input.messages``) only when
  ``log_content`` is on.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional, Sequence

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TRACED_PREFIX = "/v1/"


def traces_endpoint(configured: Optional[str] = None) -> Optional[str]:
    """The OTLP/HTTP traces URL (``.../v1/traces``), or None when tracing is off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if configured:
        base = configured.rstrip("/")
        return base if base.endswith("/v1/traces") else base + "/v1/traces"
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return base.rstrip("/") + "/v1/traces" if base else None


class Tracing:
    """A tracer provider of this app (not the process-global one) exporting to ``endpoint`` in
    batches (or to ``exporter``, span by span: tests and embedding)."""

    def __init__(self, endpoint: Optional[str], log_content: bool = False, exporter: Any = None) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from .. import __version__

        self.endpoint = endpoint
        self.log_content = log_content
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "llamawrapper"),
                                    "service.version": __version__})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(SimpleSpanProcessor(exporter) if exporter is not None
                                         else BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("llamawrapper.server", __version__)
        self.propagator = TraceContextTextMapPropagator()

    def shutdown(self) -> None:
        """Export what is left and stop (the app's lifespan calls it on shutdown)."""
        self.provider.shutdown()


def from_settings(settings: Any, log_content: Optional[bool] = None) -> Optional[Tracing]:
    """The app's tracing, or None when no endpoint is configured. ``log_content`` (prompt text in
    spans) defaults to the settings' own ``log_content`` field when they have one."""
    endpoint = traces_endpoint(getattr(settings, "otlp_endpoint", None))
    if log_content is None:
        log_content = bool(getattr(settings, "log_content", False))
    return Tracing(endpoint, log_content=log_content) if endpoint else None


def _key_id(state: dict) -> Optional[str]:
    """The API key's id: the key layer's ``principal`` (or a plain ``key_id``) in the request state."""
    key_id = getattr(state.get("principal"), "key_id", None) or state.get("key_id")
    return str(key_id) if key_id else None


class TracingMiddleware:
    """One span per ``/v1/...`` request; routes reach it through ``request.scope["state"]["span"]``."""

    def __init__(self, app: ASGIApp, tracing: Optional[Tracing]) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.tracing is None or scope["type"] != "http" or not scope["path"].startswith(TRACED_PREFIX):
            await self.app(scope, receive, send)
            return
        from opentelemetry.trace import SpanKind, Status, StatusCode

        t = self.tracing
        parent = t.propagator.extract(carrier={k: v for k, v in Headers(scope=scope).items()})
        span = t.tracer.start_span(f"{scope['method']} {scope['path']}", context=parent, kind=SpanKind.SERVER, attributes={
            "http.request.method": scope["method"], "url.path": scope["path"]})
        scope.setdefault("state", {})["span"] = RequestSpan(t, span)
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            scope["state"]["span"].end_unfinished()
            span.set_attribute("http.response.status_code", status)
            key_id = _key_id(scope.get("state", {}))
            if key_id:
                span.set_attribute("llamawrapper.api_key.id", key_id)
            if status >= 400:
                span.set_attribute("error.type", str(status))
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()


class RequestSpan:
    """The span of one request, as the route handlers describe it."""

    def __init__(self, tracing: Tracing, span: Any) -> None:
        self.tracing, self.span = tracing, span
        self.submitted_ns = time.time_ns()
        self.generating = False  # a generation started and has not finished yet

    def start_generation(self, operation: str, body: Any, version: Optional[str], response_id: str) -> None:
        s = self.span
        s.update_name(f"{operation} {body.model}")
        attrs = {"gen_ai.operation.name": operation, "gen_ai.provider.name": "llamawrapper", "gen_ai.system": "llamawrapper",
                 "gen_ai.request.model": body.model, "gen_ai.response.model": body.model, "gen_ai.response.id": response_id,
                 "gen_ai.request.max_tokens": getattr(body, "max_completion_tokens", None) or getattr(body, "max_tokens", None),
                 "gen_ai.request.temperature": getattr(body, "temperature", None), "gen_ai.request.top_p": getattr(body, "top_p", None),
                 "gen_ai.request.seed": getattr(body, "seed", None), "gen_ai.request.choice.count": getattr(body, "n", None),
                 "llamawrapper.model.version": version, "llamawrapper.stream": bool(getattr(body, "stream", False))}
        for key, value in attrs.items():
            if value is not None:
                s.set_attribute(key, value)
        if self.tracing.log_content:
            s.set_attribute("gen_ai.input.messages", json.dumps(_prompt_of(body), ensure_ascii=False))
        self.submitted_ns = time.time_ns()
        self.generating = True

    def finish_generation(self, handles: Sequence[Any], usages: Sequence[Any], reasons: Sequence[Optional[str]]) -> None:
        s = self.span
        self.generating = False
        s.set_attribute("gen_ai.response.finish_reasons", [r for r in reasons if r])
        if usages:
            s.set_attribute("gen_ai.usage.input_tokens", int(usages[0].prompt_tokens))
            s.set_attribute("gen_ai.usage.output_tokens", int(sum(u.completion_tokens for u in usages)))
        for index, handle in enumerate(handles):
            self._phases(index, dict(handle.metrics))

    def end_unfinished(self) -> None:
        """A generation that never finished (client gone, error mid-stream) is marked cancelled."""
        if self.generating:
            self.generating = False
            self.span.set_attribute("gen_ai.response.finish_reasons", ["cancelled"])

    def _phases(self, index: int, timings: dict) -> None:
        """Child spans queue -> prefill -> decode of one choice, from the engine's timings."""
        from opentelemetry import trace

        queue, ttft, latency = timings.get("queue"), timings.get("ttft"), timings.get("latency")
        start = int(timings.get("start_unix", self.submitted_ns / 1e9) * 1e9)

        def at(seconds: float) -> int:
            return start + int(seconds * 1e9)

        ctx = trace.set_span_in_context(self.span)
        attrs = {"gen_ai.choice.index": index}
        marks = [("queue", 0.0, queue), ("prefill", queue, ttft), ("decode", ttft, latency)]
        for name, begin, end in marks:
            if begin is not None and end is not None:
                child = self.tracing.tracer.start_span(name, context=ctx, start_time=at(begin), attributes=attrs)
                child.end(end_time=at(max(end, begin)))
        if ttft is not None:
            self.span.add_event("first_token", {**attrs, "gen_ai.server.time_to_first_token": ttft}, timestamp=at(ttft))
            if index == 0:
                self.span.set_attribute("gen_ai.server.time_to_first_token", ttft)
        if queue is not None and index == 0:
            self.span.set_attribute("llamawrapper.request.queue_time", queue)


def _prompt_of(body: Any) -> Any:
    if hasattr(body, "message_dicts"):
        return body.message_dicts()
    return getattr(body, "prompt", None)


def span_of(request: Any) -> Optional[RequestSpan]:
    """The request's span, or None when tracing is off."""
    return request.scope.get("state", {}).get("span")
