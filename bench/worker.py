"""One system, every workload, in one process: ``python -m bench.worker --system SPEC ...`` loads
the system, warms it up, runs the requested workloads and writes a JSON result. Running each
system in its own process makes its peak RSS its own.

Workloads: ``w1`` (one stream), ``w2`` (concurrent chats sharing a system prompt), ``sweep``
(W2 at each concurrency), ``w3`` (a multi-turn conversation that includes the model's own
answers), and for the engine only ``prefix`` (TTFT with a cached vs uncached ~300-token prefix,
W2 with staggered arrivals, W2 with the system prompt already cached, cache budget vs peak) and
``rss`` (resident memory over many short requests). The engine's prefix cache and llama.cpp's
remembered prompt are cleared before each workload, so each one starts cold.

Outside the default set (``EXTRA_WORKLOADS``, used by ``bench.versus``): ``decode`` (W1 repeated,
medians of end-to-end and decode-only tokens/s), ``prefill`` (a prompt of exactly
``prefill_tokens`` tokens, one new token: prompt tokens / TTFT, median of repeats, cache cleared
before each) and, engine only, ``ttft`` (the cached vs uncached pairs of ``prefix`` without its
W2 variants).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from . import workloads as wl
from .metrics import MB, RssSampler, now, rss_bytes, summarize
from .systems import Unavailable, build, default_threads, parse_options

ALL_WORKLOADS = ("w1", "w2", "sweep", "w3", "prefix", "rss")
EXTRA_WORKLOADS = ("decode", "prefill", "ttft")  # not run by default; bench.versus asks for them
ENGINE_ONLY = ("prefix", "rss", "ttft")


def resolve_model(model: str) -> tuple[Path, Path | None]:
    """The Hugging Face folder every transformers-based system loads, and the GGUF file if any."""
    from llamawrapper.models import loading, registry

    source = registry.resolve(model)
    folder = loading.resolve_folder(source, progress=False)
    return folder, source.path if source.kind == "gguf" else None


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Worker:
    def __init__(self, spec: str, model: str, settings: wl.BenchSettings, log: Any = sys.stderr) -> None:
        self.spec, self.model, self.settings, self.log = spec, model, settings, log
        self.kind = parse_options(spec)[0]
        self.rss = RssSampler()

    def say(self, msg: str) -> None:
        print(f"[{self.spec}] {msg}", file=self.log, flush=True)

    def run(self, names: list[str]) -> dict[str, Any]:
        from transformers import AutoTokenizer

        s = self.settings
        out: dict[str, Any] = {"system": self.spec, "kind": self.kind, "status": "ok", "workloads": {}}
        folder, gguf = resolve_model(self.model)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        rss0 = rss_bytes()
        t = now()
        try:
            self.system = build(self.spec, self.model, folder, gguf, default_threads(s), s)
        except Unavailable as exc:
            return {**out, "status": "unavailable", "reason": str(exc)}
        out["load_s"] = now() - t
        import llamawrapper

        out["library"] = str(Path(llamawrapper.__file__).parent)  # which checkout was measured (bench.versus --baseline)
        out["rss_before_load_mb"] = rss0 / MB
        out["rss_after_load_mb"] = rss_bytes() / MB
        out["threads"] = default_threads(s)
        if s.warmup:
            self.system.run(wl.w2_prompts(self.tokenizer, 2)[:2], 2)
        for name in names:
            if name in ENGINE_ONLY and self.kind != "engine":
                continue
            if name == "w3" and self.kind == "hf_padded":
                out["workloads"]["w3"] = {"skipped": "one stream: a padded batch of one is hf_sequential"}
                continue
            self.say(f"{name} ...")
            self.before_workload()
            t, cpu = now(), cpu_seconds()
            result = getattr(self, f"workload_{name}")(out["workloads"])
            result["peak_rss_mb"] = self.rss.peak() / MB
            result["cpu_s"] = cpu_seconds() - cpu  # this process's CPU time: less sensitive to other load
            result["loadavg_1m_after"] = os.getloadavg()[0]
            if self.kind == "engine":
                result["engine"] = self.engine_snapshot()
            out["workloads"][name] = result
            self.say(f"{name} done in {now() - t:.1f}s")
        out["peak_rss_mb"] = self.rss.overall_peak() / MB
        if self.kind == "llamacpp":
            out["llama_cpp_version"] = self.system.version
            out["llama_cpp_extra_bufts"] = self.system.extra_bufts
        return out

    # -- helpers -----------------------------------------------------------------------------------
    def before_workload(self) -> None:
        if self.kind == "engine":
            self.system.clear_prefix_cache()
        elif self.kind == "llamacpp":
            self.system.reset()
        self.rss.reset()

    def engine_snapshot(self) -> dict[str, Any]:
        self.system.wait_idle()
        snap = self.system.llm.engine.snapshot()
        keys = ("prefix_cache_bytes", "prefix_cache_peak_bytes", "prefix_cache_budget_bytes", "prefix_cache_hit_rate",
                "prefix_cache_evictions", "slot_cache_bytes", "steps", "decode_steps", "prefill_tokens", "generated_tokens")
        return {k: snap.get(k) for k in keys}

    def concurrent(self, n: int, new_tokens: int, offset: int = 0, arrivals: list[float] | None = None) -> dict[str, Any]:
        prompts = wl.w2_prompts(self.tokenizer, n + offset)[offset:]
        cpu = cpu_seconds()
        records, outputs, wall = self.system.run(prompts, new_tokens, arrivals)
        return summarize(records, wall, concurrency=n, new_tokens=new_tokens, peak_rss_mb=self.rss.peak() / MB,
                         cpu_s=cpu_seconds() - cpu)

    # -- workloads ---------------------------------------------------------------------------------
    def workload_w1(self, done: dict) -> dict[str, Any]:
        prompt = wl.w1_prompt(self.tokenizer)
        records, outputs, wall = self.system.run([prompt], self.settings.w1_new_tokens)
        return summarize(records, wall, new_tokens=self.settings.w1_new_tokens, token_ids=outputs[0])

    def workload_w2(self, done: dict) -> dict[str, Any]:
        return self.concurrent(self.settings.w2_requests, self.settings.w2_new_tokens)

    def workload_sweep(self, done: dict) -> dict[str, Any]:
        points = []
        for c in self.settings.sweep:
            w2 = done.get("w2")
            if w2 and w2.get("concurrency") == c:
                points.append({**{k: v for k, v in w2.items() if k != "engine"}, "reused": "w2"})
                continue
            self.before_workload()
            self.say(f"sweep c={c}")
            points.append(self.concurrent(c, self.settings.w2_new_tokens))
        return {"points": points}

    def workload_w3(self, done: dict) -> dict[str, Any]:
        messages: list[dict] = []
        turns, records = [], []
        wall = 0.0
        eos = self.tokenizer.eos_token_id
        for turn in range(self.settings.w3_turns):
            messages.append({"role": "user", "content": wl.CONVERSATION[turn % len(wl.CONVERSATION)]})
            prompt = wl.chat_ids(self.tokenizer, messages)
            recs, outputs, w = self.system.run([prompt], self.settings.w3_new_tokens)
            wall += w
            records.extend(recs)
            answer_ids = outputs[0][: outputs[0].index(eos)] if eos in outputs[0] else outputs[0]
            messages.append({"role": "assistant", "content": self.tokenizer.decode(answer_ids, skip_special_tokens=True)})
            turns.append({"turn": turn + 1, "prompt_tokens": len(prompt), "ttft_s": recs[0].ttft_s, "latency_s": recs[0].latency_s})
        return summarize(records, wall, turns=turns, new_tokens=self.settings.w3_new_tokens)

    def workload_decode(self, done: dict) -> dict[str, Any]:
        """W1 ``decode_repeats`` times: medians of end-to-end tokens/s (prefill included, as ``w1``)
        and of decode tokens/s, (n - 1) / (last token - first token), which is what llama-bench's
        tg test times (it decodes from an empty context, with no prompt)."""
        s = self.settings
        prompt = wl.w1_prompt(self.tokenizer)
        runs = []
        for _ in range(s.decode_repeats):
            self.before_workload()
            records, outputs, wall = self.system.run([prompt], s.w1_new_tokens)
            r = records[0]
            span = r.latency_s - r.ttft_s
            runs.append({"tokens": r.new_tokens, "wall_s": wall, "ttft_s": r.ttft_s, "tokens_per_s": r.new_tokens / wall,
                         "decode_tokens_per_s": (r.new_tokens - 1) / span if r.new_tokens > 1 and span > 0 else None})
        decode = [x["decode_tokens_per_s"] for x in runs if x["decode_tokens_per_s"]]
        return {"prompt_tokens": len(prompt), "new_tokens": s.w1_new_tokens, "repeats": runs,
                "tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs),
                "decode_tokens_per_s": statistics.median(decode) if decode else None,
                "ttft_p50_s": statistics.median(x["ttft_s"] for x in runs), "token_ids": outputs[0]}

    def workload_prefill(self, done: dict) -> dict[str, Any]:
        """A prompt of exactly ``prefill_tokens`` tokens and one new token: prompt tokens / TTFT
        (median of ``prefill_repeats``; the prefix cache is cleared before each)."""
        s = self.settings
        prompt = wl.long_prompt(self.tokenizer, s.prefill_tokens)
        ttfts = []
        for _ in range(s.prefill_repeats):
            self.before_workload()
            records, _, _ = self.system.run([prompt], 1)
            ttfts.append(records[0].ttft_s)
        ttft = statistics.median(ttfts)
        return {"prompt_tokens": len(prompt), "ttft_s": ttfts, "ttft_p50_s": ttft, "tokens_per_s": len(prompt) / ttft}

    def prefix_pairs(self) -> dict[str, Any]:
        """TTFT of a request whose ~300-token system prompt is cached vs the same kind of request
        cold (another question), ``ttft_repeats`` pairs, medians."""
        s, eng = self.settings, self.system
        pairs = []
        prompts = wl.w2_prompts(self.tokenizer, 2 * s.ttft_repeats)
        for r in range(s.ttft_repeats):
            eng.clear_prefix_cache()
            cold, _, _ = eng.run([prompts[2 * r]], 1)  # also caches the shared system prompt
            eng.wait_idle()
            warm, _, _ = eng.run([prompts[2 * r + 1]], 1)
            pairs.append({"uncached_ttft_s": cold[0].ttft_s, "cached_ttft_s": warm[0].ttft_s})
        system_tokens = len(wl.chat_ids(self.tokenizer, [{"role": "system", "content": wl.SYSTEM_PROMPT}]))
        unc = statistics.median(p["uncached_ttft_s"] for p in pairs)
        cac = statistics.median(p["cached_ttft_s"] for p in pairs)
        return {"prompt_tokens_mean": statistics.mean(len(p) for p in prompts), "shared_prefix_tokens": system_tokens,
                "pairs": pairs, "uncached_ttft_p50_s": unc, "cached_ttft_p50_s": cac,
                "cached_over_uncached": cac / unc if unc else None}

    def workload_ttft(self, done: dict) -> dict[str, Any]:
        return self.prefix_pairs()

    def workload_prefix(self, done: dict) -> dict[str, Any]:
        """TTFT of a request whose ~300-token system prompt is cached vs the same request cold."""
        s, eng = self.settings, self.system
        pairs = self.prefix_pairs()
        self.say("w2 with staggered arrivals")
        eng.clear_prefix_cache()
        n = s.w2_requests
        staggered = self.concurrent(n, s.w2_new_tokens, arrivals=[i * s.stagger_ms / 1000 for i in range(n)])
        self.say("w2 with the system prompt already cached (other questions)")
        eng.clear_prefix_cache()
        eng.run([wl.w2_prompts(self.tokenizer, 1)[0]], 1)
        eng.wait_idle()
        warm_w2 = self.concurrent(n, s.w2_new_tokens, offset=n)
        snap = self.engine_snapshot()
        return {
            **pairs,
            "w2_staggered": staggered,
            "w2_system_prompt_cached": warm_w2,
            "cache_budget_bytes": snap["prefix_cache_budget_bytes"],
            "cache_peak_bytes": snap["prefix_cache_peak_bytes"],
        }

    def workload_rss(self, done: dict) -> dict[str, Any]:
        """Short requests in waves; RSS after each wave. Flat = RSS growth after the first 20% of the
        requests within a tolerance, either raw or net of the prefix/slot caches' own (budgeted) growth."""
        s, eng = self.settings, self.system
        prompts = wl.rss_prompts(self.tokenizer, s.rss_requests)
        series = []
        t0 = now()
        for start in range(0, len(prompts), s.rss_wave):
            eng.run(prompts[start : start + s.rss_wave], s.rss_new_tokens)
            eng.wait_idle()
            snap = eng.llm.engine.snapshot()
            series.append({"requests": min(start + s.rss_wave, len(prompts)), "rss_mb": rss_bytes() / MB,
                           "prefix_cache_mb": snap["prefix_cache_bytes"] / MB, "slot_cache_mb": snap["slot_cache_bytes"] / MB})
        wall = now() - t0
        base = next(p for p in series if p["requests"] >= 0.2 * len(prompts))
        end = series[-1]
        growth = end["rss_mb"] - base["rss_mb"]
        net = growth - (end["prefix_cache_mb"] - base["prefix_cache_mb"]) - (end["slot_cache_mb"] - base["slot_cache_mb"])
        tolerance = max(16.0, 0.02 * base["rss_mb"])
        return {
            "requests": len(prompts), "new_tokens": s.rss_new_tokens, "wall_s": wall,
            "rss_baseline_mb": base["rss_mb"], "rss_baseline_at_request": base["requests"], "rss_end_mb": end["rss_mb"],
            "rss_max_mb": max(p["rss_mb"] for p in series), "rss_growth_mb": growth, "rss_growth_net_of_caches_mb": net,
            "tolerance_mb": tolerance, "flat": min(growth, net) <= tolerance, "series": series,
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__)
    ap.add_argument("--system", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--workloads", default=",".join(ALL_WORKLOADS))
    ap.add_argument("--settings", default="{}", help="BenchSettings as JSON")
    ap.add_argument("--out", required=True, help="where to write the JSON result")
    args = ap.parse_args(argv)
    settings = wl.BenchSettings(**json.loads(args.settings))
    worker = Worker(args.system, args.model, settings)
    started = time.time()
    try:
        result = worker.run([w for w in args.workloads.split(",") if w])
    except Exception as exc:
        traceback.print_exc()
        result = {"system": args.system, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = time.time() - started
    Path(args.out).write_text(json.dumps(result, indent=1))
    if worker.kind == "engine" and result.get("status") == "ok":
        worker.system.llm.close()
    return 0 if result["status"] in ("ok", "unavailable") else 1


if __name__ == "__main__":
    sys.exit(main())
