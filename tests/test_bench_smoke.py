"""Smoke test of the benchmark harness (bench/): the engine path on the tiny random model with a
handful of tokens, checking the JSON's structure. No timing assertions: figures live in bench/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = ["--set", "w1_new_tokens=3", "--set", "w2_requests=2", "--set", "w2_new_tokens=3", "--set", "sweep=1,2",
        "--set", "w3_turns=2", "--set", "w3_new_tokens=3", "--set", "ttft_repeats=1", "--set", "rss_requests=8",
        "--set", "rss_wave=4", "--set", "rss_new_tokens=2", "--set", "warmup=false"]


@pytest.fixture(scope="module")
def bench_doc(tiny_model_dir, tmp_path_factory):
    from bench.run import main

    out = tmp_path_factory.mktemp("bench")
    code = main(["--model", str(tiny_model_dir), "--systems", "engine", "--quick", "--out", str(out), *TINY])
    assert code == 0
    return json.loads((out / "latest.json").read_text()), out


def test_document_structure(bench_doc):
    doc, out = bench_doc
    for key in ("command", "machine", "versions", "settings", "systems", "ratios", "notes", "duration_s"):
        assert key in doc
    assert doc["machine"]["nproc"] >= 1
    assert (out / "latest.md").read_text().startswith("| system |")
    assert {r["name"] for r in doc["ratios"]} >= {"W2 engine / one generate per request", "W1 engine / generate"}


def test_engine_workloads(bench_doc):
    doc, _ = bench_doc
    engine = doc["systems"]["engine"]
    assert engine["status"] == "ok"
    w = engine["workloads"]
    assert set(w) == {"w1", "w2", "sweep", "w3", "prefix", "rss"}
    assert w["w1"]["new_tokens_total"] == 3 and len(w["w1"]["token_ids"]) == 3
    assert w["w2"]["requests"] == 2 and w["w2"]["new_tokens_total"] == 6
    for key in ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "latency_p50_s", "latency_p99_s", "peak_rss_mb", "cpu_s"):
        assert w["w2"][key] is not None
    assert [p["concurrency"] for p in w["sweep"]["points"]] == [1, 2]
    assert w["sweep"]["points"][1].get("reused") == "w2"
    assert [t["turn"] for t in w["w3"]["turns"]] == [1, 2]
    assert w["w3"]["turns"][1]["prompt_tokens"] > w["w3"]["turns"][0]["prompt_tokens"]
    prefix = w["prefix"]
    assert prefix["cache_peak_bytes"] <= prefix["cache_budget_bytes"]
    assert prefix["w2_staggered"]["requests"] == 2
    assert w["rss"]["requests"] == 8 and len(w["rss"]["series"]) == 2 and isinstance(w["rss"]["flat"], bool)


def test_unsupported_load_option_is_reported_unavailable(tiny_model_dir):
    from bench.systems import Unavailable, build
    from bench.workloads import BenchSettings

    with pytest.raises(Unavailable, match="no_such_option"):
        build("engine:no_such_option=1", str(tiny_model_dir), tiny_model_dir, None, 1, BenchSettings())


def test_serial_peer_extrapolation_is_flagged():
    from bench.metrics import now
    from bench.systems import serve_serially

    def one(ids, n):
        return now(), now(), [0] * n

    records, outputs, wall = serve_serially([[1, 2]] * 5, 4, one, max_requests=2, time_budget_s=1e9)
    assert [r.measured for r in records] == [True, True, False, False, False]
    assert len(outputs) == 2 and all(r.new_tokens == 4 for r in records)


def test_host_bench_runs_on_the_tiny_model(tiny_model_dir, tmp_path):
    """bench/host.py end to end on the tiny model: every condition measured, ratios written."""
    from bench.host import main as host_main

    assert host_main(["--model", str(tiny_model_dir), "--tokens", "6", "--reps", "1", "--quant", "none",
                      "--skip-processes", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "host.json").read_text())
    r = doc["results"]
    assert len(r["alone_tps"]) == 2 and all(x > 0 for x in r["alone_tps"] + r["beside_two_idle_tps"])
    assert r["swap"]["put_to_serving_s"] > 0 and r["swap"]["v2_tokens_after"] > 0
    assert r["load_while_serving"]["loaded"] and r["load_while_serving"]["load_s"] > 0
    names = {row["name"] for row in doc["ratios"]}
    assert "two busy, aggregate / one alone" in names and (tmp_path / "host.png").is_file()
    assert doc["machine"]["cpu_flags"] is not None
