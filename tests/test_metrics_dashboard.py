"""The server's metrics without a server: what one finished request adds to each vLLM-named
histogram, engine gauges from a snapshot, and the Grafana dashboard in docs/ querying only
series the server really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamawrapper.server.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"


class FakeEngine:
    """Only what the metrics read: ``snapshot()``."""

    def snapshot(self) -> dict:
        return {"queue_depth": 2, "running": 3, "prefilling": 1, "kv_tokens": 512, "max_tokens_in_flight": 2048,
                "slot_cache_bytes": 4096, "prefix_cache_bytes": 256, "prefix_cache_budget_bytes": 1024,
                "prefix_cache_hit_rate": 0.25, "prefix_cache_hit_tokens": 10, "prefix_cache_lookup_tokens": 40,
                "finished": 7, "cancelled": 1, "rejected": 0, "failed": 0, "decode_steps": 99}


@pytest.fixture
def samples() -> dict:
    m = Metrics(lambda: [("m", "v1", FakeEngine())])
    m.observe_request(("m", "v1"), {"queue": 0.01, "ttft": 0.1, "latency": 0.5, "itl": [0.02, 0.03, 0.04]}, 5, 4, "stop")
    m.observe_request(("m", "v1"), {}, 3, 1, "length")  # a response-cache replay has no engine timings
    m.observe_http("/v1/chat/completions", "POST", 200, 0.6)
    text = m.render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def test_one_request_feeds_every_latency_histogram(samples):
    m = {"model": "m"}
    assert value(samples, "llamawrapper_request_queue_time_seconds_sum", **m) == pytest.approx(0.01)
    assert value(samples, "llamawrapper_time_to_first_token_seconds_sum", **m) == pytest.approx(0.1)
    assert value(samples, "llamawrapper_request_prefill_time_seconds_sum", **m) == pytest.approx(0.09)
    assert value(samples, "llamawrapper_request_decode_time_seconds_sum", **m) == pytest.approx(0.4)
    assert value(samples, "llamawrapper_e2e_request_latency_seconds_count", **m) == 1
    assert value(samples, "llamawrapper_inter_token_latency_seconds_count", **m) == 3
    assert value(samples, "llamawrapper_inter_token_latency_seconds_sum", **m) == pytest.approx(0.09)
    assert value(samples, "llamawrapper_prompt_tokens_total", **m) == 8
    assert value(samples, "llamawrapper_prompt_tokens_total", model="m", version="v1") == 8  # per model and version
    assert value(samples, "llamawrapper_generation_tokens_total", **m) == 5
    assert value(samples, "llamawrapper_request_generation_tokens_count", **m) == 2
    assert value(samples, "llamawrapper_request_success_total", model="m", finished_reason="stop") == 1
    assert value(samples, "llamawrapper_request_success_total", model="m", finished_reason="length") == 1


def test_engine_gauges_follow_the_snapshot(samples):
    assert value(samples, "llamawrapper_num_requests_running", model="m") == 3
    assert value(samples, "llamawrapper_num_requests_waiting", model="m") == 2
    assert value(samples, "llamawrapper_kv_cache_usage_perc", model="m") == pytest.approx(0.25)
    assert value(samples, "llamawrapper_prefix_cache_usage_perc", model="m") == pytest.approx(0.25)
    assert value(samples, "llamawrapper_prefix_cache_queries_total", model="m") == 40
    assert value(samples, "llamawrapper_prefix_cache_hits_total", model="m") == 10


def test_dashboard_queries_only_exported_series(samples):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"llamawrapper_\w+", e)}
    exported = {n for n, _ in samples}
    assert used and used <= exported, sorted(used - exported)
    exported_bases = {re.sub(r"_(bucket|sum|count|total|created)$", "", n) for n in exported if n.startswith("llamawrapper_")}
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                      "request_queue_time_seconds"):
        assert f"llamawrapper_{histogram}" in exported_bases
        assert any(f"llamawrapper_{histogram}_bucket" in e for e in exprs), histogram
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "model"}
