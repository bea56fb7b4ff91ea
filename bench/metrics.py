"""Measuring: per-request records and their summary (tokens/s, TTFT and latency percentiles),
a background sampler of this process's resident memory, and facts about the machine."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

MB = 1024 * 1024


@dataclass
class RequestRecord:
    """One request as its caller saw it; times are seconds from the workload's start (t0)."""

    prompt_tokens: int
    new_tokens: int
    arrival_s: float
    ttft_s: float  # first token, from arrival
    latency_s: float  # last token, from arrival
    measured: bool = True  # False: extrapolated from measured requests (serial peers, bounded runs)


def percentile(values: list[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile (q in 0..100), or None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(records: list[RequestRecord], wall_s: float, **extra: Any) -> dict[str, Any]:
    """Aggregate figures of one workload run: every generated token over the wall time."""
    ttft = [r.ttft_s for r in records]
    lat = [r.latency_s for r in records]
    tokens = sum(r.new_tokens for r in records)
    measured = sum(r.measured for r in records)
    return {
        "requests": len(records),
        "measured_requests": measured,
        "extrapolated": measured < len(records),
        "prompt_tokens_mean": statistics.mean(r.prompt_tokens for r in records) if records else 0,
        "new_tokens_total": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "latency_p50_s": percentile(lat, 50),
        "latency_p99_s": percentile(lat, 99),
        **extra,
        "records": [asdict(r) for r in records],
    }


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class RssSampler:
    """Samples this process's RSS every ``interval`` seconds; ``peak()`` since the last ``reset()``."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self._peak = rss_bytes()
        self._overall = self._peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            value = rss_bytes()
            self._peak = max(self._peak, value)
            self._overall = max(self._overall, value)

    def reset(self) -> None:
        self._peak = rss_bytes()

    def peak(self) -> int:
        value = rss_bytes()
        self._peak = max(self._peak, value)
        self._overall = max(self._overall, value)
        return self._peak

    def overall_peak(self) -> int:
        self.peak()
        return self._overall

    def stop(self) -> None:
        self._stop.set()


def machine() -> dict[str, Any]:
    """CPU, cores, memory and OS of this machine."""
    cpu = ""
    flags: list[str] = []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma"))]
    except OSError:
        pass
    mem = 0
    try:
        import psutil

        mem = psutil.virtual_memory().total
    except ImportError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu or platform.processor(),
        "cpu_flags": sorted(set(flags)),
        "ram_gb": round(mem / 1024**3, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def versions() -> dict[str, Optional[str]]:
    """Versions of everything measured, without importing the heavy ones into this process."""
    from importlib import metadata

    out: dict[str, Optional[str]] = {}
    for name in ("llamawrapper", "torch", "transformers", "llama-cpp-python", "numpy", "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           timeout=5, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def now() -> float:
    return time.perf_counter()
