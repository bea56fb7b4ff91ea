"""A real ``llamawrapper serve`` process on a free loopback port, for the server tests:
start it, wait for /health or /ready, read its metrics and JSON logs, stop it with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import httpx
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, models: list[str], *flags: str, log_path: Path, api_key: Optional[str] = None,
                 env: Optional[dict] = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_path
        cmd = [sys.executable, "-m", "llamawrapper.cli", "--log-format", "json", "serve", *models,
               "--host", "127.0.0.1", "--port", str(self.port), *flags]
        if api_key:
            cmd += ["--api-key", api_key]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMAWRAPPER_") or k == "LLAMAWRAPPER_HOME"}
        full_env.update(env or {})
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=kw.pop("timeout", 120), **kw)

    def _poll(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + path, headers=self.headers, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{path} not 200 after {timeout} s:\n{self.log()[-3000:]}")

    def wait_listening(self, timeout: float = 120) -> "ServerProcess":
        self._poll("/health", timeout)
        return self

    def wait_ready(self, timeout: float = 300) -> "ServerProcess":
        self._poll("/ready", timeout)
        return self

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Samples of /metrics as {(name, sorted label items): value}."""
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def metric(self, name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in self.metrics().items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def terminate(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()


def openai_client(server: ServerProcess, timeout: float = 120):
    """The official ``openai`` client on a server (its key, if any; no retries: tests see every status)."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key or "none", max_retries=0, timeout=timeout)


# -- the reliability suite's load (tests/test_reliability.py and the Ray app's tests) -----------------
SOAK_PROMPTS = [f"In two sentences, tell me something about {topic}." for topic in (
    "the sea", "mountains", "bread", "trains", "owls", "rain", "copper", "chess", "tea", "glaciers", "bees", "maps",
    "violins", "deserts", "bridges", "clocks")]


def wait_until(condition, futures=(), timeout: float = 60, poll: float = 0.05) -> None:
    """Wait for ``condition()``; fail at once if one of ``futures`` (the clients) failed."""
    deadline = time.monotonic() + timeout
    while not condition():
        for f in futures:
            if f.done() and f.exception() is not None:
                raise f.exception()
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met after {timeout} s")
        time.sleep(poll)


def vanishing_streams(client, n: int, wave: int, while_streaming):
    """Open ``n`` chat streams through the ``openai`` ``client`` in waves of ``wave`` (each wave
    waits until its streams have their first words: an engine queue takes a burst faster than
    the engine moves it into its batch), call ``while_streaming()`` once all are streaming, then
    close every connection (the clients vanish mid-answer). Returns each stream's ``x-replica``
    header (None without one), what ``while_streaming`` returned, and the monotonic time when
    the last connection was closed."""
    from concurrent.futures import ThreadPoolExecutor

    streaming = threading.Barrier(n + 1, timeout=300)
    vanish = threading.Event()
    replicas: list = []

    def stream(i: int) -> None:
        # ignore_eos: a sampled story may otherwise end by itself before the clients vanish (it then
        # counts as completed, not cancelled: seen once in 20 streams)
        raw = client.chat.completions.with_raw_response.create(
            model="smollm2", stream=True, max_tokens=400, temperature=0.8, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": f"Write a long story about a lighthouse keeper, part {i}."}])
        chunks = raw.parse()
        try:
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    break
            replicas.append(raw.headers.get("x-replica"))
            streaming.wait()
            vanish.wait(300)
        finally:
            chunks.close()

    with ThreadPoolExecutor(n) as pool:
        futures: list = []
        try:
            for first in range(0, n, wave):
                futures += [pool.submit(stream, i) for i in range(first, min(first + wave, n))]
                wait_until(lambda: len(replicas) == len(futures), futures, timeout=300)
            streaming.wait()
            measured = while_streaming()
        finally:
            vanish.set()
        for f in futures:
            f.result(timeout=30)
    return replicas, measured, time.monotonic()


def redis_outage(redis, clients: list, *, down: float = 5.0, while_down=None, recovered_by=None) -> dict:
    """``clients`` (pairs of a name and a function making one request and returning (status,
    detail)) ask in a loop, one thread each, while ``redis`` is stopped for ``down`` seconds
    (after 3 s of asking) and started again; ``while_down()`` runs 1 s into the outage. Asking
    goes on until ``recovered_by`` (a client's name) got a 200 after the restart (at most 30 s).
    Returns the log ``[(time sent, name, status, detail)]``, the times Redis went down and came
    back, when ``recovered_by`` was answered again (seconds after the restart), and what
    ``while_down`` returned."""
    from concurrent.futures import ThreadPoolExecutor

    log: list = []
    stop = threading.Event()

    def ask(name: str, call) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            status, detail = call()
            log.append((sent, name, status, detail))
            if status != 200:
                stop.wait(0.2)

    with ThreadPoolExecutor(len(clients)) as pool:
        futures = [pool.submit(ask, name, call) for name, call in clients]
        try:
            time.sleep(3)
            went_down = time.monotonic()
            redis.stop()
            time.sleep(1.0)
            during = while_down() if while_down is not None else None
            time.sleep(max(down - (time.monotonic() - went_down), 0))
            came_back = time.monotonic()
            redis.start()
            answered = lambda: [t for t, name, status, _ in log if t > came_back and name == recovered_by and status == 200]  # noqa: E731
            wait_until(lambda: answered(), futures, timeout=30)
        finally:
            stop.set()
            if redis.proc is None:
                redis.start()
        for f in futures:
            f.result(timeout=120)
    return {"log": log, "down": went_down, "up": came_back, "recovered": min(answered()) - came_back,
            "during": during}


def answers_after_idle(url: str, idle: float) -> tuple[tuple[int, object], tuple[int, object]]:
    """GET ``url`` twice on one keep-alive connection, ``idle`` seconds apart: (status, JSON body)
    of each. Fails if the server closed the connection in between (http.client would send the
    second request on the closed socket and raise, not reconnect)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)

    def get() -> tuple[int, object]:
        conn.request("GET", parts.path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    try:
        first, sock = get(), conn.sock
        time.sleep(idle)
        second = get()
        assert conn.sock is sock, "the second request went out on a new connection"
        return first, second
    finally:
        conn.close()


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes and all their children (0 for one that is gone)."""
    import psutil

    total = 0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            total += sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
        except psutil.NoSuchProcess:
            pass
    return total


def read_sse(response: httpx.Response) -> tuple[str, list[str]]:
    """(text, finish reasons) of a streamed chat answer; raises if it does not end with [DONE]."""
    text, reasons, done = [], [], False
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        for choice in json.loads(line[6:]).get("choices", []):
            text.append(choice["delta"].get("content") or "")
            if choice.get("finish_reason"):
                reasons.append(choice["finish_reason"])
    if not done:
        raise AssertionError(f"stream ended without [DONE] after {''.join(text)!r}")
    return "".join(text), reasons


def soak(url: str, headers: dict, pids, *, model: str = "smollm2", clients: int = 64, seconds: float = 60.0,
         warmup: float = 15.0, probe=None) -> dict:
    """``clients`` threads asking for ``seconds`` (every other request streamed; one in four
    greedy, so the response cache answers some), all released together for their first request
    (a burst); a 429 is honoured by waiting its Retry-After. Resident memory of ``pids()`` (and
    their children) is sampled every second, and ``probe()`` (a dict of figures, such as cache
    sizes) once the warm-up is over and at the end. Returns the counts, every unexpected outcome,
    the first wave's statuses and the memory samples ``[(t, bytes)]``; requests started before
    the end are waited for."""
    import collections
    import random

    start = threading.Barrier(clients + 1, timeout=60)
    stop = threading.Event()
    lock = threading.Lock()
    statuses: collections.Counter = collections.Counter()
    first_wave: list = []
    unexpected: list[str] = []
    samples: list[tuple[float, int]] = []
    t0 = 0.0

    def record(n: int, status, detail: str = "") -> None:
        with lock:
            statuses[status] += 1
            if n == 0:
                first_wave.append(status)
            if detail:
                unexpected.append(detail)

    def client(c: int) -> None:
        rng = random.Random(c)
        with httpx.Client(base_url=url, headers=headers, timeout=180) as http:
            start.wait()
            n = 0
            while n == 0 or not stop.is_set():
                i = n * clients + c
                stream = i % 2 == 1
                body = {"model": model, "messages": [{"role": "user", "content": rng.choice(SOAK_PROMPTS)}],
                        "max_tokens": rng.choice((4, 8, 16)), "temperature": 0 if i % 4 == 0 else 0.8, "stream": stream}
                try:
                    with http.stream("POST", "/v1/chat/completions", json=body) as r:
                        if r.status_code == 429:
                            r.read()
                            after = r.headers.get("retry-after", "")
                            ok = after.isdigit() and int(after) >= 1 and r.json()["error"]["code"] == "queue_full"
                            record(n, 429, "" if ok else f"429 without Retry-After or queue_full: {after!r} {r.text[:200]}")
                            if ok:
                                stop.wait(int(after))
                        elif r.status_code != 200:
                            r.read()
                            record(n, r.status_code, f"{r.status_code}: {r.text[:300]}")
                        elif stream:
                            text, reasons = read_sse(r)
                            bad = len(reasons) != 1 or reasons[0] not in ("stop", "length")
                            record(n, 200, f"stream ended with {reasons} after {text!r}" if bad else "")
                        else:
                            r.read()
                            choice = r.json()["choices"][0]
                            bad = choice["finish_reason"] not in ("stop", "length") or choice["message"]["content"] is None
                            record(n, 200, f"answer {choice}" if bad else "")
                except (httpx.HTTPError, AssertionError, ValueError) as exc:
                    record(n, "error", f"{type(exc).__name__}: {exc}"[:300])
                n += 1

    def sampler() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - t0, rss_bytes(pids())))
            stop.wait(1.0)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.monotonic()
    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    probes = {}
    time.sleep(warmup)
    if probe is not None:
        probes["warm"] = probe()
    time.sleep(seconds - warmup)
    samples.append((time.monotonic() - t0, rss_bytes(pids())))
    if probe is not None:
        probes["end"] = probe()
    stop.set()
    for t in threads:
        t.join(300)
    watcher.join(10)
    after_warmup = [b for t, b in samples if t >= warmup]
    return {"requests": sum(statuses.values()), "statuses": dict(statuses), "unexpected": unexpected,
            "first_wave": first_wave, "hung": sum(t.is_alive() for t in threads), "seconds": time.monotonic() - t0,
            "samples": samples, "rss_warm": after_warmup[0], "rss_end": samples[-1][1],
            "rss_peak": max(after_warmup), "probes": probes}


def describe_soak(result: dict) -> str:
    mb = 1024 * 1024
    return (f"{result['requests']} requests in {result['seconds']:.1f} s, statuses {result['statuses']}, first wave "
            f"{result['first_wave'].count(200)}x200 {result['first_wave'].count(429)}x429; RSS after warm-up "
            f"{result['rss_warm'] / mb:.0f} MiB, at the end {result['rss_end'] / mb:.0f} MiB "
            f"({100 * (result['rss_end'] / result['rss_warm'] - 1):+.1f} %), peak {result['rss_peak'] / mb:.0f} MiB; "
            f"every 5 s (MiB): {[round(b / mb) for t, b in result['samples'][::5]]}; {result['probes']}")
