"""Smoke test of the benchmark harness (bench/): the engine path on the tiny random model with a
handful of tokens, checking the JSON's structure. No timing assertions: figures live in bench/."""

from __future__ import annotations

import json
import os
import subprocess
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


@pytest.fixture(scope="module")
def versus_run(tiny_model_dir, tmp_path_factory):
    """``python -m bench.versus --quick`` on the tiny model, with llama.cpp's tools folder empty."""
    from bench.versus import main as versus_main

    out = tmp_path_factory.mktemp("versus")
    empty = tmp_path_factory.mktemp("no-llamacpp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMAWRAPPER_LLAMACPP_DIR", str(empty))
        code = versus_main(["--model", str(tiny_model_dir), "--quick", "--variants", "fp32", "--http-variants", "fp32",
                            "--engine-workloads", "decode,prefill,ttft", "--set", "w1_new_tokens=4", "--set", "prefill_tokens=64",
                            "--set", "ttft_repeats=1", "--set", "warmup=false", "--requests", "2", "--max-tokens", "3",
                            "--out", str(out)])
    assert code == 0
    return json.loads((out / "versus-latest.json").read_text()), out


def test_versus_writes_json_table_and_plot(versus_run):
    doc, out = versus_run
    for key in ("command", "machine", "versions", "settings", "llamacpp", "engine", "http", "ratios", "duration_s"):
        assert key in doc
    assert isinstance(doc["machine"]["cpu_flags"], list)
    table = (out / "versus-latest.md").read_text()
    assert table.startswith("Machine: ") and "CPU flags" in table and "| ratio (issue 14) |" in table
    assert (out / "versus-latest.png").read_bytes()[:4] == b"\x89PNG"
    fp32 = doc["engine"]["fp32"]
    assert fp32["status"] == "ok"
    w = fp32["workloads"]
    assert w["decode"]["new_tokens"] == 4 and w["decode"]["decode_tokens_per_s"] > 0
    assert w["prefill"]["prompt_tokens"] == 64 and w["prefill"]["tokens_per_s"] > 0
    assert 0 < w["ttft"]["cached_over_uncached"]
    mine = doc["http"]["systems"]["llamawrapper-fp32"]
    assert mine["status"] == "ok"
    for wave in ("cold", "warm"):  # logit_bias on EOS: every answer has exactly max_tokens tokens
        assert mine[wave]["all_max_tokens"] and mine[wave]["tokens_per_s"] > 0
        assert mine[wave]["tokens_per_server_cpu_s"] > 0  # the server process's own CPU time
    names = {r["name"] for r in doc["ratios"]}
    assert "W1 int4 / llama.cpp tg128" in names and "TTFT cached ~300-token prefix / uncached, fp32" in names


def test_a_baseline_library_is_imported_first_and_builds_its_kernels_apart(tmp_path):
    """``--baseline REF``'s library (in process and for ``+baseline`` servers): an older commit's
    ``src`` comes before this checkout's installed one, and its kernels get a build folder of their
    own (one shared with this checkout's would be rebuilt each time the two took turns)."""
    from bench.run import ROOT, library_env
    from bench.versus import baseline_source
    from bench.versus import main as versus_main

    src = baseline_source("HEAD", tmp_path)
    env = library_env(src)
    assert env["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "extensions")
    where = subprocess.run([sys.executable, "-c", "import llamawrapper; print(llamawrapper.__file__)"], cwd=ROOT,
                           env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(src / "llamawrapper" / "__init__.py")
    with pytest.raises(SystemExit, match="needs --baseline"):
        versus_main(["--http-variants", "fp32+baseline", "--stages", "http", "--out", str(tmp_path / "out")])


def test_versus_reports_llamacpp_unavailable_not_faked(versus_run):
    doc, _ = versus_run
    assert doc["llamacpp"]["status"] == "unavailable" and "not built" in doc["llamacpp"]["reason"]
    assert "tg" not in doc["llamacpp"] and "pp" not in doc["llamacpp"]
    server = doc["http"]["systems"]["llama-server"]
    assert server["status"] == "unavailable" and not server["rounds"]
    peer_rows = [r for r in doc["ratios"] if "llama.cpp" in r["name"] or "llama-server" in r["name"]]
    assert peer_rows and all(r["value"] is None and r["met"] is None for r in peer_rows)


def test_llamacpp_helpers_without_binaries(tmp_path, monkeypatch):
    from bench import llamacpp

    monkeypatch.setenv("LLAMAWRAPPER_LLAMACPP_DIR", str(tmp_path))
    ok, why = llamacpp.available()
    assert not ok and "python -m bench.llamacpp build" in why
    with pytest.raises(llamacpp.LlamaCppUnavailable):
        llamacpp.binaries()
    assert llamacpp.main(["status"]) == 1


def test_llamacpp_build_names_missing_toolchain(tmp_path, monkeypatch):
    """Without cmake or compilers on PATH the build stops at once with a clear error (no download)."""
    from bench import llamacpp

    monkeypatch.setenv("LLAMAWRAPPER_LLAMACPP_DIR", str(tmp_path / "tools"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(llamacpp.LlamaCppUnavailable, match="cmake"):
        llamacpp.build()
    assert not (tmp_path / "tools" / "downloads").exists()


def test_kernels_bench_measures_each_kernel_against_its_reference(tmp_path):
    """``python -m bench.kernels`` (docs/BENCHMARKS.md section 20) runs each kernel beside the one it
    replaces and writes a figure for every kind and row count (or says by name that the kernels
    cannot run here)."""
    from llamawrapper.engine import kernels

    out = tmp_path / "kernels.json"
    run = subprocess.run([sys.executable, "-m", "bench.kernels", "--layers", "1", "--rows", "1,5", "--rounds", "1",
                          "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"})
    if kernels.int4_rows_mm() is None:
        assert run.returncode != 0 and "AVX512-BF16" in run.stderr + run.stdout
        return
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert set(doc["kinds"]) == {"int4", "int8", "bf16", "f32"}
    for kind in doc["kinds"].values():
        assert set(kind) == {"1", "5"}
        assert all(r["reference_us"] > 0 and r["kernel_us"] > 0 for r in kind.values())
    assert "| int4 (torch int4) | 1 |" in run.stdout
    run = subprocess.run([sys.executable, "-m", "bench.kernels", "--calls", "--kinds", "int4,f32", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"})
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.read_text())["calls"]
    assert set(doc) == {"int4", "f32"} and all(r["module_us"] > 0 and r["operator_us"] > 0 for r in doc.values())
    # the attention kernel alone over a prompt of 300 tokens (two chunks of the engine's 256)
    run = subprocess.run([sys.executable, "-m", "bench.kernels", "--attention", "300", "--rounds", "1", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"})
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.read_text())["attention"]
    assert doc["tokens"] == 300 and doc["dtype"] == "float32" and doc["ms"] > 0 and doc["gflop_s"] > 0
    assert f"prefill attention, 300 tokens (float32, 2 threads): {doc['ms']} ms" in run.stdout


def test_w1_ratios_to_llamacpp_use_the_tg_measured_beside_each_engine_variant():
    """A variant's W1 ratio to llama.cpp is against the mean of the tg measured just before and just
    after its process (the table lists them); a variant without such figures (none taken, or
    both failed) falls back to the run's start and end measurements."""
    from bench.versus import markdown, ratios

    def tg(ts: float, cpu: float) -> dict:
        return {"status": "ok", "test": "tg128", "tokens_per_s": ts, "tokens_per_cpu_s": cpu, "loadavg_before": [1.0, 1, 1],
                "loadavg_after": [1.5, 1, 1]}

    def engine(decode: float) -> dict:
        return {"status": "ok", "workloads": {"decode": {"decode_tokens_per_s": decode, "cpu_s": 2.0, "repeats": [{"tokens": 128}]}}}

    doc = {"llamacpp": {"status": "ok", "tg": tg(120.0, 60.0), "tg_end": tg(110.0, 50.0), "pp": {"tokens_per_s": 250.0},
                        "tg_beside": {"int4": [tg(80.0, 40.0), tg(100.0, 50.0)],
                                      "int4c": [{"status": "error", "reason": "x"}, {"status": "error", "reason": "y"}]}},
           "engine": {"int4": engine(135.0), "int4c": engine(138.0), "fp32": engine(46.0)}}
    rows = {r["name"]: r for r in ratios(doc)}
    assert rows["W1 int4 / llama.cpp tg128"]["value"] == pytest.approx(135.0 / 90.0)
    assert rows["W1 int4 / llama.cpp tg128"]["cpu_time_value"] == pytest.approx((128 / 2.0) / 45.0)
    assert rows["W1 fp32 / llama.cpp tg128"]["value"] == pytest.approx(46.0 / 115.0)
    assert rows["W1 int4 compiled (int4c) / llama.cpp tg128"]["value"] == pytest.approx(138.0 / 115.0)  # both failed
    doc.update(machine={"cpu_model": "x", "nproc": 2, "cpu_flags": []}, model="m", threads=2,
               settings={"w1_new_tokens": 128, "prefill_tokens": 1000}, ratios=list(rows.values()))
    assert "| llama.cpp tg just before / after engine int4 | 80.0 / 100.0 |" in markdown(doc)


@pytest.mark.slow
def test_levers_split_says_where_a_prefill_goes(tmp_path):
    """``python -m bench.levers --split fp32`` (docs/BENCHMARKS.md section 24) prefills smollm2 with
    timers around the runner's parts: each part took time, the parts and ``other`` add up to the
    forwards, and the forwards fit in the time to the first token."""
    out = tmp_path / "split.json"
    run = subprocess.run([sys.executable, "-m", "bench.levers", "--split", "fp32", "--prefill-tokens", "300", "--rounds", "1",
                          "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"})
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["prompt_tokens"] == 300 and len(doc["rounds"]) == 1
    r = doc["rounds"][0]
    parts = ("qkv", "o", "gate_up", "down", "attention", "add_norm")
    assert all(r[p] > 0 for p in parts) and r["other"] >= 0
    assert abs(sum(r[p] for p in parts) + r["other"] - r["forward"]) < 1e-6 * r["forward"] + 1e-9
    assert r["forward"] <= r["ttft"]
    assert "fp32, 300-token prefill, ms (median of 1): ttft" in run.stderr
