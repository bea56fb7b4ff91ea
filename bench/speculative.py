"""Prompt-lookup speculative decoding (issue 14), measured side by side in one process.

Every variant is an engine with its own ``prompt_lookup`` (0 = off) on the same loaded model and
runner (so the same weights and the one executor thread); the variants take turns workload by
workload, round by round, and the prefix cache is cleared before every run (cold start).

Workloads (greedy, at most ``--max-tokens`` new tokens, ending at EOS as a user's answer would):

- ``extract``: answers that copy spans of the prompt: 8 order confirmations to extract fields
  from as a list, and 8 "summarize the rules about X" over the bench's support rules (~300 tokens);
- ``chat``: open chat, the bench's 16 customer questions without a system prompt.

Each is run single stream (``--single`` prompts one after the other) and as a batch of 16
submitted together. Reported: completion tokens per second of wall time (prefill included, the
same for every variant), the draft acceptance rate, decode steps, and whether every variant's
tokens equal the ``off`` variant's (they must).

    python -m bench.speculative --models fp32,int4 --variants 0,4,8 --rounds 2 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import sys
import time
from typing import Any

from bench.report import emit_json
from bench.workloads import QUESTIONS, SYSTEM_PROMPT, chat_ids
from llamawrapper import LlamaWrapper, SamplingParams
from llamawrapper.engine import Engine

PEOPLE = [("John Smith", "42 Oak Street, Springfield"), ("Mary Johnson", "7 Elm Road, Riverton"),
          ("David Brown", "19 Hill Avenue, Lakewood"), ("Sarah Miller", "3 Maple Lane, Fairview"),
          ("James Wilson", "88 Pine Street, Greenville"), ("Emma Davis", "5 Cedar Court, Bristol"),
          ("Robert Taylor", "61 Birch Drive, Madison"), ("Laura Moore", "24 Willow Way, Salem")]
ITEMS = ["one Trekker 45 backpack in forest green", "one pair of Alpine Pro hiking boots size 41",
         "two merino wool socks", "one Summit 2 tent for two people", "a Glacier down jacket size M",
         "one pair of Crux climbing shoes size 39", "a 1 litre steel water bottle", "one Nordic sleeping bag rated -5 C"]
TOPICS = ["standard and express delivery", "returns of unused items", "free repairs of tents and backpacks",
          "the sizes of boots, jackets and climbing shoes", "safety advice in the mountains",
          "the shops and their opening hours", "what to do when you do not know an answer", "discounts"]


def extraction_messages(i: int) -> list[dict]:
    if i % 2 == 0:  # an order confirmation to extract fields from
        j = i // 2
        name, address = PEOPLE[j % len(PEOPLE)]
        items = ", ".join(ITEMS[(j + s) % len(ITEMS)] for s in range(3))
        doc = f"Order confirmation. Customer: {name}, {address}. Items: {items}. Order number: NW-2026-{118734 + 911 * j}."
        return [{"role": "user", "content": doc + "\n\nExtract the customer name, address, items and order number "
                                                  "from the text above as a list."}]
    topic = TOPICS[(i // 2) % len(TOPICS)]  # rules to summarize
    return [{"role": "user", "content": f"Here are the shop rules: {SYSTEM_PROMPT}\n\nSummarize the rules about {topic}."}]


def workloads(tok: Any) -> dict[str, list[list[int]]]:
    return {"extract": [chat_ids(tok, extraction_messages(i)) for i in range(16)],
            "chat": [chat_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS[:16]]}


def load(model: str, threads: int) -> LlamaWrapper:
    kw: dict[str, Any] = {"progress": False, "engine": {"threads": threads}}
    if model in ("int8", "int4"):
        kw["quantization"] = model
    elif model == "bf16":
        kw["dtype"] = "bfloat16"
    return LlamaWrapper.load("smollm2", **kw)


def parse_variant(v: str) -> tuple[int, int, bool]:
    """``4`` = prompt_lookup 4; ``4n2`` = ... looked up by n-grams of at least 2 tokens; ``4pad``
    = verify steps run the projections on the padded batch (default: packed real positions)."""
    m = re.fullmatch(r"(\d+)(?:n(\d))?(pad)?", v)
    if m is None:
        raise SystemExit(f"bad variant {v!r}")
    return int(m.group(1)), int(m.group(2) or 1), m.group(3) is None


def run_once(eng: Engine, prompts: list[list[int]], batch: bool, max_tokens: int) -> dict[str, Any]:
    eng.executor.call(eng.prefix_cache.clear).result()
    before = eng.snapshot()
    p = SamplingParams(max_tokens=max_tokens, temperature=0)
    t = time.perf_counter()
    if batch:
        results = [h.result() for h in [eng.submit(x, p) for x in prompts]]
    else:
        results = [eng.submit(x, p).result() for x in prompts]
    wall = time.perf_counter() - t
    after = eng.snapshot()
    d = {k: after[k] - before[k] for k in ("draft_tokens", "accepted_draft_tokens", "decode_steps", "generated_tokens")}
    tokens = sum(len(r.token_ids) for r in results)
    # decode only (after each request's first token), for single streams: prefill is the same work
    # for every variant and would dilute the ratio
    decode_s = sum(r.metrics["latency"] - r.metrics["ttft"] for r in results)
    decode = (tokens - len(results)) / decode_s if decode_s > 0 and not batch else None
    return {"tok_s": tokens / wall, "decode_tok_s": decode, "tokens": tokens, "wall_s": wall,
            "ids": [r.token_ids for r in results], **d}


def bench_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    llm = load(model, args.threads)
    tok = llm.tokenizer
    loads = workloads(tok)
    variants = args.variants.split(",")
    engines = {}
    for v in variants:
        k, n, packed = parse_variant(v)
        cfg = dataclasses.replace(llm.engine.config, prompt_lookup=k, max_batch_size=max(16, llm.engine.config.max_batch_size))
        eng = Engine(llm.engine.runner, tok, sorted(llm.engine.eos_token_ids), cfg)
        eng.lookup_min_ngram = n
        eng.verify_packed = packed
        engines[v] = eng
    cases = [(w, b) for w in loads for b in (False, True)]
    runs: dict[str, dict[str, list[dict]]] = {v: {} for v in variants}
    warm = loads["chat"][0]
    for eng in engines.values():  # first-call costs out of the figures
        eng.submit(warm, SamplingParams(max_tokens=8, temperature=0)).result()
    for r in range(args.rounds):
        for w, batch in cases:
            prompts = loads[w] if batch else loads[w][: args.single]
            name = f"{w}/{'b16' if batch else 'single'}"
            for v in variants:
                res = run_once(engines[v], prompts, batch, args.max_tokens)
                runs[v].setdefault(name, []).append(res)
                print(f"{model} round {r} {name:14s} {v:5s} {res['tok_s']:7.1f} tok/s (decode {res['decode_tok_s']})  drafts {res['draft_tokens']:5d} "
                      f"accepted {res['accepted_draft_tokens']:5d}  steps {res['decode_steps']}", file=sys.stderr, flush=True)
    out: dict[str, Any] = {}
    base = variants[0]
    for name in runs[base]:
        ref = runs[base][name][0]["ids"]
        row = {}
        for v in variants:
            rs = runs[v][name]
            drafted = sum(x["draft_tokens"] for x in rs)
            dec = [x["decode_tok_s"] for x in rs if x["decode_tok_s"]]
            row[v] = {"tok_s": round(statistics.median(x["tok_s"] for x in rs), 1),
                      "decode_tok_s": round(statistics.median(dec), 1) if dec else None,
                      "tok_s_runs": [round(x["tok_s"], 1) for x in rs],
                      "tokens": rs[0]["tokens"],
                      "decode_steps": rs[0]["decode_steps"],
                      "acceptance": round(sum(x["accepted_draft_tokens"] for x in rs) / drafted, 3) if drafted else None,
                      "tokens_per_step": round(rs[0]["tokens"] / max(rs[0]["decode_steps"], 1), 2),
                      "same_tokens_as_first": all(x["ids"] == ref for x in rs)}
            row[v]["vs_first"] = round(row[v]["tok_s"] / row[base]["tok_s"], 3)
        out[name] = row
    for eng in engines.values():
        eng.shutdown()
    llm.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.speculative")
    ap.add_argument("--models", default="fp32")
    ap.add_argument("--variants", default="0,4,8", help="prompt_lookup values; the first is the baseline; '4n2' = min n-gram 2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--single", type=int, default=4, help="prompts of each workload run one after the other")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine's second core may be busy)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"args": vars(args), "models": {}}
    for model in args.models.split(","):
        out["models"][model] = bench_model(model, args)
    for model, table in out["models"].items():
        print(f"\n{model}", file=sys.stderr)
        for name, row in table.items():
            cells = "  ".join(f"{v}: {c['tok_s']:6.1f} tok/s x{c['vs_first']:.2f} (decode {c['decode_tok_s']}) acc {c['acceptance']} "
                              f"{c['tokens_per_step']} tok/step{'' if c['same_tokens_as_first'] else ' DIFFERENT'}"
                              for v, c in row.items())
            print(f"  {name:14s} {cells}", file=sys.stderr)
    emit_json(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
