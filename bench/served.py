"""A ``llamawrapper serve`` process on loopback for the benchmarks that measure over HTTP: a free
port, the environment without the caller's ``LLAMAWRAPPER_*`` settings (so a bench measures
the flags it passes), the log in a file, ``/ready`` polled, and SIGTERM (then SIGKILL) to stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``llamawrapper serve *args --host 127.0.0.1 --port <free>``; ``env`` adds to (or
    overrides) the inherited environment; ``headers`` go with the ``/ready`` probe (an admin
    key when the server has one). Use as ``ServeProcess(...).wait_ready()`` then ``stop()``, or
    as a context manager."""

    def __init__(self, args: list[str], log_path: Path, *, env: Optional[dict[str, str]] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = dict(headers or {})
        self.log_path = Path(log_path)
        full = {k: v for k, v in os.environ.items() if not k.startswith("LLAMAWRAPPER_") or k == "LLAMAWRAPPER_HOME"}
        full.update(env or {})
        self.cmd = [sys.executable, "-m", "llamawrapper.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 600) -> "ServeProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llamawrapper serve exited {self.proc.returncode}; log: {self.log_path}")
            try:
                if httpx.get(self.url + "/ready", headers=self.headers, timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"llamawrapper serve not ready after {timeout:.0f} s; log: {self.log_path}")

    def stop(self, timeout: float = 120) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> "ServeProcess":
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
