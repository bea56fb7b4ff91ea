"""A real ``llamawrapper serve`` process on a free loopback port, for the server tests:
start it, wait for /health or /ready, read its metrics and JSON logs, stop it with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
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
