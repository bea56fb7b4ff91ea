"""``python -m bench.structured``: what structured output and the response cache cost and save.

1. Per-token decode cost of constrained (JSON schema through llguidance) against unconstrained
   decoding on the same engine and model, single stream and a batch of 8, interleaved repetitions
   (target: constrained ≤ 1.3× unconstrained).
2. Grammar engines' own cost per token on smollm2's tokenizer, replaying the same tokens:
   llguidance (used), xgrammar and outlines-core when installed.
3. Response-cache hit against a fresh answer, end to end over HTTP through a real
   ``llamawrapper serve`` (target: a hit ≥ 50× faster), and through the Python API.

Writes ``OUT/structured-<time>.json`` and ``.png`` (plus ``structured-latest.*``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .served import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 60},
    "summary": {"type": "string", "minLength": 150, "maxLength": 400},
    "year": {"type": "integer", "minimum": 1800, "maximum": 2100},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 3, "maxItems": 5}},
    "required": ["title", "summary", "year", "tags"]}
PROMPT = "Describe a famous novel as JSON with a title, a long summary, the year and some tags."


def _tpot(handle_metrics: dict, tokens: int) -> float:
    return (handle_metrics["latency"] - handle_metrics["ttft"]) / max(tokens - 1, 1)


def decode_cost(llm: Any, reps: int, batch_sizes: list[int], max_tokens: int) -> dict[str, Any]:
    """Median seconds per decoded token, constrained and not, interleaved to share the noise."""
    from llamawrapper.requests import flow as pipeline
    from llamawrapper.requests.structured.grammar import grammar_for
    from llamawrapper.types import SamplingParams

    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "novel", "schema": SCHEMA}})
    ids = llm.chat_prompt_ids(PROMPT)
    out: dict[str, Any] = {}
    for bs in batch_sizes:
        samples: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
        for _ in range(reps):
            for kind in ("unconstrained", "constrained"):
                params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=(kind == "unconstrained"))
                handles = [pipeline.submit(llm.custom, ids, params, grammar=grammar if kind == "constrained" else None, cache=False)
                           for _ in range(bs)]
                for h in handles:
                    res = h.result()
                    samples[kind].append(_tpot(res.metrics, res.usage.completion_tokens))
        med = {k: statistics.median(v) for k, v in samples.items()}
        out[f"batch{bs}"] = {"s_per_token": med, "ratio": med["constrained"] / med["unconstrained"], "samples": samples}
        print(f"batch {bs}: unconstrained {med['unconstrained'] * 1e3:.1f} ms/token, constrained {med['constrained'] * 1e3:.1f} ms/token, "
              f"ratio {out[f'batch{bs}']['ratio']:.3f}", flush=True)
    return out


def engine_costs(llm: Any, reps: int) -> dict[str, Any]:
    """Mask computation per token of each grammar engine, replaying one constrained answer."""
    import numpy as np
    import torch

    from llamawrapper.requests.structured.grammar import grammar_for

    res = llm.chat(PROMPT, max_tokens=256, temperature=0, cache=False,
                   response_format={"type": "json_schema", "json_schema": {"name": "novel", "schema": SCHEMA}})
    tokens = [t for t in res.token_ids if t not in llm.engine.eos_token_ids]
    vocab = llm.engine.runner.vocab_size
    logits = torch.randn(vocab)
    out: dict[str, Any] = {"tokens": len(tokens)}

    def timed(step) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) / len(tokens))
        return statistics.median(times)

    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "novel", "schema": SCHEMA}})
    compiler = llm.custom.grammar

    def ours():
        proc = compiler.processor(grammar)
        done: list[int] = []
        for t in tokens:
            proc(done, logits.clone())
            done.append(t)
    out["llguidance (LlamaWrapper processor, incl. masking)"] = timed(ours)
    try:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(llm.tokenizer, vocab_size=vocab)
        compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), separators=(", ", ": "))

        def xg():
            m = xgr.GrammarMatcher(compiled)
            bm = xgr.allocate_token_bitmask(1, vocab)
            for t in tokens:
                m.fill_next_token_bitmask(bm)
                allowed = np.unpackbits(bm.numpy().view(np.uint8), bitorder="little")[:vocab]
                np.putmask(logits.clone().numpy(), allowed == 0, -np.inf)
                m.accept_token(t)
        out["xgrammar (same masking)"] = timed(xg)
    except Exception as exc:  # not installed, or an API change
        out["xgrammar (same masking)"] = f"unavailable: {exc!r}"[:200]
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        eos = llm.tokenizer.eos_token_id
        vocab_map: dict[str, list[int]] = {}
        for tok, i in llm.tokenizer.get_vocab().items():
            if i != eos:
                vocab_map.setdefault(llm.tokenizer.convert_tokens_to_string([tok]), []).append(i)
        index = Index(build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?"), Vocabulary(eos, vocab_map))

        def oc():
            g = Guide(index)
            for t in tokens:
                allowed = np.zeros(vocab, dtype=bool)
                allowed[np.asarray(g.get_tokens())] = True
                np.putmask(logits.clone().numpy(), ~allowed, -np.inf)
                g.advance(t)
        out["outlines-core (same masking)"] = timed(oc)
    except Exception as exc:
        out["outlines-core (same masking)"] = f"unavailable: {exc!r}"[:200]
    for k, v in out.items():
        print(f"{k}: {v * 1e6:.0f} µs/token" if isinstance(v, float) else f"{k}: {v}", flush=True)
    return out


def cache_http(prompts: int, max_tokens: int, tmp: Path) -> dict[str, Any]:
    """Fresh answers then the same requests again (hits), over HTTP to a real server."""
    import httpx

    env = {"LLAMAWRAPPER_CACHE_ENABLED": "true", "LLAMAWRAPPER_CACHE_URL": f"sqlite:///{tmp / 'bench-cache.sqlite'}"}
    server = ServeProcess(["smollm2"], tmp / "server.log", env=env)
    url = server.url
    try:
        server.wait_ready()
        fresh, hit = [], []
        with httpx.Client(base_url=url, timeout=600) as client:
            for i in range(prompts):
                body = {"model": "smollm2", "max_tokens": max_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": f"Tell me fact number {i} about the ocean."}]}
                for bucket, expect in ((fresh, "miss"), (hit, "hit")):
                    t0 = time.perf_counter()
                    r = client.post("/v1/chat/completions", json=body)
                    bucket.append(time.perf_counter() - t0)
                    assert r.status_code == 200 and r.headers.get("x-cache") == expect, (r.status_code, r.headers, r.text[:200])
        out = {"fresh_s": statistics.median(fresh), "hit_s": statistics.median(hit), "fresh": fresh, "hit": hit}
        out["speedup"] = out["fresh_s"] / out["hit_s"]
        print(f"HTTP: fresh {out['fresh_s'] * 1e3:.0f} ms, hit {out['hit_s'] * 1e3:.1f} ms, {out['speedup']:.0f}x", flush=True)
        return out
    finally:
        server.stop()


def cache_api(llm: Any, prompts: int, max_tokens: int) -> dict[str, Any]:
    fresh, hit = [], []
    for i in range(prompts):
        msg = f"Tell me fact number {i} about the desert."
        for bucket in (fresh, hit):
            t0 = time.perf_counter()
            llm.chat(msg, max_tokens=max_tokens, temperature=0)
            bucket.append(time.perf_counter() - t0)
    out = {"fresh_s": statistics.median(fresh), "hit_s": statistics.median(hit)}
    out["speedup"] = out["fresh_s"] / out["hit_s"]
    print(f"Python API: fresh {out['fresh_s'] * 1e3:.0f} ms, hit {out['hit_s'] * 1e3:.2f} ms, {out['speedup']:.0f}x", flush=True)
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(doc["decode"])
    x = range(len(names))
    for k, (kind, color) in enumerate((("unconstrained", "tab:blue"), ("constrained", "tab:orange"))):
        a.bar([i + 0.4 * k for i in x], [doc["decode"][n]["s_per_token"][kind] * 1e3 for n in names], 0.4, label=kind, color=color)
    a.set_xticks([i + 0.2 for i in x], names)
    a.set_ylabel("ms per decoded token (median)")
    a.set_title("Constrained vs unconstrained decoding")
    a.legend()
    bars = {f"HTTP {k}": doc["cache_http"][f"{k}_s"] * 1e3 for k in ("fresh", "hit")} if "cache_http" in doc else {}
    bars.update({f"API {k}": doc["cache_api"][f"{k}_s"] * 1e3 for k in ("fresh", "hit")})
    b.bar(list(bars), list(bars.values()), color=["tab:blue", "tab:green"] * 2)
    b.set_yscale("log")
    b.set_ylabel("ms per request (median, log)")
    b.set_title("Response cache: fresh vs hit")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, not figures)")
    ap.add_argument("--no-http", action="store_true", help="skip the end-to-end HTTP cache measurement")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    reps = 2 if args.quick else 5
    from bench.metrics import machine, versions
    from llamawrapper import LlamaWrapper

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"benchmark": "structured", "machine": machine(), "versions": versions(),
                           "settings": {"reps": reps, "max_tokens": 64, "schema": SCHEMA, "prompt": PROMPT}}
    with tempfile.TemporaryDirectory() as tmp:
        llm = LlamaWrapper.load("smollm2", progress=False, cache=f"sqlite:///{Path(tmp) / 'api-cache.sqlite'}")
        try:
            doc["decode"] = decode_cost(llm, reps, [1, 8], 64)
            doc["grammar_engines_s_per_token"] = engine_costs(llm, reps)
            doc["cache_api"] = cache_api(llm, 3 if args.quick else 8, 32)
        finally:
            llm.close()
        if not args.no_http:
            doc["cache_http"] = cache_http(3 if args.quick else 8, 32, Path(tmp))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"structured-{stamp}", "structured-latest"):
        (out / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str))
        plot(doc, out / f"{name}.png")
    print(f"wrote {out / f'structured-{stamp}.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
