"""Smoke test of ``bench/simulate.py`` (the 1-64 replica queueing model): a single-replica
profile measured on the tiny random model, then a small simulation read back through the CLI.
Checks structure and sanity (more replicas carry more load, p99 >= p50, prefix routing keeps
more prompts cached than round robin), never a time."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def profile(tiny_model_dir):
    from bench.simulate import measure

    return measure(str(tiny_model_dir), threads=1, max_batch=2, new_tokens=3, prompt_tokens=40)


def test_profile_is_measured_per_batch_size(profile):
    assert profile["batch_sizes"] == [1, 2]
    assert len(profile["step_s"]) == 2 and all(s > 0 and math.isfinite(s) for s in profile["step_s"])
    assert profile["prefill_s_per_token"] > 0


def test_simulation_through_the_cli(profile, tmp_path):
    from bench.simulate import POLICIES, main

    (tmp_path / "in.json").write_text(json.dumps({"profile": profile}))
    out = tmp_path / "out.json"
    assert main(["--profile", str(tmp_path / "in.json"), "--max-batch", "2", "--replicas", "1,4", "--loads", "0.5,1.2",
                 "--requests-per-replica", "60", "--min-requests", "200", "--new-tokens", "4", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["profile"] == profile and doc["workload"]["new_tokens"] == 4 and doc["replica_capacity_rps"] > 0
    rows = {(r["replicas"], r["load"], r["policy"]): r for r in doc["rows"]}
    assert set(rows) == {(n, load, p) for n in (1, 4) for load in (0.5, 1.2) for p in POLICIES}
    for r in rows.values():
        assert r["throughput_rps"] > 0 and r["latency_p99_s"] >= r["latency_p50_s"] > 0
        assert r["ttft_p99_s"] <= r["latency_p99_s"] and 0 <= r["prefix_hit_rate"] <= 1
    for load in (0.5, 1.2):
        one = [rows[(1, load, p)] for p in POLICIES]
        assert all({k: v for k, v in r.items() if k != "policy"} == {k: v for k, v in one[0].items() if k != "policy"}
                   for r in one)  # one replica: the policy cannot matter
        for p in POLICIES:
            assert rows[(4, load, p)]["throughput_rps"] > 2 * rows[(1, load, p)]["throughput_rps"]
    for load in (0.5, 1.2):  # 32 prompts, 4 held per replica: affinity keeps each replica's share cached
        assert rows[(4, load, "prefix")]["prefix_hit_rate"] > rows[(4, load, "round_robin")]["prefix_hit_rate"]
    # past capacity the queue grows: latency above the half-loaded run's
    assert rows[(4, 1.2, "round_robin")]["latency_p99_s"] > rows[(4, 0.5, "round_robin")]["latency_p99_s"]
