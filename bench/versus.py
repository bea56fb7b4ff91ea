"""``python -m bench.versus``: this engine against llama.cpp on its own ground (issue 14), every
ratio of the issue measured in one run on one machine.

- **W1, single stream** (``w1_new_tokens`` = 128 new tokens, greedy, EOS ignored): llama.cpp's
  ``llama-bench -p 0 -n 128 -t THREADS`` (tg128; median of its repetitions) on the model's GGUF
  against this engine's decode tokens/s at fp32, bf16, int8 and int4 (``LlamaWrapper.load(...,
  dtype=, quantization=)``; median of ``decode_repeats`` W1 runs; decode = (n-1) / (last token -
  first token), which is what tg128 times). Each engine variant runs in its own process
  (``bench.worker``, workloads ``decode,prefill,ttft,w2``), one after another, with a short
  tg128 (``BESIDE_REPS`` repetitions) between them: a variant's W1 ratio to llama.cpp is against
  the mean of the two measured just before and just after it.
- **W2 over HTTP**: 16 concurrent streaming chats sharing the ~300-token support system prompt,
  64 new tokens each, sent together by the same ``openai`` client code to ``llamawrapper serve``
  (fp32 and int4) and to ``llama-server -np 16`` (``-c`` = 16 x 1024 tokens, so every slot holds
  a whole chat). Per server start: one short unrelated warm-up request, then the *cold* wave
  (questions 0-15: nothing cached) and the *warm* wave (questions 16-31: the system prompt is in
  the prefix cache / the slots). Aggregate tokens/s = completion tokens / wall time of the wave;
  TTFT from the wave's start to each stream's first text. Neither server has an HTTP
  ``ignore_eos`` in common (llama-server has one; this server ignores unknown fields), so every
  request carries ``logit_bias`` -100 on the end-of-generation tokens and every answer is checked
  to have exactly ``max_tokens`` completion tokens (``usage``). Servers run one at a time, in
  ``rounds`` rounds whose order alternates; medians over rounds.
- **Prefill**: tokens/s on a 1,000-token prompt (prompt tokens / TTFT, one new token, cache cleared;
  the engine) and llama.cpp's ``llama-bench -p 1000 -n 0`` (pp1000) beside it; the engine's TTFT
  with the cached ~300-token system prompt vs uncached (median of ``ttft_repeats`` pairs).
- ``--baseline REF``: the same engine workloads on an older commit's library (``git archive REF
  src``), in the same run: "today's" fp32 and prefill for the issue's ``>= 1.5x today's`` targets;
  an HTTP variant with ``+baseline`` (``fp32+baseline``) serves that library beside this one, for
  a change's A/B over HTTP (information, not a target). The baseline's C++ kernels are built once,
  in a folder of their own (``run.library_env``).

llama.cpp's binaries come from ``python -m bench.llamacpp build``; when they are not built, or the
model has no GGUF, llama.cpp is reported *unavailable* (with the reason) and its ratios are empty.

Writes ``--out``/versus-<time>.{json,png,md} and ``versus-latest.*``; prints the Markdown table.
The machine's CPU model and flags (avx2, avx512*, amx*) and its load average during each stage
are recorded. ``--quick``: tiny sizes for a smoke run (no figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from . import llamacpp
from .metrics import machine, percentile, versions
from .served import ServeProcess
from .workloads import BenchSettings

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # name -> bench.systems spec
    "fp32": "engine",
    "bf16": "engine:dtype=bfloat16",
    "int8": "engine:quantization=int8",
    "int4": "engine:quantization=int4",
    "w8a8": "engine:quantization=w8a8",
    "int4c": "engine:quantization=int4:compile_decode=1",  # int4 with the compiled decode step
}
SERVER_FLAGS = {"fp32": [], "bf16": ["--dtype", "bfloat16"], "int8": ["--quantization", "int8"], "int4": ["--quantization", "int4"],
                "w8a8": ["--quantization", "w8a8"], "int4c": ["--quantization", "int4"]}
SERVER_ENV = {"int4c": {"LLAMAWRAPPER_COMPILE_DECODE": "1"}}
# HTTP variants may add options after "+" (e.g. "fp32+unpinned"): measured beside the plain variant, not a target;
# "+baseline" serves the --baseline commit's library (flags: none; its kernels built apart), for an A/B of a change
# over HTTP in one run
SERVER_OPTIONS = {"unpinned": ["--no-pin-threads"], "baseline": []}
ENGINE_WORKLOADS = "decode,prefill,ttft,w2"


# -- stage helpers ----------------------------------------------------------------------------------
def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def resolve_gguf(model: str) -> tuple[Optional[Path], str]:
    """The model's GGUF file (what llama.cpp reads) and its quantization type, or (None, why not)."""
    from llamawrapper.models import registry

    source = registry.resolve(model)
    if source.kind != "gguf" or source.path is None:
        return None, f"the model {model!r} has no GGUF file for llama.cpp"
    return Path(source.path), gguf_type(Path(source.path))


def gguf_type(path: Path) -> str:
    """The GGUF's ``general.file_type`` as llama.cpp names it (e.g. Q4_1), and its tensor types."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it; present when GGUF loading works)
        from gguf import GGUFReader
        from gguf.constants import LlamaFileType
    except ImportError:
        return "unknown (gguf package missing)"
    reader = GGUFReader(str(path))
    field = reader.fields.get("general.file_type")
    name = "unknown"
    if field is not None:
        value = int(field.parts[field.data[0]][0])
        try:
            name = LlamaFileType(value).name.replace("MOSTLY_", "")
        except ValueError:
            name = str(value)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return f"{name} (tensors: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) + ")"


def _median(xs: list[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# -- llama-bench ------------------------------------------------------------------------------------
BESIDE_REPS = 2  # repetitions of the tg measured between engine variants (~4 s each for smollm2)

def llama_bench_stage(gguf: Optional[Path], why: str, threads: int, n_gen: int, n_prompt: int, reps: int) -> dict[str, Any]:
    """llama-bench tg (``-p 0 -n n_gen``) and pp (``-p n_prompt -n 0``), or why llama.cpp is unavailable."""
    ok, where = llamacpp.available()
    if not ok:
        return {"status": "unavailable", "reason": where}
    if gguf is None:
        return {"status": "unavailable", "reason": why}
    out: dict[str, Any] = {"status": "ok", "binaries": where, "version": llamacpp.version(), "build": llamacpp.build_info()}
    out["tg"] = llama_bench_one(gguf, "tg", 0, n_gen, reps, threads)
    out["pp"] = llama_bench_one(gguf, "pp", n_prompt, 0, max(1, min(reps, 3)), threads)
    return out


def llama_bench_one(gguf: Path, name: str, n_prompt: int, n_gen: int, reps: int, threads: int) -> dict[str, Any]:
    load0 = _load()
    try:
        rec = llamacpp.run_llama_bench(gguf, n_prompt=n_prompt, n_gen=n_gen, threads=threads, repetitions=reps)[0]
    except Exception as exc:  # reported, never replaced by a guess
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    samples = rec.get("samples_ts") or [rec.get("avg_ts")]
    # tokens the process computed: the repetitions plus llama-bench's warm-up (a whole prompt; one generated token)
    processed = n_prompt * (reps + 1) + n_gen * reps + (1 if n_gen else 0)
    cpu = rec.get("process_cpu_s")
    return {"test": f"{name}{n_prompt or n_gen}", "n_prompt": n_prompt, "n_gen": n_gen, "threads": rec.get("n_threads"),
            "repetitions": reps, "samples_ts": samples, "tokens_per_s": statistics.median(samples),
            "process_cpu_s": cpu, "tokens_per_cpu_s": processed / cpu if cpu else None,
            "avg_ts": rec.get("avg_ts"), "stddev_ts": rec.get("stddev_ts"), "type_k": rec.get("type_k"),
            "model_type": rec.get("model_type"), "cpu_info": rec.get("cpu_info"), "backends": rec.get("backends"),
            "build_commit": rec.get("build_commit"), "command": rec.get("command"),
            "loadavg_before": load0, "loadavg_after": _load()}


def tg_reference(cpp: dict, variant: Optional[str] = None, key: str = "tokens_per_s") -> Optional[float]:
    """llama.cpp's tg figure (``key``) the ratios use: for an engine ``variant``, the mean of the
    measurements taken just before and just after its process (``tg_beside``: a shared machine's
    speed moved by a third within a run, so a figure from minutes away did not compare); else the
    mean of the run's start and end measurements (A-B-A around the engine and HTTP stages), or
    the start one alone (also for a variant whose two beside it both failed)."""
    figures = lambda records: [x for x in (_get(r, key) for r in records) if x is not None]  # noqa: E731
    xs = figures((cpp.get("tg_beside") or {}).get(variant) or []) if variant else []
    xs = xs or figures([cpp.get(k) for k in ("tg", "tg_end")])  # (none beside it, or both failed)
    return sum(xs) / len(xs) if xs else None


# -- engine variants (one process each, through bench.run / bench.worker) ---------------------------
def engine_stage(variants: list[str], model: str, settings: BenchSettings, workloads: str, timeout: float,
                 baseline_src: Optional[Path], baseline_ref: Optional[str],
                 tg: Optional[Callable[[], dict[str, Any]]] = None) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Each engine variant in its own process, one after another; with ``tg`` (a short llama-bench
    tg), llama.cpp measured between them too: each variant's [before, after] records."""
    from .run import run_system

    ns = argparse.Namespace(model=model, workloads=workloads, timeout=timeout)
    out: dict[str, Any] = {}
    beside: dict[str, list[dict[str, Any]]] = {}
    todo = [(v, VARIANTS[v], None) for v in variants]
    if baseline_src is not None:
        todo.append((f"fp32@{baseline_ref}", VARIANTS["fp32"], baseline_src))
    before = tg() if tg else None
    for name, spec, src in todo:
        print(f"== engine {name} ({spec})", file=sys.stderr, flush=True)
        load0 = _load()
        r = run_system(spec, ns, settings, library_src=src)
        r["loadavg_before"], r["loadavg_after"] = load0, _load()
        out[name] = r
        print(f"== engine {name}: {r.get('status')} {r.get('reason', '')}", file=sys.stderr, flush=True)
        if tg and before is not None:
            after = tg()
            beside[name] = [before, after]
            before = after
    return out, beside


def baseline_source(ref: str, into: Path) -> Path:
    """``git archive REF src`` of this repository, extracted into ``into``; returns its ``src``."""
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", "--format=tar", commit, "src"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


# -- W2 over HTTP -----------------------------------------------------------------------------------
def _lw_server(model: str, variant: str, threads: int, log_path: Path, baseline: Optional[dict[str, str]] = None) -> ServeProcess:
    """``llamawrapper serve MODEL`` on loopback (one variant, with its ``+option``s; ``baseline``:
    the environment of the ``+baseline`` servers, ``run.library_env``)."""
    base, *options = variant.split("+")
    env = {"PYTHONWARNINGS": "ignore", **SERVER_ENV.get(base, {})}
    if "baseline" in options:
        if baseline is None:
            raise ValueError("an HTTP variant with '+baseline' needs --baseline REF")
        env.update(baseline)
    flags = [*SERVER_FLAGS[base], *(f for o in options for f in SERVER_OPTIONS[o])]
    return ServeProcess([model, "--threads", str(threads), *flags], log_path, env=env)


async def _stream_one(client: Any, model: str, messages: list[dict], max_tokens: int, bias: dict[str, int], t0: float) -> dict:
    ttft: Optional[float] = None
    usage, finish, timings, pieces = None, None, None, 0
    stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                                  logit_bias=bias, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices:
            choice = chunk.choices[0]
            if choice.delta and choice.delta.content:
                pieces += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
        extra = getattr(chunk, "model_extra", None) or {}
        timings = extra.get("timings") or timings  # llama-server's own prompt/cache counts
    end = time.perf_counter() - t0
    cached = None
    if usage is not None and getattr(usage, "prompt_tokens_details", None) is not None:
        cached = usage.prompt_tokens_details.cached_tokens
    if cached is None and timings:  # llama-server: prompt_n = prompt tokens it evaluated, the rest came from the slot
        cached = timings.get("cache_n")
        if cached is None and timings.get("prompt_n") is not None and usage is not None:
            cached = usage.prompt_tokens - timings["prompt_n"]
    return {"ttft_s": ttft if ttft is not None else end, "latency_s": end, "completion_tokens": usage.completion_tokens if usage else None,
            "prompt_tokens": usage.prompt_tokens if usage else None, "cached_tokens": cached, "finish_reason": finish,
            "text_chunks": pieces}


def process_cpu_s(pid: Optional[int]) -> Optional[float]:
    """CPU seconds (user + system) of a process and its live children, or None."""
    if pid is None:
        return None
    try:
        import psutil

        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total
    except Exception:
        return None


async def _wave(base_url: str, model: str, jobs: list[list[dict]], max_tokens: int, bias: dict[str, int],
                pid: Optional[int] = None) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=1800)
    cpu0 = process_cpu_s(pid)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_stream_one(client, model, m, max_tokens, bias, t0) for m in jobs))
    wall = time.perf_counter() - t0
    cpu1 = process_cpu_s(pid)
    await client.close()
    server_cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    tokens = [r["completion_tokens"] or 0 for r in results]
    ttft = [r["ttft_s"] for r in results]
    prompt = sum(r["prompt_tokens"] or 0 for r in results)
    cached = [r["cached_tokens"] for r in results if r["cached_tokens"] is not None]
    return {"requests": len(results), "max_tokens": max_tokens, "completion_tokens": sum(tokens), "wall_s": wall,
            "tokens_per_s": sum(tokens) / wall if wall > 0 else None, "all_max_tokens": all(t == max_tokens for t in tokens),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "latency_p50_s": percentile([r["latency_s"] for r in results], 50),
            "prompt_tokens_total": prompt, "cached_tokens_total": sum(cached) if len(cached) == len(results) else None,
            "server_cpu_s": server_cpu, "tokens_per_server_cpu_s": sum(tokens) / server_cpu if server_cpu else None,
            "loadavg_after": _load(), "requests_detail": results}


def _served_model(base_url: str) -> str:
    import httpx

    data = httpx.get(base_url + "/v1/models", timeout=30).json().get("data") or []
    return data[0]["id"] if data else "model"


def eog_bias(model: str) -> dict[str, int]:
    """``logit_bias`` -100 on the tokenizer's end-of-generation tokens (EOS, <|im_end|>, <|endoftext|>)."""
    from transformers import AutoTokenizer

    from .worker import resolve_model

    folder, _ = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for text in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"):
        i = tok.convert_tokens_to_ids(text)
        if isinstance(i, int) and i >= 0 and tok.convert_ids_to_tokens(i) == text:
            ids.add(i)
    return {str(i): -100 for i in sorted(ids)}


def http_stage(model: str, gguf: Optional[Path], why: str, variants: list[str], threads: int, requests: int, max_tokens: int,
               rounds: int, log_dir: Path, baseline: Optional[dict[str, str]] = None) -> dict[str, Any]:
    from .workloads import w2_messages

    bias = eog_bias(model)
    cold = [w2_messages(i) for i in range(requests)]
    warm = [w2_messages(requests + i) for i in range(requests)]
    warmup = [[{"role": "user", "content": "Say hello."}]]
    systems: list[str] = ["llama-server", *[f"llamawrapper-{v}" for v in variants]]
    out: dict[str, Any] = {"requests": requests, "max_tokens": max_tokens, "rounds": rounds, "logit_bias": bias,
                           "llama_server_ctx": requests * 1024, "systems": {s: {"rounds": []} for s in systems}}
    ok, where = llamacpp.available()
    if not ok or gguf is None:
        out["systems"]["llama-server"] = {"status": "unavailable", "reason": where if not ok else why, "rounds": []}
        systems.remove("llama-server")
    for rnd in range(rounds):
        order = systems if rnd % 2 == 0 else list(reversed(systems))
        for name in order:
            print(f"== W2 http round {rnd + 1}/{rounds}: {name}", file=sys.stderr, flush=True)
            log_path = log_dir / f"{name}-r{rnd + 1}.log"
            load0 = _load()
            t = time.perf_counter()
            try:
                if name == "llama-server":
                    server: Any = llamacpp.LlamaServer(gguf, parallel=requests, ctx_size=requests * 1024, threads=threads,
                                                       log_path=log_path).start()
                    url, served, command = server.base_url, "smollm2", " ".join(server.command())
                else:
                    server = _lw_server(model, name.split("-", 1)[1], threads, log_path, baseline).wait_ready()
                    url, served, command = server.url, _served_model(server.url), " ".join(server.cmd)
            except Exception as exc:
                out["systems"][name]["rounds"].append({"status": "error", "reason": f"{type(exc).__name__}: {exc}"})
                continue
            startup = time.perf_counter() - t
            try:
                asyncio.run(_wave(url, served, warmup, 4, bias))
                c = asyncio.run(_wave(url, served, cold, max_tokens, bias, server.proc.pid))
                w = asyncio.run(_wave(url, served, warm, max_tokens, bias, server.proc.pid))
                out["systems"][name]["rounds"].append({"status": "ok", "startup_s": startup, "loadavg_before": load0,
                                                       "cold": c, "warm": w, "command": command})
            except Exception as exc:
                out["systems"][name]["rounds"].append({"status": "error", "reason": f"{type(exc).__name__}: {exc}"})
            finally:
                server.stop()
    for name in systems:
        s = out["systems"][name]
        good = [r for r in s["rounds"] if r.get("status") == "ok"]
        s["status"] = "ok" if good else "error"
        if not good:
            s["reason"] = "; ".join(r.get("reason", "") for r in s["rounds"])[:500]
            continue
        for wave in ("cold", "warm"):
            keys = ("tokens_per_s", "tokens_per_server_cpu_s", "ttft_p50_s", "ttft_p99_s", "latency_p50_s")
            s[wave] = {k: _median([r[wave].get(k) for r in good]) for k in keys}
            s[wave]["all_max_tokens"] = all(r[wave]["all_max_tokens"] for r in good)
            cached = [r[wave]["cached_tokens_total"] for r in good if r[wave]["cached_tokens_total"] is not None]
            s[wave]["cached_over_prompt_tokens"] = (sum(cached) / sum(r[wave]["prompt_tokens_total"] for r in good)
                                                    if len(cached) == len(good) else None)
    return out


# -- ratios and report ------------------------------------------------------------------------------
def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _cpu_rate(eng: dict, v: str, workload: str, tokens: Optional[float]) -> Optional[float]:
    """Tokens per CPU-second of an engine variant's worker process in one workload."""
    cpu = _get(eng, v, "workloads", workload, "cpu_s")
    return tokens / cpu if tokens and cpu else None


def engine_cpu_rates(doc: dict, v: str) -> dict[str, Optional[float]]:
    """decode / prefill / w2 tokens per CPU-second of the worker process (decode includes the W1
    prompt's prefill; CPU time is robust to other load only with one thread: OpenMP workers spin)."""
    eng = doc.get("engine") or {}
    if _get(eng, v, "status") != "ok":
        return {"decode": None, "prefill": None, "w2": None}
    w = eng[v].get("workloads") or {}
    decode_tokens = sum(x["tokens"] for x in (w.get("decode") or {}).get("repeats", []))
    prefill_tokens = (w.get("prefill") or {}).get("prompt_tokens", 0) * len((w.get("prefill") or {}).get("ttft_s", []))
    return {"decode": _cpu_rate(eng, v, "decode", decode_tokens), "prefill": _cpu_rate(eng, v, "prefill", prefill_tokens),
            "w2": _cpu_rate(eng, v, "w2", (w.get("w2") or {}).get("new_tokens_total"))}


def ratios(doc: dict) -> list[dict[str, Any]]:
    """Each target of issue 14 as a row: value (wall clock), the same in tokens per CPU-second
    where both sides have it, target, met (on the wall-clock value; None when a side is missing)."""
    eng, cpp, http = doc.get("engine") or {}, doc.get("llamacpp") or {}, doc.get("http") or {}
    ok = lambda v: eng.get(v, {}).get("status") == "ok"  # noqa: E731

    def dec(v: str) -> Optional[float]:
        return _get(eng, v, "workloads", "decode", "decode_tokens_per_s") if ok(v) else None

    def pre(v: str) -> Optional[float]:
        return _get(eng, v, "workloads", "prefill", "tokens_per_s") if ok(v) else None

    cpu = {v: engine_cpu_rates(doc, v) for v in eng}
    tg = lambda v: tg_reference(cpp, v)  # noqa: E731
    tg_cpu = lambda v: tg_reference(cpp, v, "tokens_per_cpu_s")  # noqa: E731
    c = lambda v, k: (cpu.get(v) or {}).get(k)  # noqa: E731
    base = next((k for k in eng if k.startswith("fp32@")), None)
    rows: list[dict[str, Any]] = []

    def row(name: str, value: Optional[float], target: Optional[float], kind: str = ">=", note: str = "",
            cpu_value: Optional[float] = None) -> None:
        met = None if value is None or target is None else (value >= target if kind == ">=" else value <= target)
        rows.append({"name": name, "value": value, "cpu_time_value": cpu_value,
                     "target": f"{kind} {target}" if target is not None else None, "met": met, "note": note})

    row("W1 int4 / llama.cpp tg128", _ratio(dec("int4"), tg("int4")), 1.0, note="stretch >= 1.3",
        cpu_value=_ratio(c("int4", "decode"), tg_cpu("int4")))
    row("W1 int4 compiled (int4c) / llama.cpp tg128", _ratio(dec("int4c"), tg("int4c")), 1.0, note="stretch >= 1.3",
        cpu_value=_ratio(c("int4c", "decode"), tg_cpu("int4c")))
    row("W1 fp32 / llama.cpp tg128", _ratio(dec("fp32"), tg("fp32")), None, cpu_value=_ratio(c("fp32", "decode"), tg_cpu("fp32")))
    row("W1 bf16 / fp32", _ratio(dec("bf16"), dec("fp32")), 1.5, cpu_value=_ratio(c("bf16", "decode"), c("fp32", "decode")))
    row("W1 int8 / fp32", _ratio(dec("int8"), dec("fp32")), 1.6, cpu_value=_ratio(c("int8", "decode"), c("fp32", "decode")))
    row("W1 int4 / fp32", _ratio(dec("int4"), dec("fp32")), 2.2, cpu_value=_ratio(c("int4", "decode"), c("fp32", "decode")))
    row("W1 int4c / fp32", _ratio(dec("int4c"), dec("fp32")), 2.2, cpu_value=_ratio(c("int4c", "decode"), c("fp32", "decode")))
    row("W1 w8a8 / fp32", _ratio(dec("w8a8"), dec("fp32")), None, cpu_value=_ratio(c("w8a8", "decode"), c("fp32", "decode")))
    if base:
        row(f"W1 bf16 / {base} (today's fp32)", _ratio(dec("bf16"), dec(base)), 1.5, cpu_value=_ratio(c("bf16", "decode"), c(base, "decode")))
        row(f"W1 fp32 / {base}", _ratio(dec("fp32"), dec(base)), None, cpu_value=_ratio(c("fp32", "decode"), c(base, "decode")))
    ls = _get(http, "systems", "llama-server") or {}
    for name, mine in (http.get("systems") or {}).items():
        if not name.startswith("llamawrapper-"):
            continue
        v = name.removeprefix("llamawrapper-")
        for wave, target in (("warm", 2.0), ("cold", 3.0)):
            row(f"W2 http {wave}: llamawrapper {v} / llama-server -np {http.get('requests')}",
                _ratio(_get(mine, wave, "tokens_per_s"), _get(ls, wave, "tokens_per_s")), None if "+" in v else target,
                cpu_value=_ratio(_get(mine, wave, "tokens_per_server_cpu_s"), _get(ls, wave, "tokens_per_server_cpu_s")))
    for v in eng:
        w2 = _get(eng, v, "workloads", "w2", "tokens_per_s") if ok(v) else None
        if w2 is not None:
            row(f"W2 in-process aggregate tok/s, {v}", w2, 250.0, cpu_value=c(v, "w2"))
    n = (doc.get("settings") or {}).get("prefill_tokens")
    for v in (eng if base else ()):  # every variant against today's fp32: which precision meets it
        if v != base and ok(v):
            row(f"prefill {n}-token tok/s: {v} / {base} (today's fp32)", _ratio(pre(v), pre(base)), 1.5,
                cpu_value=_ratio(c(v, "prefill"), c(base, "prefill")))
    row(f"prefill {n}-token tok/s: fp32 / llama.cpp pp{n}", _ratio(pre("fp32"), _get(cpp, "pp", "tokens_per_s")), None,
        cpu_value=_ratio(c("fp32", "prefill"), _get(cpp, "pp", "tokens_per_cpu_s")))
    for v in eng:
        r = _get(eng, v, "workloads", "ttft", "cached_over_uncached") if ok(v) else None
        if r is not None:
            row(f"TTFT cached ~300-token prefix / uncached, {v}", r, 0.2, "<=")
    return rows


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def _l1(x: Optional[list[float]]) -> str:
    """The 1-minute load average of a ``_load()`` triple."""
    return "–" if not x else f"{x[0]:.1f}"


def markdown(doc: dict) -> str:
    m = doc["machine"]
    eng, cpp, http = doc.get("engine") or {}, doc.get("llamacpp") or {}, doc.get("http") or {}
    la = lambda x: "–" if not x else "/".join(f"{v:.1f}" for v in x)  # noqa: E731
    lines = [f"Machine: {m['cpu_model']}, {m['nproc']} cores, CPU flags: {' '.join(m['cpu_flags']) or 'none found'}; "
             f"load average (1/5/15 min) at start {la(m.get('loadavg_at_start'))}, at end {la(m.get('loadavg_at_end'))}.",
             f"Model: {doc['model']} — GGUF {doc.get('gguf') or '–'} ({doc.get('gguf_type') or '–'}); threads {doc['threads']}.", ""]
    lines += ["W1 single stream and prefill (tokens/s; decode = (n-1)/(last-first token), llama.cpp = llama-bench median)", "",
              f"| system | W1 decode ({doc['settings']['w1_new_tokens']} new) | W1 end-to-end | prefill {doc['settings']['prefill_tokens']} tokens | "
              "TTFT uncached / cached prefix (s) | W2 in-process tok/s | 1-min load avg (before → after) |",
              "|---|---|---|---|---|---|---|"]
    if cpp.get("status") == "ok":
        tg, pp, end = cpp.get("tg") or {}, cpp.get("pp") or {}, cpp.get("tg_end") or {}
        both = f" (start {_f(tg.get('tokens_per_s'))}, end {_f(end.get('tokens_per_s'))})" if end else ""
        lines.append(f"| llama.cpp llama-bench ({tg.get('test', 'tg')}, {pp.get('test', 'pp')}) | {_f(tg_reference(cpp))}{both} | – | "
                     f"{_f(pp.get('tokens_per_s'))} | – | – | {_l1(tg.get('loadavg_before'))} → {_l1((end or pp).get('loadavg_after'))} |")
        for k in ("tg", "pp", "tg_end"):
            if (cpp.get(k) or {}).get("status") == "error":
                lines.append(f"| llama.cpp {k} | error: {cpp[k]['reason'][:150]} ||||||")
        for v, (before, after) in (cpp.get("tg_beside") or {}).items():
            lines.append(f"| llama.cpp tg just before / after engine {v} | {_f(before.get('tokens_per_s'))} / "
                         f"{_f(after.get('tokens_per_s'))} | – | – | – | – | {_l1(before.get('loadavg_before'))} → "
                         f"{_l1(after.get('loadavg_after'))} |")
    elif cpp:
        lines.append(f"| llama.cpp | {cpp.get('status')}: {cpp.get('reason', '')[:150]} ||||||")
    else:
        lines.append("| llama.cpp | not run (--stages) ||||||")
    for v, r in eng.items():
        if r.get("status") != "ok":
            lines.append(f"| engine {v} | {r.get('status')}: {str(r.get('reason', ''))[:150]} ||||||")
            continue
        w = r.get("workloads", {})
        d, p, t, w2 = w.get("decode") or {}, w.get("prefill") or {}, w.get("ttft") or {}, w.get("w2") or {}
        lines.append(f"| engine {v} | {_f(d.get('decode_tokens_per_s'))} | {_f(d.get('tokens_per_s'))} | {_f(p.get('tokens_per_s'))} | "
                     f"{_f(t.get('uncached_ttft_p50_s'), '{:.3f}')} / {_f(t.get('cached_ttft_p50_s'), '{:.3f}')} | "
                     f"{_f(w2.get('tokens_per_s'))} | {_l1(r.get('loadavg_before'))} → {_l1(r.get('loadavg_after'))} |")
    if http:
        lines += ["", f"W2 over HTTP: {http['requests']} concurrent streaming chats, shared system prompt, {http['max_tokens']} new tokens each "
                  f"(median of {http['rounds']} rounds; cached = cached prompt tokens / prompt tokens)", "",
                  "| server | cold tok/s | cold TTFT p50 / p99 (s) | warm tok/s | warm TTFT p50 / p99 (s) | cached cold / warm | all answers max_tokens |",
                  "|---|---|---|---|---|---|---|"]
        for name, s in http["systems"].items():
            if s.get("status") != "ok":
                lines.append(f"| {name} | {s.get('status')}: {str(s.get('reason', ''))[:150]} ||||||")
                continue
            c, w = s["cold"], s["warm"]
            lines.append(f"| {name} | {_f(c['tokens_per_s'])} | {_f(c['ttft_p50_s'], '{:.2f}')} / {_f(c['ttft_p99_s'], '{:.2f}')} | "
                         f"{_f(w['tokens_per_s'])} | {_f(w['ttft_p50_s'], '{:.2f}')} / {_f(w['ttft_p99_s'], '{:.2f}')} | "
                         f"{_f(c['cached_over_prompt_tokens'], '{:.2f}')} / {_f(w['cached_over_prompt_tokens'], '{:.2f}')} | "
                         f"{'yes' if c['all_max_tokens'] and w['all_max_tokens'] else '**no**'} |")
    lines += ["", "| ratio (issue 14) | measured (wall clock) | same in tokens per CPU-second | target | met |", "|---|---|---|---|---|"]
    for r in doc["ratios"]:
        met = {True: "yes", False: "**no**", None: "–"}[r["met"]]
        lines.append(f"| {r['name']} | {_f(r['value'], '{:.2f}')} | {_f(r.get('cpu_time_value'), '{:.2f}')} | "
                     f"{r['target'] or 'info'}{(' (' + r['note'] + ')') if r['note'] else ''} | {met} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> Optional[Path]:
    """Three panels: W1 decode tokens/s, W2-over-HTTP aggregate tokens/s (cold, warm), prefill tokens/s."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    eng, cpp, http = doc.get("engine") or {}, doc.get("llamacpp") or {}, doc.get("http") or {}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))

    def bars(ax: Any, labels: list[str], values: list[Optional[float]], colors: list[str], title: str) -> None:
        xs = range(len(labels))
        ax.bar(xs, [v or 0 for v in values], color=colors)
        for x, v in zip(xs, values):
            ax.text(x, (v or 0), "n/a" if v is None else f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), labels, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("tokens/s")

    labels, values, colors = ["llama.cpp tg" if cpp.get("status") == "ok" else "llama.cpp\nunavailable"], [tg_reference(cpp)], ["tab:red"]
    for v, r in eng.items():
        labels.append(v)
        values.append(_get(r, "workloads", "decode", "decode_tokens_per_s") if r.get("status") == "ok" else None)
        colors.append("tab:gray" if "@" in v else "tab:blue")
    bars(axes[0], labels, values, colors, f"W1 single stream, {doc['settings']['w1_new_tokens']} new tokens (decode)")
    labels, values, colors = [], [], []
    for name, s in (http.get("systems") or {}).items():
        for wave in ("cold", "warm"):
            labels.append(f"{name.replace('llamawrapper-', 'lw ')}\n{wave}")
            values.append(_get(s, wave, "tokens_per_s") if s.get("status") == "ok" else None)
            colors.append(("tab:red" if name == "llama-server" else "tab:blue") if wave == "warm" else
                          ("lightsalmon" if name == "llama-server" else "lightsteelblue"))
    bars(axes[1], labels, values, colors, f"W2 over HTTP: {http.get('requests')} chats x {http.get('max_tokens')} tokens (aggregate)")
    labels, values, colors = ["llama.cpp pp" if cpp.get("status") == "ok" else "llama.cpp\nunavailable"], [_get(cpp, "pp", "tokens_per_s")], ["tab:red"]
    for v, r in eng.items():
        labels.append(v)
        values.append(_get(r, "workloads", "prefill", "tokens_per_s") if r.get("status") == "ok" else None)
        colors.append("tab:gray" if "@" in v else "tab:blue")
    bars(axes[2], labels, values, colors, f"prefill, {doc['settings']['prefill_tokens']}-token prompt")
    m = doc["machine"]
    flags = " ".join(f for f in m["cpu_flags"] if f.startswith(("avx2", "avx512", "amx")))
    la = lambda x: "–" if not x else "/".join(f"{v:.1f}" for v in x)  # noqa: E731
    fig.suptitle(f"{m['cpu_model']}, {m['nproc']} cores, threads {doc['threads']}; load avg {la(m.get('loadavg_at_start'))} → "
                 f"{la(m.get('loadavg_at_end'))}; CPU flags: {flags or 'none'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(doc: dict, out_dir: Path, stamp: str) -> tuple[Path, Optional[Path], str]:
    doc["ratios"] = ratios(doc)
    js = out_dir / f"versus-{stamp}.json"
    js.write_text(json.dumps(doc, indent=1))
    (out_dir / "versus-latest.json").write_text(json.dumps(doc, indent=1))
    table = markdown(doc)
    (out_dir / f"versus-{stamp}.md").write_text(table)
    (out_dir / "versus-latest.md").write_text(table)
    png = plot(doc, out_dir / f"versus-{stamp}.png")
    if png:
        (out_dir / "versus-latest.png").write_bytes(png.read_bytes())
    return js, png, table


# -- command ----------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.versus", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="alias, folder, .gguf or hub id (llama.cpp needs a GGUF)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads and llama.cpp -t/-tb (default: one per core)")
    ap.add_argument("--variants", default="fp32,bf16,int8,int4", help="engine variants for W1/prefill/TTFT")
    ap.add_argument("--http-variants", default="fp32,int4",
                    help="llamawrapper serve variants for W2 over HTTP; '+unpinned' after one: torch's threads not pinned; "
                         "'+baseline': the --baseline commit's library")
    ap.add_argument("--stages", default="llamacpp,engine,http", help="subset of llamacpp,engine,http")
    ap.add_argument("--engine-workloads", default=ENGINE_WORKLOADS, help="bench.worker workloads per engine variant")
    ap.add_argument("--requests", type=int, default=16, help="W2 concurrent chats (llama-server -np)")
    ap.add_argument("--max-tokens", type=int, default=64, help="W2 new tokens per chat")
    ap.add_argument("--rounds", type=int, default=2, help="W2 server starts per system (cold + warm wave each), order alternating")
    ap.add_argument("--llama-bench-reps", type=int, default=5)
    ap.add_argument("--baseline", metavar="REF", help="also run the fp32 engine from this commit's library (today's figures), "
                                                      "and serve it for the '+baseline' HTTP variants")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (no figures)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a BenchSettings field")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--render", metavar="JSON", help="only re-render the table and plot of an earlier result")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per engine variant")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from .run import library_env, make_settings

    args = parse_args(argv)
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        path = Path(args.render)
        doc["ratios"] = ratios(doc)
        path.with_suffix(".md").write_text(markdown(doc))
        plot(doc, path.with_suffix(".png"))
        print(markdown(doc))
        return 0
    settings = make_settings(args.quick, [f"threads={args.threads}", *args.set])
    if args.quick:
        args.requests, args.max_tokens, args.rounds, args.llama_bench_reps = min(args.requests, 4), min(args.max_tokens, 8), 1, 1
    stages = set(args.stages.split(","))
    variants = [v for v in args.variants.split(",") if v]
    http_variants = [v for v in args.http_variants.split(",") if v]
    for v in variants + [h.split("+")[0] for h in http_variants]:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    for o in (o for h in http_variants for o in h.split("+")[1:]):
        if o not in SERVER_OPTIONS:
            raise SystemExit(f"unknown server option {o!r} (after '+'); known: {', '.join(SERVER_OPTIONS)}")
    if any("baseline" in h.split("+")[1:] for h in http_variants) and not args.baseline:
        raise SystemExit("an HTTP variant with '+baseline' needs --baseline REF")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    gguf, why = resolve_gguf(args.model)
    doc: dict[str, Any] = {
        "command": "python -m bench.versus " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "model": args.model, "gguf": str(gguf) if gguf else None, "gguf_type": why if gguf else None,
        "threads": args.threads, "quick": args.quick, "machine": machine(), "versions": versions(),
        "settings": settings.to_dict(), "notes": [
            "greedy; W1/prefill engine variants each in their own process (bench.worker), one at a time",
            "W1 engine figure = decode tokens/s (n-1)/(last-first token) after a 46-token chat prompt, median of decode_repeats; "
            "llama.cpp = llama-bench tg (no prompt), median of its repetitions, measured at the start and at the end of the run "
            "and between engine variants; a variant's W1 ratio uses the mean of the two measured just before and after it "
            "(else of the start and end ones)",
            "W2 over HTTP: same openai client code for both servers; logit_bias -100 on end-of-generation tokens so each answer "
            "has exactly max_tokens tokens (checked from usage); cold = first wave after start (+1 short unrelated warm-up "
            "request), warm = second wave (other questions, same system prompt)",
            "figures are wall-clock on a shared machine: compare ratios within this run, never with another day's figures",
        ]}
    if not gguf:
        doc["gguf_missing"] = why
    if "llamacpp" in stages:
        print("== llama.cpp llama-bench", file=sys.stderr, flush=True)
        doc["llamacpp"] = llama_bench_stage(gguf, why, args.threads, settings.w1_new_tokens, settings.prefill_tokens,
                                            args.llama_bench_reps)
        print(f"== llama.cpp: {doc['llamacpp'].get('status')} {doc['llamacpp'].get('reason', '')}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="versus-") as tmp:
        base_src = baseline_source(args.baseline, Path(tmp)) if args.baseline else None
        doc["baseline"] = args.baseline
        if "engine" in stages:
            tg = None
            if "llamacpp" in stages and doc["llamacpp"].get("status") == "ok":
                def tg() -> dict[str, Any]:  # a short tg beside each engine variant (the W1 ratios' reference)
                    print("== llama.cpp llama-bench tg (between engine variants)", file=sys.stderr, flush=True)
                    return llama_bench_one(Path(doc["gguf"]), "tg", 0, settings.w1_new_tokens, BESIDE_REPS, args.threads)
            doc["engine"], beside = engine_stage(variants, args.model, settings, args.engine_workloads, args.timeout, base_src,
                                                 args.baseline, tg)
            if beside:
                doc["llamacpp"]["tg_beside"] = beside
            (out_dir / "versus-partial.json").write_text(json.dumps(doc, indent=1))
        if "http" in stages:
            log_dir = out_dir / f"versus-{stamp}-logs"
            log_dir.mkdir(exist_ok=True)
            doc["http"] = http_stage(args.model, gguf, why, http_variants, args.threads, args.requests, args.max_tokens,
                                     args.rounds, log_dir, library_env(base_src) if base_src else None)
    if "llamacpp" in stages and doc["llamacpp"].get("status") == "ok" and stages & {"engine", "http"}:
        print("== llama.cpp llama-bench tg again (end of run)", file=sys.stderr, flush=True)
        doc["llamacpp"]["tg_end"] = llama_bench_one(Path(doc["gguf"]), "tg", 0, settings.w1_new_tokens, args.llama_bench_reps,
                                                    args.threads)
    doc["duration_s"] = time.time() - started
    doc["machine"]["loadavg_at_end"] = _load()
    js, png, table = write(doc, out_dir, stamp)
    print(table)
    print(f"results: {js}" + (f"\nplot: {png}" if png else "\nplot: matplotlib missing (pip install -e .[bench])"))
    print(f"took {doc['duration_s'] / 60:.1f} min")
    bad = [v for v, r in (doc.get("engine") or {}).items() if r.get("status") not in ("ok", "unavailable")]
    bad += [n for n, s in ((doc.get("http") or {}).get("systems") or {}).items() if s.get("status") not in ("ok", "unavailable")]
    if bad:
        print(f"failed: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
