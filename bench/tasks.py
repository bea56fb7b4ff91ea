"""Task pipelines benchmark (issue 10): accuracy of the offline defaults on the labelled data in
``bench/data`` and speed against the peers, side by side in one run.

    python -m bench.tasks                 # everything; writes bench/results/tasks-<time>.json (+ tasks-latest.json)
    python -m bench.tasks --quick         # fewer rounds and texts (smoke run)
    python -m bench.tasks --parts embed   # only some parts: accuracy, embed, http, image, profile (comma-separated)

Accuracy (in this process): sentiment (``pipeline("sentiment-analysis")``, minilm prototypes) on
bench/data/sentiment.tsv; zero-shot topics (``pipeline("zero-shot-classification")``) on
bench/data/news.tsv; classifiers from 20 examples per label (logistic regression on minilm
embeddings) tested on the other items of each file.

Speed (each measurement in its own worker process, systems alternated round by round, medians:
two systems in one process would share the cores through two OpenMP teams):
- embeddings, one call of N texts: this library vs sentence-transformers' ``encode`` (batch 32);
- embeddings, one text per call, in turn: this library's ``emb(text)`` vs ``encode(text)``;
- embeddings, one text per request: sentence-transformers one ``encode`` per text (a server without
  batching) vs this server with 32 concurrent HTTP clients (micro-batching), and with one client;
- text-to-image: seconds per denoising step, this library vs plain diffusers on the same tiny
  random pipeline (built from small configs; no diffusion weights are installable here).

``--parts profile`` (not in the default run) profiles the one-text path in one process, calls
interleaved in random order: ``pipeline`` as it is, the same with the batching window always waited
(the rule before a lone request went at once), the encoder's forward alone on the executor thread,
an empty executor round trip, and sentence-transformers ``encode(text)``; milliseconds per text."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data"
TOPIC_LABELS = {"world": "world news and politics", "sports": "sports", "business": "business and the economy",
                "science": "science and technology"}


def read_tsv(name: str) -> list[tuple[str, str]]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()[1:]
    return [(label, text) for label, text in (line.split("\t", 1) for line in lines if line.strip())]


# -- accuracy ---------------------------------------------------------------------------------------------
def accuracy(seed: int = 0) -> dict:
    from llamawrapper import pipeline

    sentiment, news = read_tsv("sentiment.tsv"), read_tsv("news.tsv")
    out: dict = {}
    with pipeline("sentiment-analysis") as clf:
        predicted = [r["label"] for r in clf([t for _, t in sentiment])]
    out["sentiment_minilm"] = _score(predicted, [lab for lab, _ in sentiment])
    with pipeline("zero-shot-classification") as zs:
        names = {v: k for k, v in TOPIC_LABELS.items()}
        results = zs([t for _, t in news], candidate_labels=list(TOPIC_LABELS.values()))
        predicted = [names[r["labels"][0]] for r in results]
    out["topics_zero_shot_minilm"] = _score(predicted, [lab for lab, _ in news])
    for name, rows in (("sentiment", sentiment), ("topics", news)):
        train, test = _split(rows, 20, seed)
        with pipeline("text-classification", examples=[(t, lab) for lab, t in train]) as fitted:
            predicted = [r["label"] for r in fitted([t for _, t in test])]
        out[f"{name}_from_20_examples_per_label"] = _score(predicted, [lab for lab, _ in test])
    return out


def _split(rows: list[tuple[str, str]], per_label: int, seed: int) -> tuple[list, list]:
    rng = random.Random(seed)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    train, test, taken = [], [], {}
    for label, text in shuffled:
        if taken.get(label, 0) < per_label:
            taken[label] = taken.get(label, 0) + 1
            train.append((label, text))
        else:
            test.append((label, text))
    return train, test


def _score(predicted: list[str], truth: list[str]) -> dict:
    correct = sum(p == t for p, t in zip(predicted, truth))
    return {"n": len(truth), "correct": correct, "accuracy": round(correct / len(truth), 4)}


# -- speed workers (one process per measurement) --------------------------------------------------------------
def worker(kind: str, texts: list[str], reps: int, extra: dict) -> dict:
    """Run one timed measurement in this process; returns rates."""
    if kind == "lib_embed":
        from llamawrapper import pipeline

        emb = pipeline("feature-extraction", max_batch=32)
        emb(texts[:32])
        return {"seconds": _times(lambda: emb(texts), reps)}
    if kind == "lib_embed_one_by_one":
        from llamawrapper import pipeline

        emb = pipeline("feature-extraction", max_batch=32)
        emb(texts[:4])
        return {"seconds": _times(lambda: [emb(t) for t in texts], reps)}
    if kind == "st_embed":
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(extra["folder"], device="cpu")
        st.encode(texts[:32], batch_size=32, normalize_embeddings=True)
        return {"seconds": _times(lambda: st.encode(texts, batch_size=32, normalize_embeddings=True), reps)}
    if kind == "st_embed_one_by_one":
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(extra["folder"], device="cpu")
        st.encode(texts[:4], normalize_embeddings=True)
        return {"seconds": _times(lambda: [st.encode(t, normalize_embeddings=True) for t in texts], reps)}
    if kind in ("lib_image", "diffusers_image"):
        steps = extra["steps"]
        if kind == "lib_image":
            from llamawrapper import pipeline

            gen = pipeline("text-to-image", model=extra["folder"])
            run = lambda: gen("a red square", num_inference_steps=steps, seed=1, progress=False)  # noqa: E731
        else:
            import torch
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(extra["folder"], dtype=torch.float32)
            pipe.set_progress_bar_config(disable=True)
            run = lambda: pipe("a red square", num_inference_steps=steps,  # noqa: E731
                               generator=torch.Generator("cpu").manual_seed(1))
        run()
        return {"seconds": [s / steps for s in _times(run, reps)]}
    raise SystemExit(f"unknown worker {kind}")


def _times(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run_worker(kind: str, texts_file: Path, reps: int, extra: dict) -> dict:
    cmd = [sys.executable, "-m", "bench.tasks", "--worker", kind, "--texts", str(texts_file), "--reps", str(reps),
           "--extra", json.dumps(extra)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env())
    if res.returncode != 0:
        raise RuntimeError(f"worker {kind} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _env() -> dict:
    # every worker gets the OpenMP wait policy the library sets for itself on import: without it a
    # peer's workers spin, which on these shared cores made plain diffusers 2.5x slower per step
    # than the library in a first run, a difference of settings, not of code
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "10000")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def http_embeddings(texts: list[str], concurrency: int, rounds: int) -> list[float]:
    """Seconds for all ``texts`` as one-text requests from ``concurrency`` clients, per round."""
    import httpx

    sys.path.insert(0, str(ROOT / "tests"))
    from server_helpers import ServerProcess

    log = Path(tempfile.mkdtemp()) / "server.log"
    srv = ServerProcess(["minilm"], log_path=log)
    try:
        srv.wait_ready()

        async def one_round() -> float:
            queue = list(texts)
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                async def client() -> None:
                    while queue:
                        text = queue.pop()
                        r = await c.post("/v1/embeddings", json={"model": "minilm", "input": text, "encoding_format": "float"})
                        r.raise_for_status()

                t0 = time.perf_counter()
                await asyncio.gather(*[client() for _ in range(concurrency)])
                return time.perf_counter() - t0

        asyncio.run(one_round())  # warm-up
        return [asyncio.run(one_round()) for _ in range(rounds)]
    finally:
        srv.terminate()


PAIRS = {  # measurement: (this library's worker, the peer's worker)
    "embed_one_call": ("lib_embed", "st_embed"),
    "embed_one_text_per_call": ("lib_embed_one_by_one", "st_embed_one_by_one"),
    "image_seconds_per_step": ("lib_image", "diffusers_image"),
}


def speed(texts: list[str], rounds: int, reps: int, tiny_image_folder: Path, minilm_folder: Path,
          parts: set[str] = frozenset({"embed", "http", "image"})) -> dict:
    tmp = Path(tempfile.mkdtemp())
    texts_file = tmp / "texts.json"
    texts_file.write_text(json.dumps(texts))
    pairs = {k: v for k, v in PAIRS.items() if (k.startswith("image") and "image" in parts) or
             (k.startswith("embed") and "embed" in parts)}
    samples: dict[str, list[list[float]]] = {w: [] for pair in pairs.values() for w in pair}  # per round
    for r in range(rounds):  # alternate the order so drift in the machine's load hits both sides
        for name, pair in pairs.items():
            extra = {"folder": str(tiny_image_folder), "steps": 20} if name.startswith("image") else {"folder": str(minilm_folder)}
            n = 1 if name == "embed_one_text_per_call" else reps
            for kind in (pair if r % 2 == 0 else pair[::-1]):
                samples[kind].append(run_worker(kind, texts_file, n, extra)["seconds"])
    n = len(texts)
    out: dict = {"texts": n, "rounds": rounds}
    for name, (lib, peer) in pairs.items():
        lib_med = statistics.median(x for rnd in samples[lib] for x in rnd)
        peer_med = statistics.median(x for rnd in samples[peer] for x in rnd)
        # the machine's load drifts between rounds: a ratio within each round says more than pooled medians
        per_round = [statistics.median(p) / statistics.median(lb) for lb, p in zip(samples[lib], samples[peer])]
        if name.startswith("image"):  # seconds per step, lower is better: library / diffusers
            out[name] = {"library": round(lib_med, 5), "diffusers": round(peer_med, 5), "ratio": round(lib_med / peer_med, 3),
                         "ratio_per_round": [round(1 / x, 3) for x in per_round],
                         "ratio_median_of_rounds": round(1 / statistics.median(per_round), 3)}
        else:  # throughput, higher is better: library / sentence-transformers
            out[name] = {"library_texts_per_s": round(n / lib_med, 1), "st_texts_per_s": round(n / peer_med, 1),
                         "ratio": round(peer_med / lib_med, 3), "ratio_per_round": [round(x, 3) for x in per_round],
                         "ratio_median_of_rounds": round(statistics.median(per_round), 3),
                         "samples": samples[lib], "st_samples": samples[peer]}
    if "http" in parts:
        st_one = [x for rnd in samples.get("st_embed_one_by_one", []) for x in rnd] or \
            run_worker("st_embed_one_by_one", texts_file, 1, {"folder": str(minilm_folder)})["seconds"]
        http32 = http_embeddings(texts, 32, rounds)
        http1 = http_embeddings(texts, 1, 1)
        out["embed_per_request"] = {
            "server_32_clients_texts_per_s": round(n / statistics.median(http32), 1),
            "server_1_client_texts_per_s": round(n / http1[0], 1),
            "st_one_encode_per_text_texts_per_s": round(n / statistics.median(st_one), 1),
            "ratio_32_clients_vs_st_one_by_one": round(statistics.median(st_one) / statistics.median(http32), 3)}
    return out


def one_text_profile(texts: list[str], rounds: int) -> dict:
    """Milliseconds per one-text call of each variant (see the module docstring), medians of rounds."""
    from sentence_transformers import SentenceTransformer

    from llamawrapper import pipeline
    from llamawrapper.engine.executor import get_executor
    from llamawrapper.models import registry
    from llamawrapper.tasks.extract import extract_zip

    st = SentenceTransformer(str(extract_zip(registry.resolve("minilm"), progress=False)), device="cpu")
    emb = pipeline("feature-extraction")
    ex, batcher = get_executor(), emb.model.batcher

    def window_always(t: str) -> None:
        batcher._last_arrival = time.monotonic()  # looks like company: waits the window, as every call did before
        emb(t)

    variants = {"pipeline": emb, "pipeline_window_always_waited": window_always,
                "forward_on_executor": lambda t: ex.call(lambda: emb.model._forward(emb.model.token_ids([t]))).result(),
                "executor_round_trip": lambda t: ex.call(lambda: None).result(),
                "sentence_transformers": lambda t: st.encode(t, normalize_embeddings=True)}
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn(texts[0])
    rng = random.Random(0)
    for r in range(rounds):
        chunk = [texts[(r * 40 + i) % len(texts)] for i in range(40)]
        for name in rng.sample(list(variants), len(variants)):
            t0 = time.perf_counter()
            for t in chunk:
                variants[name](t)
            samples[name].append((time.perf_counter() - t0) / len(chunk))
    emb.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"ms_per_text": {k: round(1000 * v, 3) for k, v in med.items()}, "rounds": rounds,
            "st_over_pipeline": round(med["sentence_transformers"] / med["pipeline"], 3),
            "st_over_pipeline_window_always": round(med["sentence_transformers"] / med["pipeline_window_always_waited"], 3),
            "per_round_st_over_pipeline": [round(a / b, 3) for a, b in zip(samples["sentence_transformers"], samples["pipeline"])]}


def build_tiny_pipeline(out: Path, tokenizer_folder: Path) -> Path:
    """A Stable Diffusion pipeline from small configs (random weights), as in the tests."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tasks_fixtures

    return tasks_fixtures.build_tiny_diffusers(out, tokenizer_folder)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--worker")
    ap.add_argument("--texts")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--extra", default="{}")
    ap.add_argument("--parts", default="accuracy,embed,http,image", help="comma-separated: accuracy, embed, http, image")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of alternated measurements (default 3, quick 1)")
    args = ap.parse_args(argv)
    if args.worker:
        texts = json.loads(Path(args.texts).read_text())
        print(json.dumps(worker(args.worker, texts, args.reps, json.loads(args.extra))))
        return 0
    from llamawrapper.models import registry
    from llamawrapper.tasks.extract import extract_zip

    minilm = extract_zip(registry.resolve("minilm"), progress=False)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    t0 = time.time()
    acc = accuracy() if "accuracy" in parts else None
    print(json.dumps(acc, indent=2))
    texts = [t for _, t in read_tsv("sentiment.tsv") + read_tsv("news.tsv")]
    if args.quick:
        texts = texts[:64]
    image_folder = build_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny-sd", minilm)
    rounds = args.rounds or (1 if args.quick else 3)
    profile = one_text_profile(texts, max(rounds, 2) * 3) if "profile" in parts else None
    print(json.dumps(profile, indent=2))
    spd = speed(texts, rounds=rounds, reps=1 if args.quick else 3, tiny_image_folder=image_folder,
                minilm_folder=minilm, parts=parts)
    print(json.dumps({k: v for k, v in spd.items()}, indent=2, default=str))
    doc = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": round(time.time() - t0),
           "machine": _machine(), "accuracy": acc, "speed": spd, "one_text_profile": profile, "quick": args.quick,
           "parts": sorted(parts), "command": " ".join(["python -m bench.tasks"] + (argv if argv is not None else sys.argv[1:]))}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in (f"tasks-{stamp}", "tasks-latest"):
        (out / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str))
    print(f"wrote {out / f'tasks-{stamp}.json'}")
    return 0


def _machine() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "sentence-transformers", "diffusers", "scikit-learn"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "versions": versions, "commit": commit, "load_average": os.getloadavg()}


if __name__ == "__main__":
    sys.exit(main())
