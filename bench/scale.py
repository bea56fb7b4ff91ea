"""Scale-out figures for the Ray Serve app (issue 12), measured side by side in one run:

1. overhead: the plain server against ``serve --ray`` with one replica (same threads), on 16
   concurrent streaming chats sharing the support system prompt (tokens/s, TTFT);
2. routing: two replicas (one thread each), 8 system prompts x 8 questions, Ray's default
   power-of-two-choices against ``--routing prefix`` (prefix-cache hit rate, TTFT).

Every server is a real ``llamawrapper serve`` process on loopback, driven by the official
``openai`` client; rounds alternate between systems. Writes JSON (and prints a summary).

    python -m bench.scale --out bench/results/scale.json [--blocks 2 --rounds 2] [--prefix-cache-mb 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional


from .metrics import machine, versions
from .served import ServeProcess
from .workloads import QUESTIONS, SYSTEM_PROMPT, w2_messages

DESKS = ["Lyon", "Grenoble", "Annecy", "Chambery", "Geneva", "Turin", "Bern", "Nice"]


RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}


def _server(name: str, flags: list[str], log_dir: Path) -> ServeProcess:
    """One ``llamawrapper serve smollm2`` process (plain or ``--ray``), its log ``<name>.log``."""
    return ServeProcess(["smollm2", *flags], log_dir / f"{name}.log", env=RAY_ENV)


async def _one(client: Any, messages: list[dict], max_tokens: int) -> dict:
    start = time.perf_counter()
    ttft: Optional[float] = None
    usage = None
    stream = await client.chat.completions.create(model="smollm2", messages=messages, max_tokens=max_tokens, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start
        usage = chunk.usage or usage
    return {"ttft": ttft if ttft is not None else time.perf_counter() - start, "tokens": usage.completion_tokens,
            "prompt": usage.prompt_tokens, "cached": (usage.prompt_tokens_details.cached_tokens or 0)
            if usage.prompt_tokens_details else 0}


async def _run(url: str, jobs: list[list[dict]], concurrency: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def guarded(messages):
        async with gate:
            return await _one(client, messages, max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(guarded(m) for m in jobs))
    wall = time.perf_counter() - start
    await client.close()
    ttfts = sorted(r["ttft"] for r in results)
    return {"requests": len(results), "wall_s": wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_median_s": statistics.median(ttfts), "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))],
            "prefix_hit_rate": sum(r["cached"] for r in results) / max(1, sum(r["prompt"] for r in results))}


def _median_of(rounds: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def overhead(log_dir: Path, rounds: int, threads: int, max_tokens: int, blocks: int = 2) -> dict:
    """Plain server vs the Ray app at one replica, 16 concurrent streaming chats (W2), in
    alternating blocks (plain, ray, plain, ray, ...) so a shared machine's drift hits both."""
    jobs = [w2_messages(i) for i in range(16)]
    systems = {"plain": ["--threads", str(threads)],
               "ray-1-replica": ["--ray", "--replicas", "1", "--threads", str(threads)]}
    out: dict[str, Any] = {name: {"rounds": []} for name in systems}
    for _ in range(blocks):
        for name, flags in systems.items():  # one at a time: two servers would share the cores
            server = _server(name, flags, log_dir).wait_ready(300)
            try:
                asyncio.run(_run(server.url, jobs[:4], 4, 8))  # warm-up: first-call costs, prefix cache
                out[name]["rounds"] += [asyncio.run(_run(server.url, jobs, 16, max_tokens)) for _ in range(rounds)]
            finally:
                server.stop()
    for name in systems:
        out[name]["median"] = _median_of(out[name]["rounds"])
    out["ratio_tokens_per_s"] = out["ray-1-replica"]["median"]["tokens_per_s"] / out["plain"]["median"]["tokens_per_s"]
    out["ratio_ttft_median"] = out["ray-1-replica"]["median"]["ttft_median_s"] / out["plain"]["median"]["ttft_median_s"]
    return out


def routing_jobs() -> list[list[dict]]:
    """8 system prompts (distinct from their first words) x 8 questions, interleaved."""
    systems = [f"You answer for the {desk} desk. " + SYSTEM_PROMPT for desk in DESKS]
    return [[{"role": "system", "content": systems[s]}, {"role": "user", "content": QUESTIONS[q]}]
            for q in range(8) for s in range(8)]


def routing(log_dir: Path, rounds: int, max_tokens: int, prefix_cache_mb: Optional[float], concurrency: int) -> dict:
    """Two replicas, one thread each: power of two choices vs prefix-aware routing."""
    jobs = routing_jobs()
    extra = ["--prefix-cache-mb", str(prefix_cache_mb)] if prefix_cache_mb else []
    out: dict[str, Any] = {}
    for policy in ("pow2", "prefix"):
        flags = ["--ray", "--replicas", "2", "--threads", "1", "--routing", policy, *extra]
        results = []
        for _ in range(rounds):  # a fresh app per round: empty prefix caches, empty routing table
            server = _server(f"routing-{policy}", flags, log_dir).wait_ready(300)
            try:
                results.append(asyncio.run(_run(server.url, jobs, concurrency, max_tokens)))
            finally:
                server.stop()
        out[policy] = {"rounds": results, "median": _median_of(results)}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/scale.json")
    ap.add_argument("--rounds", type=int, default=2, help="Measured rounds per block of the overhead comparison.")
    ap.add_argument("--blocks", type=int, default=2, help="Alternating blocks (plain, ray) of the overhead comparison.")
    ap.add_argument("--threads", type=int, default=2, help="Torch threads of the one-replica comparison (both systems).")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--routing-max-tokens", type=int, default=16)
    ap.add_argument("--routing-rounds", type=int, default=1)
    ap.add_argument("--routing-concurrency", type=int, default=4)
    ap.add_argument("--prefix-cache-mb", type=float, default=None, help="Per replica in the routing comparison (default: the engine's).")
    ap.add_argument("--only", choices=["overhead", "routing"], default=None)
    args = ap.parse_args(argv)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out_path.parent / "scale-logs"
    log_dir.mkdir(exist_ok=True)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "versions": versions(), "settings": vars(args),
                              "command": "python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:])}
    try:
        from importlib import metadata

        report["versions"]["ray"] = metadata.version("ray")
    except Exception:
        report["versions"]["ray"] = None
    if args.only in (None, "overhead"):
        report["overhead"] = overhead(log_dir, args.rounds, args.threads, args.max_tokens, args.blocks)
        print(json.dumps({k: v for k, v in report["overhead"].items() if k.startswith("ratio")}
                         | {k: v["median"] for k, v in report["overhead"].items() if isinstance(v, dict)}, indent=1))
    if args.only in (None, "routing"):
        report["routing"] = routing(log_dir, args.routing_rounds, args.routing_max_tokens, args.prefix_cache_mb,
                                    args.routing_concurrency)
        print(json.dumps({k: v["median"] for k, v in report["routing"].items()}, indent=1))
    report["loadavg_at_end"] = list(os.getloadavg())
    out_path.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
