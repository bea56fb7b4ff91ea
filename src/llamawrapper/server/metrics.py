"""Prometheus metrics of one server, named after vLLM's where vLLM has one (under the
``llamawrapper_`` prefix instead of ``vllm:``), so dashboards written for one read the other:

- per request, from the engine's timings in ``handle.metrics``: ``time_to_first_token_seconds``,
  ``inter_token_latency_seconds`` (every gap between two tokens), ``e2e_request_latency_seconds``,
  ``request_queue_time_seconds``, ``request_prefill_time_seconds``, ``request_decode_time_seconds``,
  ``request_prompt_tokens`` / ``request_generation_tokens`` histograms, the ``prompt_tokens`` and
  ``generation_tokens`` counters and ``request_success`` by finish reason;
- engine gauges and counters read from ``Engine.snapshot()`` at scrape time: requests running
  and waiting, KV-cache use (tokens held against ``max_tokens_in_flight``, bytes), prefix-cache
  use, queries and hits (in tokens, as vLLM counts them);
- HTTP requests by route and status, and their duration;
- task models (embeddings, classification, images; ``observe_task``): requests by task and
  outcome, inputs (texts or images), latency, and the micro-batcher's batch sizes
  (``batch_observer``, fed from the executor thread after every batched forward).

Every per-model series takes its label values from ``model_labels`` (one place to add a label,
such as the model version). Each app owns its own ``CollectorRegistry`` (no module globals), so
several apps can live in one process (tests) without clashing names."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

MODEL_LABELS = ["model", "version"]
TASK_LABELS = MODEL_LABELS + ["task"]  # task: embed, classify, zero-shot, images (what the endpoint asked)


def model_labels(model: str, version: str = "") -> list[str]:
    """Label values (in ``MODEL_LABELS`` order) of every per-model series: the served name and
    the version that answered (``v1``, ``v2``, ...)."""
    return [model, version]


# (snapshot key, metric name, help); a value that is a function computes from the snapshot
_ENGINE_GAUGES: list[tuple[Any, str, str]] = [
    ("running", "llamawrapper_num_requests_running", "Requests in the engine's decode batch (vLLM's name)."),
    ("running", "llamawrapper_running_batch_size", "Sequences in the engine's decode batch."),
    ("queue_depth", "llamawrapper_num_requests_waiting", "Requests waiting for a slot in the engine (vLLM's name)."),
    ("queue_depth", "llamawrapper_queue_depth", "Requests waiting for a slot in the engine."),
    ("prefilling", "llamawrapper_prefilling_requests", "Requests whose prompt is being prefilled."),
    (lambda s: s.get("kv_tokens", 0) / max(s.get("max_tokens_in_flight") or 1, 1), "llamawrapper_kv_cache_usage_perc",
     "KV-cache use: tokens held by running and prefilling requests over max_tokens_in_flight (0-1)."),
    ("slot_cache_bytes", "llamawrapper_kv_cache_bytes", "Bytes allocated for the decode batch's KV cache."),
    (lambda s: s.get("prefix_cache_bytes", 0) / max(s.get("prefix_cache_budget_bytes") or 1, 1),
     "llamawrapper_prefix_cache_usage_perc", "Prefix-cache bytes over its budget (0-1)."),
    ("prefix_cache_hit_rate", "llamawrapper_prefix_cache_hit_rate", "Share of prompt tokens served from the prefix cache."),
    ("prefix_cache_bytes", "llamawrapper_prefix_cache_bytes", "Bytes held by the prefix cache."),
]
_ENGINE_COUNTERS: list[tuple[str, str, str]] = [
    ("prefix_cache_lookup_tokens", "llamawrapper_prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hit_tokens", "llamawrapper_prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    ("finished", "llamawrapper_engine_requests_finished", "Requests the engine finished."),
    ("cancelled", "llamawrapper_engine_requests_cancelled", "Requests cancelled before they finished."),
    ("rejected", "llamawrapper_engine_requests_rejected", "Requests refused because the queue was full."),
    ("failed", "llamawrapper_engine_requests_failed", "Requests that failed inside the engine."),
    ("decode_steps", "llamawrapper_engine_decode_steps", "Batched decode steps run."),
    ("prefill_forwards", "llamawrapper_engine_prefill_forwards", "Prefill forwards run (one may carry several requests' prompt chunks)."),
    ("draft_tokens", "llamawrapper_engine_spec_draft_tokens", "Prompt-lookup draft tokens verified (speculative decoding)."),
    ("accepted_draft_tokens", "llamawrapper_engine_spec_accepted_tokens", "Prompt-lookup draft tokens the answers took."),
]


def _value(key: Any, snap: dict) -> float:
    return float((key(snap) if callable(key) else snap.get(key, 0)) or 0)


class _EngineCollector:
    def __init__(self, engines: Callable[[], Iterable[tuple[str, object]]]) -> None:
        self._engines = engines

    def collect(self):
        gauges = [(k, GaugeMetricFamily(n, h, labels=MODEL_LABELS)) for k, n, h in _ENGINE_GAUGES]
        counters = [(k, CounterMetricFamily(n, h, labels=MODEL_LABELS)) for k, n, h in _ENGINE_COUNTERS]
        for name, version, engine in self._engines():
            snap = engine.snapshot()
            for key, family in gauges + counters:
                family.add_metric(model_labels(name, version), _value(key, snap))
        for _, family in gauges + counters:
            yield family


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

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"llamawrapper_{name}", doc, MODEL_LABELS, buckets=buckets, registry=r)

        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival in the engine to the first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between two successive tokens of one request.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival in the engine to the last token.", LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Time a request waited before the engine admitted it.",
                                    LATENCY_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds", "Time from admission to the first token (prefill).",
                                      LATENCY_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", "Time from the first token to the last (decode).",
                                     LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("request_generation_tokens", "Generated tokens per request.", TOKEN_BUCKETS)
        self.prompt_tokens = Counter("llamawrapper_prompt_tokens", "Prompt tokens processed.", MODEL_LABELS, registry=r)
        self.generation_tokens = Counter("llamawrapper_generation_tokens", "Tokens generated.", MODEL_LABELS, registry=r)
        self.success = Counter("llamawrapper_request_success", "Requests finished, by finish reason.",
                               MODEL_LABELS + ["finished_reason"], registry=r)
        self.response_cache = Counter("llamawrapper_response_cache_requests", "Response-cache lookups by result (hit, miss).",
                                      MODEL_LABELS + ["result"], registry=r)
        self.task_requests = Counter("llamawrapper_task_requests", "Task-model requests by task and outcome (ok, error).",
                                     TASK_LABELS + ["outcome"], registry=r)
        self.task_inputs = Counter("llamawrapper_task_inputs", "Texts embedded or classified, images generated.",
                                   TASK_LABELS, registry=r)
        self.task_latency = Histogram("llamawrapper_task_request_latency_seconds",
                                      "Time from a task request's arrival at its model to its answer.", TASK_LABELS,
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.task_batch_size = histogram("task_batch_size", "Inputs per batched forward of a task model's micro-batcher.",
                                         BATCH_BUCKETS)
        r.register(_EngineCollector(engines))

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_request(self, model: tuple[str, str], timings: dict[str, Any], prompt_tokens: int, generation_tokens: int,
                        finish_reason: Optional[str] = None) -> None:
        """One finished generation: its token counts and the timings the engine recorded in
        ``handle.metrics`` (``queue``, ``ttft``, ``latency``, ``itl``; any may be missing, e.g.
        for a response-cache replay)."""
        labels = model_labels(*model)
        self.prompt_tokens.labels(*labels).inc(prompt_tokens)
        self.generation_tokens.labels(*labels).inc(generation_tokens)
        self.request_prompt_tokens.labels(*labels).observe(prompt_tokens)
        self.request_generation_tokens.labels(*labels).observe(generation_tokens)
        if finish_reason:
            self.success.labels(*labels, finish_reason).inc()
        queue, ttft, latency = timings.get("queue"), timings.get("ttft"), timings.get("latency")
        if queue is not None:
            self.queue_time.labels(*labels).observe(queue)
        if ttft is not None:
            self.ttft.labels(*labels).observe(ttft)
            if queue is not None:
                self.prefill_time.labels(*labels).observe(max(ttft - queue, 0.0))
        if latency is not None:
            self.e2e.labels(*labels).observe(latency)
            if ttft is not None:
                self.decode_time.labels(*labels).observe(max(latency - ttft, 0.0))
        itl = self.itl.labels(*labels)
        for gap in timings.get("itl") or ():
            itl.observe(gap)

    def observe_cache(self, model: tuple[str, str], status: str | None) -> None:
        if status in ("hit", "miss"):
            self.response_cache.labels(*model_labels(*model), status).inc()

    def observe_task(self, model: tuple[str, str], task: str, seconds: float, inputs: int, ok: bool = True) -> None:
        """One task request answered (or failed) by ``model`` (served name, version)."""
        labels = model_labels(*model) + [task]
        self.task_requests.labels(*labels, "ok" if ok else "error").inc()
        if ok:
            self.task_inputs.labels(*labels).inc(inputs)
            self.task_latency.labels(*labels).observe(seconds)

    def batch_observer(self, model: tuple[str, str]) -> Callable[[int], None]:
        """What a task model's micro-batcher calls with each forward's batch size."""
        return self.task_batch_size.labels(*model_labels(*model)).observe

    def render(self) -> bytes:
        return generate_latest(self.registry)
