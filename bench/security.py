"""``python -m bench.security``: what keys + scopes + limits + audit cost per request.

1. In process: the real ``SecurityMiddleware`` and ``Gate`` (SQLite key store, in-process limits
   or Redis limits, the hash-chained audit log on disk) around a trivial ASGI app that answers at
   once, against the trivial app alone; 64 concurrent requests at a time on one event loop, as a
   server's loop sees them. Cost per request = wall time / requests (the loop is busy the whole
   time, so this is the CPU each request costs); latency medians are per request.
2. End to end: real ``llamawrapper serve`` processes (a tiny random-weight model) over loopback,
   64 concurrent httpx clients on ``POST /tokenize``: an open server without audit against one
   with a scoped, limited key and the audit log; rounds interleaved so both share the noise.

Writes ``OUT/security-<time>.json`` and ``.png`` (plus ``security-latest.*``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .served import ServeProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps({"model": "tiny", "prompt": "Hello there, how are you today?"}).encode()
CONCURRENCY = 64
ADMIN = "bench-admin-key"


# -- 1. in process --------------------------------------------------------------------------------------
async def _trivial_app(scope, receive, send) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"),
                                                                           (b"x-model-version", b"v1")]})
    await send({"type": "http.response.body", "body": b'{"count": 7}'})


def _scope(secret: str | None, i: int) -> dict:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
    if secret:
        headers.append((b"authorization", f"Bearer {secret}".encode()))
    return {"type": "http", "method": "POST", "path": "/tokenize", "headers": headers, "client": ("127.0.0.1", 40000 + i % 1000),
            "state": {"request_id": f"r{i}"}, "query_string": b""}


async def _drive(app, secret: str | None, n: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        async with sem:
            sent = False

            async def receive():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": BODY, "more_body": False}
                await asyncio.sleep(3600)

            status = []

            async def send(message):
                if message["type"] == "http.response.start":
                    status.append(message["status"])

            t = time.perf_counter()
            await app(_scope(secret, i), receive, send)
            latencies.append(time.perf_counter() - t)
            assert status == [200], status

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - start, latencies


def in_process(n: int, rounds: int, redis_url: str | None) -> dict[str, Any]:
    from llamawrapper.security.audit import AuditLog
    from llamawrapper.security.gate import Gate
    from llamawrapper.security.limits import LocalLimiter, RedisLimiter
    from llamawrapper.security.stores import SQLiteKeyStore
    from llamawrapper.server.auth import SecurityMiddleware

    tmp = Path(tempfile.mkdtemp(prefix="lw-bench-sec-"))
    spec = {"name": "bench", "models": ["tiny"], "rpm": 10**8, "tpm": 10**9, "max_parallel": 10**6}
    systems: dict[str, tuple[Any, str | None]] = {"none": (_trivial_app, None)}
    gates = []
    for name, limiter in (("keys+limits+audit (sqlite, in-process limits)", LocalLimiter()),
                          ("keys+limits+audit (redis limits)", RedisLimiter(redis_url) if redis_url else None)):
        if limiter is None:
            continue
        gate = Gate(SQLiteKeyStore(tmp / f"{len(gates)}.sqlite"), limiter, AuditLog(tmp / f"{len(gates)}.jsonl"))
        gates.append(gate)
        _, secret = gate.create_key(spec)
        mw = SecurityMiddleware(_trivial_app, gate, 1 << 20, models=lambda: ["tiny"], default_model=lambda: "tiny")
        systems[name] = (mw, secret)
    per_request: dict[str, list[float]] = {k: [] for k in systems}
    latencies: dict[str, list[float]] = {k: [] for k in systems}
    for _ in range(rounds):
        for name, (app, secret) in systems.items():
            wall, lats = asyncio.run(_drive(app, secret, n))
            per_request[name].append(wall / n)
            latencies[name].extend(lats)
    for gate in gates:
        assert gate.audit.verify().ok
        gate.close()
    shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.median(per_request["none"])
    return {name: {"cost_ms_per_request": statistics.median(v) * 1000,
                   "rounds_ms_per_request": [round(x * 1000, 4) for x in v],
                   "overhead_ms_per_request": (statistics.median(v) - base) * 1000,
                   "median_latency_ms": statistics.median(latencies[name]) * 1000,
                   "p95_latency_ms": statistics.quantiles(latencies[name], n=20)[-1] * 1000}
            for name, v in per_request.items()}


# -- 2. end to end --------------------------------------------------------------------------------------
def _server(model_dir: Path, tmp: Path, name: str, secure: bool) -> ServeProcess:
    """The tiny model served with one thread, keys in SQLite; ``secure``: the admin key ``ADMIN``
    and the per-request audit log on."""
    admin = ADMIN if secure else None
    env = {"PYTHONPATH": str(ROOT / "src"), "LLAMAWRAPPER_THREADS": "1",
           "LLAMAWRAPPER_AUDIT_FILE": str(tmp / f"{name}-audit.jsonl"),
           "LLAMAWRAPPER_STATE_URL": f"sqlite:///{tmp / (name + '-keys.sqlite')}",
           "LLAMAWRAPPER_AUDIT_REQUESTS": "true" if secure else "false"}
    if admin:
        env["LLAMAWRAPPER_ADMIN_KEY"] = admin
    server = ServeProcess([f"tiny={model_dir}"], tmp / f"{name}.log", env=env,
                          headers={"Authorization": f"Bearer {admin}"} if admin else None)
    return server


async def _http_round(url: str, key: str | None, n: int) -> tuple[float, list[float]]:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=120) as client:
        sem = asyncio.Semaphore(CONCURRENCY)
        lats: list[float] = []

        async def one() -> None:
            async with sem:
                t = time.perf_counter()
                r = await client.post("/tokenize", content=BODY, headers={"content-type": "application/json"})
                lats.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text

        await asyncio.gather(*(one() for _ in range(CONCURRENCY)))  # warm the connections
        lats.clear()
        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return time.perf_counter() - start, lats


def end_to_end(n: int, rounds: int) -> dict[str, Any]:
    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="lw-bench-sec-e2e-"))
    model_dir = _tiny_model(tmp / "tiny")
    servers = {"none": _server(model_dir, tmp, "none", False), "keys+limits+audit": _server(model_dir, tmp, "secure", True)}
    try:
        for s in servers.values():
            s.wait_ready(300)
        secure = servers["keys+limits+audit"]
        made = httpx.post(secure.url + "/admin/keys", headers={"Authorization": f"Bearer {ADMIN}"},
                          json={"name": "bench", "models": ["tiny"], "rpm": 10**8, "tpm": 10**9, "max_parallel": 10**6}).json()
        keys = {"none": None, "keys+limits+audit": made["key"]}
        per_request: dict[str, list[float]] = {k: [] for k in servers}
        latencies: dict[str, list[float]] = {k: [] for k in servers}
        for _ in range(rounds):
            for name, s in servers.items():
                wall, lats = asyncio.run(_http_round(s.url, keys[name], n))
                per_request[name].append(wall / n)
                latencies[name].extend(lats)
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    base_cost, base_lat = statistics.median(per_request["none"]), statistics.median(latencies["none"])
    return {name: {"cost_ms_per_request": statistics.median(v) * 1000,
                   "rounds_ms_per_request": [round(x * 1000, 3) for x in v],
                   "overhead_ms_per_request": (statistics.median(v) - base_cost) * 1000,
                   "median_latency_ms": statistics.median(latencies[name]) * 1000,
                   "median_latency_ratio": statistics.median(latencies[name]) / base_lat}
            for name, v in per_request.items()}


def _tiny_model(out: Path) -> Path:
    """A 2-layer random Llama with smollm2's tokenizer (the same kind the tests build)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llamawrapper.models import loading, registry

    tok = AutoTokenizer.from_pretrained(loading.convert_gguf(registry.resolve("smollm2"), progress=False))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# -- report ----------------------------------------------------------------------------------------------
def _machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version()}


def _plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    parts = [k for k in ("in_process", "end_to_end") if k in result]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        names = list(result[part])
        ax.bar(range(len(names)), [result[part][n]["cost_ms_per_request"] for n in names])
        ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
        ax.set_ylabel("ms per request (wall / requests, 64 concurrent)")
        ax.set_title(part.replace("_", " "))
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="Requests per round in process.")
    ap.add_argument("--http-requests", type=int, default=640, help="Requests per round end to end.")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--redis", action="store_true", help="Also measure Redis limits (starts redis-server on loopback).")
    ap.add_argument("--no-http", action="store_true", help="Skip the end-to-end servers.")
    ap.add_argument("--no-in-process", action="store_true", help="Skip the in-process measurement.")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    redis_proc, redis_url = None, None
    if args.redis and shutil.which("redis-server"):
        port = free_port()
        redis_proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        redis_url = f"redis://127.0.0.1:{port}/0"
        time.sleep(0.5)
    result: dict[str, Any] = {"machine": _machine(), "settings": vars(args), "concurrency": CONCURRENCY}
    try:
        if not args.no_in_process:
            result["in_process"] = in_process(args.requests, args.rounds, redis_url)
            print(json.dumps(result["in_process"], indent=1))
        if not args.no_http:
            result["end_to_end"] = end_to_end(args.http_requests, args.rounds)
            print(json.dumps(result["end_to_end"], indent=1))
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"security-{stamp}", "security-latest"):
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        _plot(result, out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
