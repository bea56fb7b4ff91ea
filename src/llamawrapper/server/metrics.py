"""Prometheus metrics of one server: HTTP requests by route and status, latency and
time-to-first-token histograms, tokens in and out, and engine gauges (queue depth, running
batch size, prefix-cache hit rate) read from ``Engine.snapshot()`` at scrape time.

Each app owns its own ``CollectorRegistry`` (no module globals), so several apps can live in
one process (tests) without clashing names."""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)

# snapshot key -> (metric name, help); gauges are sampled, counters only ever grow
_ENGINE_GAUGES = {
    "queue_depth": ("llamawrapper_queue_depth", "Requests waiting for a slot in the engine."),
    "running": ("llamawrapper_running_batch_size", "Sequences in the engine's decode batch."),
    "prefilling": ("llamawrapper_prefilling_requests", "Requests whose prompt is being prefilled."),
    "prefix_cache_hit_rate": ("llamawrapper_prefix_cache_hit_rate", "Share of prompt tokens served from the prefix cache."),
    "prefix_cache_bytes": ("llamawrapper_prefix_cache_bytes", "Bytes held by the prefix cache."),
}
_ENGINE_COUNTERS = {
    "finished": ("llamawrapper_engine_requests_finished", "Requests the engine finished."),
    "cancelled": ("llamawrapper_engine_requests_cancelled", "Requests cancelled before they finished."),
    "rejected": ("llamawrapper_engine_requests_rejected", "Requests refused because the queue was full."),
    "failed": ("llamawrapper_engine_requests_failed", "Requests that failed inside the engine."),
    "decode_steps": ("llamawrapper_engine_decode_steps", "Batched decode steps run."),
}


class _EngineCollector:
    def __init__(self, engines: Callable[[], Iterable[tuple[str, object]]]) -> None:
        self._engines = engines

    def collect(self):
        gauges = {k: GaugeMetricFamily(n, h, labels=["model"]) for k, (n, h) in _ENGINE_GAUGES.items()}
        counters = {k: CounterMetricFamily(n, h, labels=["model"]) for k, (n, h) in _ENGINE_COUNTERS.items()}
        for name, engine in self._engines():
            snap = engine.snapshot()
            for key, family in gauges.items():
                family.add_metric([name], float(snap.get(key, 0) or 0))
            for key, family in counters.items():
                family.add_metric([name], float(snap.get(key, 0) or 0))
        yield from gauges.values()
        yield from counters.values()


class Metrics:
    """The server's metrics; ``render()`` gives the Prometheus text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engines: Callable[[], Iterable[tuple[str, object]]]) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llamawrapper_http_requests", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("llamawrapper_http_request_duration_seconds", "Time from request to last byte.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("llamawrapper_http_requests_in_flight", "HTTP requests being served.", registry=r)
        self.ttft = Histogram("llamawrapper_time_to_first_token_seconds", "Time from admission request to first token.",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llamawrapper_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.completion_tokens = Counter("llamawrapper_completion_tokens", "Tokens generated.", ["model"], registry=r)
        self.response_cache = Counter("llamawrapper_response_cache_requests", "Response-cache lookups by result (hit, miss).",
                                      ["model", "result"], registry=r)
        r.register(_EngineCollector(engines))

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_generation(self, model: str, prompt_tokens: int, completion_tokens: int, ttft: float | None) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.completion_tokens.labels(model).inc(completion_tokens)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)

    def observe_cache(self, model: str, status: str | None) -> None:
        if status in ("hit", "miss"):
            self.response_cache.labels(model, status).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
