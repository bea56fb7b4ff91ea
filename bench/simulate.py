"""A small queueing model of the Ray app at 1-64 replicas (issue 12): what this 2-core machine
cannot measure, projected from what it can. Two steps, both in this module:

1. ``measure``: one replica's figures on the real engine (``LlamaWrapper.load``, one process,
   ``--threads`` torch threads): the decode step time with k requests in the batch (k = 1, 2,
   4, ... ``max_batch``; each point is k concurrent streams started together, step time = the
   median over the streams of (last token - first token) / (tokens - 1)) and the prefill time
   per prompt token (one request alone, a cold ~300-token prompt, ``max_tokens=1``). Written
   as JSON (``--profile-out``); ``--profile`` reads one back instead of measuring.
2. ``simulate``: a discrete-event model of n replicas behind one router under Poisson arrivals,
   for each routing policy, at offered loads given as a fraction of n x one replica's capacity.

Assumptions (the model's, not facts about a cluster):
- Each replica has the measured machine to itself (one replica per node or per disjoint CPU
  set): replicas do not slow each other down, and the router and proxy are never the
  bottleneck (Ray runs one proxy per node); each request pays a fixed ``hop_s`` for the proxy
  hop (default 5 ms).
- A replica runs continuous batching as the engine does: up to ``max_batch`` requests decode
  together; a step with k requests takes ``step_s(k)`` (linear between measured k, extended
  linearly past the largest); a request that joins pays its uncached prompt tokens x
  ``prefill_s_per_token`` inside the step it joins (prefill is not batched more cleverly than
  that); it then needs ``new_tokens`` decode steps. Requests wait in a per-replica FIFO.
- Routing happens on arrival, with exact knowledge of each replica's load (running + waiting):
  ``round_robin``; ``least_loaded`` (join the shortest queue: an upper bound for Ray's
  power-of-two-choices); ``prefix`` (the replica that last received this system prompt, unless
  its load exceeds the least loaded one's by more than ``imbalance``, as ``deploy/routing.py``).
- The workload: ``prompts`` distinct system prompts of ``system_tokens`` tokens, each request
  one of them (uniformly) plus ``question_tokens`` of its own, ``new_tokens`` generated. Each
  replica's prefix cache holds ``cache_prompts`` system prompts (LRU): a request whose system
  prompt is held pays prefill for its question tokens only. This is the hit-rate effect: the
  hit rate is not assumed, it follows from routing and cache size, and is reported.
- No failures, no autoscaling lag, no network variance, no output-length variance.

    python -m bench.simulate --out bench/results/simulate.json                  # measure, then simulate
    python -m bench.simulate --profile bench/results/simulate.json --out ...    # reuse the measured figures
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

POLICIES = ("round_robin", "least_loaded", "prefix")
REPLICAS = (1, 2, 4, 8, 16, 32, 64)


# -- 1. one replica's figures ------------------------------------------------------------------
def _stream_times(llm: Any, prompt: list[int], max_tokens: int, go: threading.Event, out: list) -> None:
    go.wait()
    start, times = time.perf_counter(), []
    for event in llm.stream_generate(prompt, max_tokens=max_tokens, temperature=0, cache=False):
        now = time.perf_counter()
        times.extend([now] * max(len(event.token_ids), 1 if event.text else 0))
    out.append((start, times))


def measure(model: str = "smollm2", threads: int = 1, max_batch: int = 16, new_tokens: int = 16,
            prompt_tokens: int = 300) -> dict:
    """One replica's step time per batch size and prefill time per token, on the real engine."""
    from llamawrapper import LlamaWrapper

    batches = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= max_batch]
    with LlamaWrapper.load(model, engine={"threads": threads, "max_batch_size": max(batches)}) as llm:
        filler = llm.tokenize(" ".join(["The support desk answers questions about orders and refunds."] * 60))

        def prompt(tag: int, length: int) -> list[int]:  # distinct from its first token: no prefix reuse
            return llm.tokenize(f"Request {tag}:")[:8] + filler[: max(1, length - 8)]

        for _ in range(2):  # warm-up
            list(llm.stream_generate(prompt(-1, 32), max_tokens=4, temperature=0, cache=False))
        tag = 0
        steps = []
        for k in batches:
            go, out, workers = threading.Event(), [], []
            for _ in range(k):
                tag += 1
                workers.append(threading.Thread(target=_stream_times, args=(llm, prompt(tag, 24), new_tokens, go, out)))
                workers[-1].start()
            go.set()
            for w in workers:
                w.join()
            per = [(t[-1] - t[0]) / (len(t) - 1) for _, t in out if len(t) > 1]
            steps.append(statistics.median(per) if per else float("nan"))
        prefill = []
        for _ in range(3):
            tag += 1
            go, out = threading.Event(), []
            go.set()
            _stream_times(llm, prompt(tag, prompt_tokens), 1, go, out)
            start, times = out[0]
            prefill.append((times[0] - start) / prompt_tokens if times else float("nan"))
    return {"model": model, "threads": threads, "new_tokens_measured": new_tokens, "batch_sizes": batches,
            "step_s": steps, "prefill_s_per_token": statistics.median(prefill), "prompt_tokens_measured": prompt_tokens}


# -- 2. the model --------------------------------------------------------------------------------
@dataclass
class Workload:
    prompts: int = 32
    system_tokens: int = 300
    question_tokens: int = 20
    new_tokens: int = 64
    cache_prompts: int = 4
    hop_s: float = 0.005
    imbalance: int = 4


def step_time(profile: dict, k: int) -> float:
    """``step_s(k)``: linear between the measured batch sizes, extended past the ends."""
    xs, ys = profile["batch_sizes"], profile["step_s"]
    if len(xs) == 1:
        return ys[0]
    if k <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if k <= xs[i] or i == len(xs) - 1:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return max(ys[0], y0 + (y1 - y0) * (k - x0) / (x1 - x0))
    return ys[-1]


def capacity(profile: dict, w: Workload, max_batch: int) -> float:
    """Requests/s one replica sustains with full batches, every prompt cold (a lower bound
    on what routing can reach; used only to scale the offered load)."""
    per_batch = step_time(profile, max_batch) * w.new_tokens + max_batch * (w.system_tokens + w.question_tokens) * profile["prefill_s_per_token"]
    return max_batch / per_batch


@dataclass
class _Replica:
    running: list = field(default_factory=list)     # [request, tokens left]
    waiting: deque = field(default_factory=deque)
    cache: "OrderedDict[int, None]" = field(default_factory=OrderedDict)
    busy: bool = False

    @property
    def load(self) -> int:
        return len(self.running) + len(self.waiting)


def simulate(profile: dict, replicas: int, policy: str, load: float, w: Workload, max_batch: int,
             requests: int, seed: int = 0) -> dict:
    """One run: ``requests`` Poisson arrivals at ``load`` x n x one replica's capacity."""
    rng = random.Random(seed)
    rate = load * replicas * capacity(profile, w, max_batch)
    pool = [_Replica() for _ in range(replicas)]
    owner: dict[int, int] = {}
    per_token = profile["prefill_s_per_token"]
    events: list = []  # (time, seq, kind, payload)
    t, seq = 0.0, 0
    arrivals = []
    for i in range(requests):
        t += rng.expovariate(rate)
        arrivals.append(t)
        events.append((t, i, "arrive", {"id": i, "arrive": t, "prompt": rng.randrange(w.prompts)}))
    heapq.heapify(events)
    seq = requests
    rr, done, hits, lookups = 0, [], 0, 0

    def start_step(r: int, now: float) -> None:
        nonlocal seq, hits, lookups
        rep = pool[r]
        joined = 0.0
        while rep.waiting and len(rep.running) < max_batch:
            req = rep.waiting.popleft()
            lookups += 1
            if req["prompt"] in rep.cache:
                hits += 1
                rep.cache.move_to_end(req["prompt"])
                joined += w.question_tokens * per_token
            else:
                joined += (w.system_tokens + w.question_tokens) * per_token
                rep.cache[req["prompt"]] = None
                while len(rep.cache) > w.cache_prompts:
                    rep.cache.popitem(last=False)
            rep.running.append([req, w.new_tokens])
        rep.busy = True
        seq += 1
        heapq.heappush(events, (now + joined + step_time(profile, len(rep.running)), seq, "step", r))

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            loads = [rep.load for rep in pool]
            if policy == "round_robin":
                r, rr = rr % replicas, rr + 1
            elif policy == "least_loaded":
                r = min(range(replicas), key=loads.__getitem__)
            else:
                least = min(range(replicas), key=loads.__getitem__)
                r = owner.get(payload["prompt"], least)
                if loads[r] - loads[least] > w.imbalance:
                    r = least
                owner[payload["prompt"]] = r
            pool[r].waiting.append(payload)
            if not pool[r].busy:
                start_step(r, now)
            continue
        rep = pool[payload]
        still = []
        for item in rep.running:
            req, left = item
            if left == w.new_tokens:
                req["ttft"] = now - req["arrive"] + w.hop_s
            item[1] = left - 1
            if item[1] == 0:
                done.append((req["ttft"], now - req["arrive"] + w.hop_s, now, req["id"]))
            else:
                still.append(item)
        rep.running = still
        rep.busy = False
        if rep.running or rep.waiting:
            start_step(payload, now)

    skip = requests // 10  # the first tenth of the arrivals is warm-up (empty queues, cold caches)
    done = [d for d in done if d[3] >= skip]
    latencies = sorted(d[1] for d in done)
    ttfts = sorted(d[0] for d in done)
    # throughput: completions while requests still arrive (after the warm-up), so the drain
    # of what is left queued at the end does not count; past capacity this is the capacity
    window = (arrivals[skip], arrivals[-1])
    finished = sum(window[0] <= d[2] <= window[1] for d in done)
    span = window[1] - window[0]
    return {"replicas": replicas, "policy": policy, "load": load, "offered_rps": rate, "requests": requests,
            "throughput_rps": finished / span if span > 0 else float("nan"),
            "tokens_per_s": finished * w.new_tokens / span if span > 0 else float("nan"),
            "latency_p50_s": _pct(latencies, 50), "latency_p99_s": _pct(latencies, 99),
            "ttft_p50_s": _pct(ttfts, 50), "ttft_p99_s": _pct(ttfts, 99),
            "prefix_hit_rate": hits / lookups if lookups else 0.0, "warmup_requests_left_out": skip}


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def run(profile: dict, w: Workload, max_batch: int, replicas=REPLICAS, loads=(0.5, 0.9, 1.2),
        requests_per_replica: int = 100, min_requests: int = 800, policies=POLICIES) -> list[dict]:
    rows = []
    for n in replicas:
        for load in loads:
            for policy in policies:
                rows.append(simulate(profile, n, policy, load, w, max_batch, max(min_requests, requests_per_replica * n),
                                     seed=n * 1000 + int(load * 100)))
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| replicas | load | policy | req/s | tokens/s | p50 latency s | p99 latency s | p99 TTFT s | prefix hits |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['replicas']} | {r['load']:.2f} | {r['policy']} | {r['throughput_rps']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | {r['ttft_p99_s']:.2f} | {r['prefix_hit_rate']:.0%} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--measure-tokens", type=int, default=16, help="new tokens per stream while measuring")
    ap.add_argument("--profile", help="read the single-replica figures from this JSON (a previous --out)")
    ap.add_argument("--replicas", default=",".join(map(str, REPLICAS)))
    ap.add_argument("--loads", default="0.5,0.9,1.2")
    ap.add_argument("--requests-per-replica", type=int, default=100)
    ap.add_argument("--min-requests", type=int, default=800)
    for name, value in vars(Workload()).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args(argv)
    began = time.time()
    if args.profile:
        profile = json.loads(Path(args.profile).read_text())["profile"]
    else:
        profile = measure(args.model, args.threads, args.max_batch, args.measure_tokens)
    w = Workload(**{k: getattr(args, k) for k in vars(Workload())})
    sim_began = time.perf_counter()
    rows = run(profile, w, args.max_batch, [int(x) for x in args.replicas.split(",")],
               [float(x) for x in args.loads.split(",")], args.requests_per_replica, args.min_requests)
    doc: dict[str, Any] = {"command": " ".join(["python -m bench.simulate", *(argv if argv is not None else sys.argv[1:])]),
                           "profile": profile, "workload": vars(w), "max_batch": args.max_batch,
                           "replica_capacity_rps": capacity(profile, w, args.max_batch),
                           "simulation_s": time.perf_counter() - sim_began, "rows": rows, "started": began}
    try:
        from .metrics import machine, versions

        doc["machine"], doc["versions"] = machine(), versions()
    except Exception as exc:  # the figures stand without them
        doc["machine"] = {"error": repr(exc)}
    print(json.dumps({k: profile[k] for k in ("batch_sizes", "step_s", "prefill_s_per_token")}))
    print(_table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
