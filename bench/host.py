"""``python -m bench.host``: many models in one process, measured side by side in one run.

Single-stream greedy decode (``--tokens`` new tokens, EOS ignored) of model ``a``:

- alone (only ``a`` loaded), measured before *and* after the next phase (A-B-A, medians);
- beside two more loaded models that have each served a request (``b``: the same weights,
  ``c``: int8), idle;
- with ``a`` and ``b`` busy at once: their aggregate against ``a`` alone;
- the design it replaced, emulated: every engine on a thread of its own (a second executor),
  idle and busy; and one worker process per model, two busy at once;
- a new model loading while ``a`` serves: ``a``'s tokens/s during the load against before, with
  the load in the loader process (started beforehand, as the host does) and in this process;
- a hot swap through ``ModelHost``: time from ``put`` to the new version serving, and the
  throughput of 4 concurrent streams during the swap against before it.

Writes ``--out``/host.json and host.png and prints a table. The machine is shared and noisy:
compare the ratios of one run, never figures from another day."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .metrics import machine, versions

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def _params(tokens: int) -> Any:
    from llamawrapper import SamplingParams

    return SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)


def decode_tps(llm: Any, tokens: int) -> float:
    """Tokens/s of one greedy stream, from its first token to its last (prefill excluded)."""
    ids = llm.tokenize(PROMPT, add_special_tokens=True)
    first = last = None
    n = 0
    for event in llm.submit(ids, _params(tokens)):
        now = time.perf_counter()
        first = first or now
        last = now
        n += len(event.token_ids)
    return (n - 1) / (last - first) if n > 1 and last > first else 0.0


def busy_together(models: list[Any], tokens: int) -> float:
    """Aggregate decode tokens/s of one stream on each model at once."""
    out: list[tuple[int, float, float]] = []
    ids = models[0].tokenize(PROMPT, add_special_tokens=True)

    def run(llm: Any) -> None:
        t0, n = None, 0
        for event in llm.submit(ids, _params(tokens)):
            t0 = t0 or time.perf_counter()
            n += len(event.token_ids)
        out.append((n - 1, t0, time.perf_counter()))

    threads = [threading.Thread(target=run, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    span = max(o[2] for o in out) - min(o[1] for o in out)  # first token of any to last token of all
    return sum(o[0] for o in out) / span if span > 0 else 0.0


def reps(fn: Callable[[], float], n: int) -> list[float]:
    return [round(fn(), 2) for _ in range(n)]


def own_thread(llm: Any) -> None:
    """Emulate the old design: move the engine onto an executor (thread) of its own."""
    from llamawrapper.engine.executor import Executor

    llm.engine.executor.detach(llm.engine)
    llm.engine.executor = Executor(name="bench-own-thread")
    llm.engine.executor.attach(llm.engine)


def _process_worker(source: str, tokens: int, barrier: Any, queue: Any) -> None:
    from llamawrapper import LlamaWrapper

    llm = LlamaWrapper.load(source, progress=False)
    decode_tps(llm, 8)
    barrier.wait()
    queue.put(busy_together([llm], tokens))
    llm.close()


def process_per_model(source: str, tokens: int, workers: int = 2) -> float:
    """Aggregate tokens/s of ``workers`` processes, each one model, decoding at once."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(source, tokens, barrier, queue)) for _ in range(workers)]
    for p in procs:
        p.start()
    total = sum(queue.get(timeout=900) for _ in procs)
    for p in procs:
        p.join(60)
    return round(total, 2)


def load_while_serving(llm: Any, load: Callable[[], Any], tokens: int) -> dict[str, float]:
    """``llm``'s decode tokens/s while ``load()`` runs, against just before it."""
    before = statistics.median(reps(lambda: decode_tps(llm, tokens), 2))
    stamps: list[float] = []
    stop = threading.Event()

    def serve() -> None:
        ids = llm.tokenize(PROMPT, add_special_tokens=True)
        while not stop.is_set():
            for _ in llm.submit(ids, _params(tokens)):
                stamps.append(time.perf_counter())

    t = threading.Thread(target=serve)
    t.start()
    time.sleep(1.0)
    t0 = time.perf_counter()
    loaded = load()
    t1 = time.perf_counter()
    stop.set()
    t.join()
    if hasattr(loaded, "close"):
        loaded.close()
    during = sum(1 for s in stamps if t0 <= s <= t1) / (t1 - t0)
    return {"before_tps": round(before, 2), "during_tps": round(during, 2), "load_s": round(t1 - t0, 2),
            "ratio": round(during / before, 3) if before else None, "loaded": loaded is not None}


def _in_process(fn: Callable[[], Any]) -> Any:
    """``fn()`` with loads kept in this process (the design before the loader process)."""
    import os

    old = os.environ.get("LLAMAWRAPPER_LOAD_PROCESS")
    os.environ["LLAMAWRAPPER_LOAD_PROCESS"] = "0"
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("LLAMAWRAPPER_LOAD_PROCESS", None)
        else:
            os.environ["LLAMAWRAPPER_LOAD_PROCESS"] = old


def swap(source: str, tokens: int, clients: int = 4) -> dict[str, Any]:
    """Throughput of ``clients`` streams through a ModelHost before and during a hot swap."""
    from llamawrapper.models.host import ModelHost
    from llamawrapper.models.loaders import default_loader

    host = ModelHost(default_loader())
    host.put("chat", source, wait=True)
    stamps: list[tuple[float, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            with host.acquire("chat") as lease:
                ids = lease.model.tokenize(PROMPT, add_special_tokens=True)
                handle = lease.model.submit(ids, _params(tokens))
                version = lease.version
            for _ in handle:
                stamps.append((time.perf_counter(), version))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(8)
    t_put = time.perf_counter()
    host.put("chat", {"source": source, "dtype": "bfloat16"})
    serving = None
    while serving is None:
        with host.acquire("chat") as lease:
            if lease.version == "v2":
                serving = time.perf_counter()
        time.sleep(0.01)
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    host.close()

    def rate(a: float, b: float) -> float:
        return sum(1 for s, _ in stamps if a <= s <= b) / (b - a)

    before = rate(t_put - 6, t_put)
    during = rate(t_put, serving)
    return {"put_to_serving_s": round(serving - t_put, 2), "before_tps": round(before, 2), "during_tps": round(during, 2),
            "ratio": round(during / before, 3) if before else None, "clients": clients,
            "v2_tokens_after": sum(1 for s, v in stamps if s > serving and v == "v2")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="Source of the models (default: smollm2).")
    ap.add_argument("--tokens", type=int, default=96, help="New tokens per stream.")
    ap.add_argument("--reps", type=int, default=3, help="Repetitions per condition.")
    ap.add_argument("--quant", default="int8", help="Quantization of the third model (c); 'none' for plain.")
    ap.add_argument("--skip-processes", action="store_true", help="Skip the process-per-model comparison.")
    ap.add_argument("--out", default="docs/figures", help="Folder for host.json and host.png.")
    args = ap.parse_args(argv)
    from llamawrapper import LlamaWrapper

    t_start = time.time()
    doc: dict[str, Any] = {"command": "python -m bench.host " + " ".join(argv if argv is not None else sys.argv[1:]),
                           "machine": machine(), "versions": versions(), "settings": vars(args), "results": {}}
    r = doc["results"]
    tok, n = args.tokens, args.reps
    load = lambda **kw: LlamaWrapper.load(args.model, progress=False, **kw)  # noqa: E731
    a = load()
    decode_tps(a, 8)  # warm-up
    alone1 = reps(lambda: decode_tps(a, tok), n)
    b = load()
    c = load(quantization=None if args.quant == "none" else args.quant)
    for m in (b, c):
        decode_tps(m, 4)  # each has served a request
    beside = reps(lambda: decode_tps(a, tok), n)
    two_busy = reps(lambda: busy_together([a, b], tok), n)
    c.close()
    r["load_while_serving_in_process"] = _in_process(lambda: load_while_serving(a, lambda: load(), tok))
    from llamawrapper.models.load_process import get_load_process

    get_load_process().start(wait=True)  # as the host does once its first chat model is ready
    r["load_while_serving"] = load_while_serving(a, lambda: load(), tok)
    alone2 = reps(lambda: decode_tps(a, tok), n)
    alone = statistics.median(alone1 + alone2)
    r["alone_tps"] = alone1 + alone2
    r["beside_two_idle_tps"] = beside
    r["two_busy_aggregate_tps"] = two_busy
    own_thread(b)  # the design before the executor: b's engine on a thread of its own
    decode_tps(b, 4)
    r["old_design_beside_idle_tps"] = reps(lambda: decode_tps(a, tok), n)
    r["old_design_two_busy_aggregate_tps"] = reps(lambda: busy_together([a, b], tok), n)
    b.close()
    a.close()
    if not args.skip_processes:
        r["process_per_model_two_busy_aggregate_tps"] = [process_per_model(args.model, tok) for _ in range(max(1, n - 1))]
    r["swap"] = swap(args.model, max(16, tok // 3))
    med = lambda key: statistics.median(r[key]) if r.get(key) else None  # noqa: E731
    ratio = lambda x: round(x / alone, 3) if x and alone else None  # noqa: E731
    doc["ratios"] = [
        {"name": "one busy beside two idle loaded models / alone", "value": ratio(med("beside_two_idle_tps")), "target": ">= 0.95"},
        {"name": "two busy, aggregate / one alone", "value": ratio(med("two_busy_aggregate_tps")), "target": ">= 0.9"},
        {"name": "serving while a model loads (loader process) / before", "value": r["load_while_serving"]["ratio"], "target": ">= 0.8"},
        {"name": "serving while a model loads in the serving process / before",
         "value": r["load_while_serving_in_process"]["ratio"], "target": None},
        {"name": "old design (thread per engine): one busy beside one idle / alone",
         "value": ratio(med("old_design_beside_idle_tps")), "target": None},
        {"name": "old design (thread per engine): two busy aggregate / alone",
         "value": ratio(med("old_design_two_busy_aggregate_tps")), "target": None},
        {"name": "process per model: two busy aggregate / alone",
         "value": ratio(med("process_per_model_two_busy_aggregate_tps")), "target": None},
        {"name": "swap: throughput during / before", "value": r["swap"]["ratio"], "target": None},
    ]
    doc["duration_s"] = round(time.time() - t_start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host.json").write_text(json.dumps(doc, indent=2))
    _plot(doc, out / "host.png")
    print(f"a alone: median {alone:.1f} tok/s over {r['alone_tps']}")
    print("| ratio | value | target |\n|---|---|---|")
    for row in doc["ratios"]:
        print(f"| {row['name']} | {row['value']} | {row['target'] or ''} |")
    print(f"swap: put -> serving {r['swap']['put_to_serving_s']} s; load while serving: {r['load_while_serving']}; "
          f"in process: {r['load_while_serving_in_process']}")
    return 0


def _plot(doc: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [x for x in doc["ratios"] if x["value"] is not None]
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.5 * len(rows)))
    ax.barh([x["name"] for x in rows], [x["value"] for x in rows], color="#4c72b0")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("ratio (one run, side by side)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
