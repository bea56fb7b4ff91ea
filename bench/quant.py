"""Quantization benchmark: fp32 vs int8 vs int4 (and llama.cpp on the same GGUF when
``llama_cpp`` is importable), side by side in one run.

Per variant, each in its own subprocess (so resident memory is that variant's alone):
resident memory after load, W1 single-stream greedy decode speed (median of repeats), and W2
(16 concurrent chats sharing a system prompt) aggregate tokens/s through the engine. Variants run
in interleaved rounds and medians are reported, because the machine is shared and noisy.
Optionally ``--profile`` records where one int8/int4 decode step spends its time.

    python -m bench.quant                       # writes bench/results/quant.json and quant.png
    python -m bench.quant --rounds 1 --w2-requests 4 --w2-tokens 8   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
VARIANTS = ("fp32", "int8", "int4")


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e6


# -- worker (one variant, one process) -------------------------------------------------------------
def worker(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    base_rss = rss_mb()
    import torch

    torch.set_num_threads(args.threads)
    if variant == "llama.cpp":
        return llama_cpp_worker(args, base_rss)
    import transformers  # noqa: F401  (import everything loading needs before measuring the baseline)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from llamawrapper import LlamaWrapper
    from llamawrapper.models import adapters, quantization  # noqa: F401
    from llamawrapper.types import SamplingParams

    from bench.workloads import w1_prompt, w2_prompts

    import_rss = rss_mb()
    t = time.perf_counter()
    llm = LlamaWrapper.load("smollm2", quantization=None if variant == "fp32" else variant, progress=False,
                            engine={"threads": args.threads})
    load_s = time.perf_counter() - t
    out: dict[str, Any] = {"variant": variant, "rss_start_mb": base_rss, "rss_after_import_mb": import_rss,
                           "rss_after_load_cold_mb": rss_mb(), "load_s": load_s}
    prompt = w1_prompt(llm.tokenizer)
    params = SamplingParams(max_tokens=args.w1_tokens, temperature=0.0, ignore_eos=True)
    # warm up; this also touches every weight page (transformers maps the safetensors file, so an
    # fp32 model's weights only become resident when first read)
    llm.submit(prompt, SamplingParams(max_tokens=4, temperature=0.0)).result()
    out["rss_after_load_mb"] = rss_mb()
    rates = []
    for _ in range(args.w1_repeats):
        llm.engine.prefix_cache.clear() if hasattr(llm.engine.prefix_cache, "clear") else None
        res = llm.submit(prompt, params).result()
        decode_s = res.metrics["latency"] - res.metrics["ttft"]
        rates.append((res.usage.completion_tokens - 1) / decode_s)
    out["w1_decode_tok_s"] = statistics.median(rates)
    out["w1_runs"] = rates
    if args.profile:
        out["profile"] = profile_decode(llm, prompt)
    if args.w2_requests:
        prompts = w2_prompts(llm.tokenizer, args.w2_requests)
        p2 = SamplingParams(max_tokens=args.w2_tokens, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        handles = [llm.submit(ids, p2) for ids in prompts]
        total = sum(h.result().usage.completion_tokens for h in handles)
        out["w2_tok_s"] = total / (time.perf_counter() - t)
    out["rss_end_mb"] = rss_mb()
    llm.close()
    return out


def profile_decode(llm: Any, prompt: list[int], steps: int = 16) -> list[dict[str, Any]]:
    """Top operators by self CPU time over a short single-stream decode through the runner."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from llamawrapper.engine.kv_cache import SequenceKV

    r = llm.engine.runner
    n = len(prompt)
    kv = SequenceKV(r.n_layers, r.n_kv_heads, r.head_dim, r.dtype, capacity=n + steps + 1)
    r.bind_rows([""])
    mask = torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n)
    logits = r.forward(torch.tensor([prompt]), torch.arange(n)[None], kv.chunk(0, n), mask)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for i in range(steps):
            p = n + i
            token = int(logits[0].argmax())
            logits = r.forward(torch.tensor([[token]]), torch.tensor([[p]]), kv.chunk(p, 1),
                               torch.ones(1, 1, 1, p + 1, dtype=torch.bool))
        wall = time.perf_counter() - t
    rows = [{"op": "wall per step (ms, profiled)", "calls": steps, "self_ms": 1000 * wall / steps}]
    for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]:
        rows.append({"op": e.key, "calls": e.count // steps, "self_ms": e.self_cpu_time_total / 1000 / steps})
    return rows


def llama_cpp_worker(args: argparse.Namespace, base_rss: float) -> dict[str, Any]:
    """llama.cpp on the same GGUF through the benchmark harness's own ``LlamaCppSystem`` (which
    carries the workaround for this build's crash with extra CPU buffer types)."""
    from transformers import AutoTokenizer

    from bench.systems import LlamaCppSystem
    from bench.workloads import w1_prompt
    from llamawrapper.models import loading, registry

    source = registry.resolve("smollm2")
    tok = AutoTokenizer.from_pretrained(loading.resolve_folder(source, progress=False))
    prompt = w1_prompt(tok)
    import_rss = rss_mb()
    t = time.perf_counter()
    system = LlamaCppSystem(source.path, args.threads)
    load_s = time.perf_counter() - t
    system._one(prompt, 4)  # warm up; touches the memory-mapped weights
    out: dict[str, Any] = {"variant": "llama.cpp", "rss_start_mb": base_rss, "rss_after_import_mb": import_rss,
                           "rss_after_load_mb": rss_mb(), "load_s": load_s, "version": system.version}
    rates = []
    for _ in range(args.w1_repeats):
        system.reset()
        first, end, toks = system._one(prompt, args.w1_tokens)
        rates.append((len(toks) - 1) / (end - first))
    out["w1_decode_tok_s"] = statistics.median(rates)
    out["w1_runs"] = rates
    return out


def interleaved_worker(args: argparse.Namespace) -> dict[str, Any]:
    """fp32, int8 and int4 in one process, single-stream decode steps through the runner taken in
    turns (a few steps each, many turns), so every variant sees the same machine load: the
    fairest ratio on a shared machine."""
    import torch

    from bench.workloads import w1_prompt
    from llamawrapper import LlamaWrapper
    from llamawrapper.engine.kv_cache import SequenceKV

    torch.set_num_threads(args.threads)
    llms = {v: LlamaWrapper.load("smollm2", quantization=None if v == "fp32" else v, progress=False) for v in VARIANTS}
    prompt = w1_prompt(llms["fp32"].tokenizer)
    n = len(prompt)
    state = {}
    for v, llm in llms.items():
        r = llm.engine.runner
        kv = SequenceKV(r.n_layers, r.n_kv_heads, r.head_dim, r.dtype, capacity=n + args.w1_tokens * 8 + 8)
        mask = torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n)
        r.bind_rows([""])
        logits = r.forward(torch.tensor([prompt]), torch.arange(n)[None], kv.chunk(0, n), mask)
        state[v] = [r, kv, n, int(logits[0].argmax())]
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    steps_per_turn = 4
    for _ in range(max(1, args.w1_tokens // steps_per_turn) * args.w1_repeats):
        for v in VARIANTS:
            r, kv, p, token = state[v]
            for _ in range(steps_per_turn):
                t = time.perf_counter()
                logits = r.forward(torch.tensor([[token]]), torch.tensor([[p]]), kv.chunk(p, 1),
                                   torch.ones(1, 1, 1, p + 1, dtype=torch.bool))
                token = int(logits[0].argmax())
                times[v].append(time.perf_counter() - t)
                p += 1
            state[v][2:] = [p, token]
    med = {v: statistics.median(ts) * 1000 for v, ts in times.items()}
    for llm in llms.values():
        llm.close()
    return {"variant": "interleaved", "step_ms": med, "steps": {v: len(t) for v, t in times.items()},
            "speedup_vs_fp32": {v: med["fp32"] / med[v] for v in VARIANTS}}


# -- driver ------------------------------------------------------------------------------------------
def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.quant", "--worker", variant, "--threads", str(args.threads),
           "--w1-tokens", str(args.w1_tokens), "--w1-repeats", str(args.w1_repeats),
           "--w2-requests", str(args.w2_requests), "--w2-tokens", str(args.w2_tokens)] + (["--profile"] if args.profile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT.parent)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        return {"variant": variant, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(lines[-1])


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def med(variant: str, key: str) -> float | None:
        vals = [r[key] for r in runs.get(variant, []) if key in r]
        return statistics.median(vals) if vals else None

    summary: dict[str, Any] = {}
    for v in runs:
        summary[v] = {k: med(v, k) for k in ("w1_decode_tok_s", "w2_tok_s", "rss_after_load_mb", "rss_after_import_mb", "load_s")}
    fp32 = summary.get("fp32", {})
    for v, s in summary.items():
        for key in ("w1_decode_tok_s", "w2_tok_s"):
            if s.get(key) and fp32.get(key):
                s[f"{key}_vs_fp32"] = s[key] / fp32[key]
        if s.get("rss_after_load_mb") and fp32.get("rss_after_load_mb"):
            s["rss_vs_fp32"] = s["rss_after_load_mb"] / fp32["rss_after_load_mb"]
            if s.get("rss_after_import_mb") and fp32.get("rss_after_import_mb"):
                s["model_rss_mb"] = s["rss_after_load_mb"] - s["rss_after_import_mb"]
                s["model_rss_vs_fp32"] = s["model_rss_mb"] / (fp32["rss_after_load_mb"] - fp32["rss_after_import_mb"])
    if "llama.cpp" in summary and summary["llama.cpp"].get("w1_decode_tok_s"):
        for v in VARIANTS:
            if summary.get(v, {}).get("w1_decode_tok_s"):
                summary[v]["w1_vs_llama_cpp"] = summary[v]["w1_decode_tok_s"] / summary["llama.cpp"]["w1_decode_tok_s"]
    return summary


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in summary if n != "interleaved_decode"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, title in zip(axes, ("w1_decode_tok_s", "w2_tok_s", "rss_after_load_mb"),
                              ("W1 single-stream decode (tok/s)", "W2 16 chats aggregate (tok/s)", "RSS after load (MB)")):
        vals = [summary[n].get(key) or 0 for n in names]
        ax.bar(names, vals, color=["#888", "#2a7", "#27a", "#a72"][: len(names)])
        ax.set_title(title)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}" if v else "n/a", ha="center", va="bottom")
    fig.suptitle("smollm2 weight-only quantization (medians, one run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--variants", default=",".join(VARIANTS) + ",llama.cpp")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--w1-tokens", type=int, default=64)
    ap.add_argument("--w1-repeats", type=int, default=3)
    ap.add_argument("--w2-requests", type=int, default=16)
    ap.add_argument("--w2-tokens", type=int, default=32)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-interleaved", dest="interleaved", action="store_false",
                    help="skip the one-process interleaved decode comparison")
    ap.add_argument("--out", default=str(ROOT / "results" / "quant.json"))
    args = ap.parse_args(argv)
    if args.worker == "interleaved":
        print(json.dumps(interleaved_worker(args)), flush=True)
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args)), flush=True)
        return 0
    variants = [v for v in args.variants.split(",") if v]
    if "llama.cpp" in variants:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            variants.remove("llama.cpp")
    # quantize once up front so no timed worker pays for it
    from llamawrapper import LlamaWrapper

    for v in variants:
        if v in ("int8", "int4"):
            LlamaWrapper.load("smollm2", quantization=v, progress=False).close()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            res = run_variant(v, args)
            print(f"round {r + 1} {v}: " + json.dumps({k: res.get(k) for k in ("w1_decode_tok_s", "w2_tok_s", "rss_after_load_mb", "error")}),
                  file=sys.stderr, flush=True)
            runs[v].append(res)
    summary = summarize(runs)
    if args.interleaved:
        inter = run_variant("interleaved", args)
        summary["interleaved_decode"] = inter
        print("interleaved: " + json.dumps(inter.get("speedup_vs_fp32", inter)), file=sys.stderr, flush=True)
    import torch
    import transformers

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "load_average": os.getloadavg()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "summary": summary,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(summary, out.with_suffix(".png"))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
