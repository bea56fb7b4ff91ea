"""Decode-step levers (issue 14), measured side by side in one process.

Each *variant* is a model (fp32 / bf16 / int8 / int4) and a set of runner options (``fuse``,
``compile``); variants that share a model share its weights. Every variant runs engine-shaped
decode steps (the ``SlotCache`` decode view, batch ``B``, one new token per row) on the
executor thread — the process's one OpenMP team — taking turns a few steps at a time, so all
see the same machine load; medians are reported.

    python -m bench.levers --variants fp32,fp32+fuse,int4,int4+fuse --batch 1,16
    python -m bench.levers --profile int4 --batch 1        # torch.profiler table of one variant
    python -m bench.levers --e2e "int4:before=fuse_projections=0,attention_fp32=0;int4:after=" --rounds 5
    python -m bench.levers --split fp32 --rounds 3     # where a 1,000-token prefill's time goes

``--split MODEL`` prefills ``--prefill-tokens`` prompt tokens through ``LlamaWrapper.submit`` (one new
token, the prefix cache cleared first), ``--rounds`` times, with timers around the runner's parts:
its forwards, the q/k/v, output, gate/up and down projections, the attention kernel and the
residual adds and norms; the rest of a forward (embedding, rotary, SiLU and its product, the head)
is ``other``.

``--e2e`` runs whole requests through ``LlamaWrapper.submit`` instead (``engine.<attr>=`` or
``runner.<attr>=`` sets an attribute that is not a setting, e.g. ``engine.pack_prefill=0``,
``runner.kernel_block=0``; any other key must be an ``EngineSettings`` field): W1 (the bench's 46-token
chat prompt, 128 new tokens), W2 (16 requests together, the shared ~300-token system prompt,
64 new tokens each) and a prefill (1,000 prompt tokens, one new), every variant its own loaded
model with its own engine settings, the variants taking turns round by round.

A variant is ``<model>[+fuse|+nofuse][+compile][+attention_fp32|+noattention_fp32]
[+attention_per_row|+noattention_per_row][+onednn|+noonednn][+kernel|+nokernel][+kernel_block|+nokernel_block][+kernel_norm|+nokernel_norm][+int8_kernel|+noint8_kernel][+int4_kernel|+noint4_kernel][+bf16_kernel|+nobf16_kernel][+f32_kernel|+nof32_kernel]
[+kv=float32|+kv=bfloat16]``; model = fp32 | bf16 | int8 |
int4 | w8a8.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from bench.report import emit_json
from llamawrapper import LlamaWrapper
from llamawrapper.engine.executor import get_executor
from llamawrapper.engine.kv_cache import SlotCache
from llamawrapper.engine.runner import LlamaRunner


def parse(variant: str) -> tuple[str, dict[str, Any]]:
    model, *flags = variant.split("+")
    names = ("fuse", "compile", "attention_fp32", "attention_per_row", "onednn", "kernel", "kernel_block", "kernel_norm",
             "int8_kernel", "int4_kernel", "bf16_kernel", "f32_kernel", "kernel_layers")
    opts: dict[str, Any] = {k: True for k in names if k in flags}
    opts.update({k: False for k in names if "no" + k in flags})
    for f in flags:  # kv=float32 | kv=bfloat16 | kv=float16: the KV cache's dtype
        if f.startswith("kv="):
            opts["kv_dtype"] = getattr(torch, f[3:])
    return model, opts


def load_model(name: str, threads: int, **settings: Any) -> Any:
    """smollm2 as variant ``name`` (fp32, bf16, int8, int4, w8a8) with engine ``settings``."""
    kw: dict[str, Any] = {"progress": False, "engine": {"threads": threads, **settings}}
    if name in ("int8", "int4", "w8a8"):
        kw["quantization"] = name
    elif name == "bf16":
        kw["dtype"] = "bfloat16"
    elif name != "fp32":
        raise SystemExit(f"unknown model {name!r}")
    return LlamaWrapper.load("smollm2", **kw)


class Stream:
    """B rows decoding from a prompt of ``prompt_len`` random tokens, engine-shaped."""

    def __init__(self, runner: LlamaRunner, batch: int, prompt_len: int, room: int) -> None:
        self.r, self.B = runner, batch
        self.slots = SlotCache(runner.n_layers, runner.n_kv_heads, runner.head_dim, runner.kv_dtype, batch)
        self.slots.ensure(batch, prompt_len + room)
        g = torch.Generator().manual_seed(0)
        # a filled cache of random keys/values stands in for a prefilled prompt (decode cost only)
        for t in self.slots.k + self.slots.v:
            t.copy_(torch.randn(t.shape, generator=g).to(t.dtype) * 0.5)
        self.positions = torch.full((batch,), prompt_len) + torch.arange(batch) % 7  # ragged lengths
        self.tokens = torch.randint(0, runner.vocab_size, (batch, 1), generator=g)

    def step(self) -> None:
        B = self.B
        positions = self.positions
        length = int(positions.max()) + 1
        mask = (torch.arange(length).unsqueeze(0) <= positions.unsqueeze(1)).view(B, 1, 1, length)
        self.r.bind_rows([""] * B)
        logits = self.r.forward(self.tokens, positions.unsqueeze(1), self.slots.decode_view(B, positions, length), mask)
        self.tokens = logits.argmax(dim=-1, keepdim=True)
        self.positions = positions + 1


def run(args: argparse.Namespace) -> dict[str, Any]:
    ex = get_executor()
    variants = args.variants.split(",")
    models: dict[str, Any] = {}
    for v in variants:
        name, _ = parse(v)
        if name not in models:
            t = time.perf_counter()
            models[name] = load_model(name, args.threads)
            print(f"loaded {name} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    out: dict[str, Any] = {"variants": variants, "threads": args.threads, "results": {}}
    for B in [int(b) for b in args.batch.split(",")]:
        streams, setup = {}, {}
        for v in variants:
            name, opts = parse(v)
            t = time.perf_counter()
            runner = ex.call(lambda m=models[name], o=opts: LlamaRunner(m.loaded.model, **o)).result()
            s = ex.call(lambda r=runner: Stream(r, B, args.prompt, args.steps * args.rounds + 8)).result()
            ex.call(s.step).result()  # first step (compiles, when compiled)
            ex.call(s.step).result()
            setup[v] = time.perf_counter() - t
            streams[v] = s
        times: dict[str, list[float]] = {v: [] for v in variants}

        def turn(s: Stream, n: int) -> list[float]:
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                s.step()
                ts.append(time.perf_counter() - t0)
            return ts

        for _ in range(args.rounds):
            for v in variants:
                times[v] += ex.call(lambda s=streams[v]: turn(s, args.steps)).result()
        med = {v: 1000 * statistics.median(ts) for v, ts in times.items()}
        base = med[variants[0]]
        out["results"][B] = {v: {"ms_per_step": round(med[v], 2), "tok_s": round(1000 * B / med[v], 1),
                                 "vs_first": round(base / med[v], 3), "setup_s": round(setup[v], 1)} for v in variants}
        print(f"B={B}", file=sys.stderr)
        for v in variants:
            r = out["results"][B][v]
            print(f"  {v:24s} {r['ms_per_step']:8.2f} ms/step {r['tok_s']:8.1f} tok/s  x{r['vs_first']:.3f}  "
                  f"(setup {r['setup_s']}s)", file=sys.stderr)
    return out


def profile(args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity, profile as tprofile

    ex = get_executor()
    name, opts = parse(args.profile)
    llm = load_model(name, args.threads)
    B = int(args.batch.split(",")[0])
    runner = ex.call(lambda: LlamaRunner(llm.loaded.model, **opts)).result()
    s = ex.call(lambda: Stream(runner, B, args.prompt, 200)).result()
    for _ in range(4):
        ex.call(s.step).result()

    def prof() -> tuple[Any, float]:
        with tprofile(activities=[ProfilerActivity.CPU]) as p:
            t = time.perf_counter()
            for _ in range(args.steps):
                s.step()
            wall = time.perf_counter() - t
        return p, wall

    def plain() -> float:
        t = time.perf_counter()
        for _ in range(args.steps):
            s.step()
        return time.perf_counter() - t

    wall_plain = ex.call(plain).result()
    p, wall = ex.call(prof).result()
    n = args.steps
    print(f"{args.profile} B={B}: {1000 * wall_plain / n:.2f} ms/step unprofiled, {1000 * wall / n:.2f} profiled")
    avgs = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in avgs)
    print(f"sum of op self time {total / 1000 / n:.2f} ms/step; ops per step {sum(e.count for e in avgs) / n:.0f}")
    for e in avgs[: args.top]:
        print(f"  {e.key:48s} {e.count / n:6.0f}/step {e.self_cpu_time_total / 1000 / n:7.2f} ms/step")


def e2e(args: argparse.Namespace) -> dict[str, Any]:
    from bench.workloads import long_prompt, w1_prompt, w2_prompts
    from llamawrapper import SamplingParams

    specs = []
    for part in args.e2e.split(";"):
        head, _, opts = part.partition("=")
        model, _, label = head.partition(":")
        settings: dict[str, Any] = {}
        for kv in filter(None, opts.split(",")):
            k, _, v = kv.partition("=")
            settings[k] = False if v in ("0", "false", "off") else True if v in ("", "1", "true", "on") else v
        specs.append((f"{model}:{label or 'default'}", model, settings))
    from llamawrapper.config import EngineSettings

    llms, pins = {}, {}
    for label, model, settings in specs:
        pins[label] = settings.get("pin_threads")  # process-wide: set again before each of its variant's turns
        attrs = {k: settings.pop(k) for k in list(settings) if k.startswith(("engine.", "runner."))}
        unknown = set(settings) - set(EngineSettings.model_fields)
        if unknown:  # EngineSettings ignores unknown keys: a misspelt lever would measure nothing
            raise SystemExit(f"not engine settings: {', '.join(sorted(unknown))} (engine.<attr>= or runner.<attr>= for attributes)")
        llms[label] = load_model(model, args.threads, **settings)
        for k, v in attrs.items():  # attributes that are not settings, e.g. engine.pack_prefill=0, runner.kernel_block=0
            where, _, name = k.partition(".")
            obj = llms[label].engine if where == "engine" else llms[label].engine.runner
            if not hasattr(obj, name):
                raise SystemExit(f"the {where} has no attribute {name!r}")
            setattr(obj, name, v)
    tok = next(iter(llms.values())).tokenizer
    w1, w2, long = w1_prompt(tok), w2_prompts(tok, args.w2_requests), long_prompt(tok, 1000)
    rates: dict[str, dict[str, list[float]]] = {label: {"w1": [], "w2": [], "prefill": []} for label in llms}
    texts: dict[str, list[int]] = {}
    from llamawrapper.engine.threads import set_process_threads

    for r in range(args.rounds):
        for label, llm in llms.items():
            set_process_threads(0, pins[label])  # the executor's threads pinned or not, as this variant asks
            llm.engine.executor.call(llm.engine.prefix_cache.clear).result()  # cold start, as in python -m bench
            p1 = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
            t = time.perf_counter()
            res = llm.submit(w1, p1).result()
            first = res.token_ids
            rates[label]["w1"].append(len(first) / (time.perf_counter() - t))
            texts.setdefault(label, first)
            p2 = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
            llm.engine.executor.call(llm.engine.prefix_cache.clear).result()
            t = time.perf_counter()
            hs = [llm.submit(p, p2) for p in w2]
            n = sum(len(h.result().token_ids) for h in hs)
            rates[label]["w2"].append(n / (time.perf_counter() - t))
            llm.engine.executor.call(llm.engine.prefix_cache.clear).result()  # prefill: 1,000 prompt tokens, one new
            t = time.perf_counter()
            llm.submit(long, SamplingParams(max_tokens=1, temperature=0)).result()
            rates[label]["prefill"].append(len(long) / (time.perf_counter() - t))
        print(f"round {r}: " + ", ".join(f"{k} w1 {v['w1'][-1]:.1f} w2 {v['w2'][-1]:.1f} prefill {v['prefill'][-1]:.0f}"
                                         for k, v in rates.items()), file=sys.stderr, flush=True)
    out = {"threads": args.threads, "rounds": args.rounds, "variants": {}}
    base = specs[0][0]
    for label in llms:
        m1, m2 = statistics.median(rates[label]["w1"]), statistics.median(rates[label]["w2"])
        mp = statistics.median(rates[label]["prefill"])
        out["variants"][label] = {"w1_tok_s": round(m1, 1), "w2_tok_s": round(m2, 1), "prefill_tok_s": round(mp, 1),
                                  "w1_runs": rates[label]["w1"], "w2_runs": rates[label]["w2"],
                                  "prefill_runs": rates[label]["prefill"], "w1_same_tokens_as_first": texts[label] == texts[base]}
    for label, v in out["variants"].items():
        b = out["variants"][base]
        print(f"{label:28s} W1 {v['w1_tok_s']:7.1f} tok/s (x{v['w1_tok_s'] / b['w1_tok_s']:.2f})   "
              f"W2 {v['w2_tok_s']:7.1f} tok/s (x{v['w2_tok_s'] / b['w2_tok_s']:.2f})   "
              f"prefill {v['prefill_tok_s']:7.1f} tok/s (x{v['prefill_tok_s'] / b['prefill_tok_s']:.2f})   "
              f"W1 tokens = first's: {v['w1_same_tokens_as_first']}", file=sys.stderr)
    for llm in llms.values():
        llm.close()
    return out


def split(args: argparse.Namespace) -> dict[str, Any]:
    from bench.workloads import long_prompt
    from llamawrapper import SamplingParams
    from llamawrapper.engine import kernels

    llm = load_model(args.split, args.threads)
    runner = llm.engine.runner
    spent: dict[str, float] = {}

    def timed(part: str, fn: Any) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[part] = spent.get(part, 0.0) + time.perf_counter() - t
        return call

    parts = ("qkv", "o", "gate_up", "down")
    originals = [(f, {p: getattr(f, p) for p in parts}) for f in runner.prefill_fused if f is not None]
    attention, forward, add_norm = kernels.prefill_attention, runner.forward, runner._add_norm
    for f, mods in originals:
        for p, m in mods.items():
            setattr(f, p, timed(p, m))
    kernels.prefill_attention = timed("attention", attention)
    runner.forward, runner._add_norm = timed("forward", forward), timed("add_norm", add_norm)
    prompt = long_prompt(llm.tokenizer, args.prefill_tokens)
    rounds: list[dict[str, float]] = []
    try:
        for r in range(args.rounds + 1):  # the first is a warm-up
            llm.engine.executor.call(llm.engine.prefix_cache.clear).result()
            spent.clear()
            t = time.perf_counter()
            llm.submit(prompt, SamplingParams(max_tokens=1, temperature=0)).result()
            if r:
                ms = {k: v * 1000 for k, v in spent.items()}
                ms["other"] = ms["forward"] - sum(ms.get(k, 0.0) for k in (*parts, "attention", "add_norm"))
                rounds.append({"ttft": (time.perf_counter() - t) * 1000, **ms})
    finally:
        for f, mods in originals:
            for p, m in mods.items():
                setattr(f, p, m)
        kernels.prefill_attention = attention
        del runner.forward, runner._add_norm
        llm.close()
    keys = ("ttft", "forward", *parts, "attention", "add_norm", "other")
    out = {"model": args.split, "prompt_tokens": len(prompt), "threads": args.threads, "rounds": rounds,
           "median_ms": {k: round(statistics.median(r.get(k, 0.0) for r in rounds), 1) for k in keys}}
    print(f"{args.split}, {len(prompt)}-token prefill, ms (median of {len(rounds)}): "
          + ", ".join(f"{k} {v}" for k, v in out["median_ms"].items()), file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.levers")
    ap.add_argument("--variants", default="fp32,int4")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--prompt", type=int, default=64, help="KV length at the first step")
    ap.add_argument("--steps", type=int, default=8, help="steps per turn")
    ap.add_argument("--rounds", type=int, default=12, help="turns per variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", default=None, help="profile one variant instead")
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--json", default=None)
    ap.add_argument("--e2e", default=None, help="whole requests: 'model:label=setting=0,...;model:label=...'")
    ap.add_argument("--w2-requests", type=int, default=16)
    ap.add_argument("--split", default=None, help="instead: where a prefill's time goes, for this model")
    ap.add_argument("--prefill-tokens", type=int, default=1000, help="with --split")
    args = ap.parse_args(argv)
    if args.split:
        emit_json(split(args), args.json)
        return 0
    if args.e2e:
        emit_json(e2e(args), args.json)
        return 0
    if args.profile:
        profile(args)
        return 0
    emit_json(run(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
