"""GGUF conversion time (``llamawrapper pull`` of a GGUF source on first use), with the GGUF's
metadata parsed once per conversion against once per reader as transformers does it, rounds
alternating, each conversion in a fresh process and an empty ``LLAMAWRAPPER_HOME``.

    python -m bench.conversion [--source smollm2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench.report import emit_json

_CONVERT = """
import contextlib, sys, time
from llamawrapper.models import loading, registry
if sys.argv[2] == "per-reader":
    loading._one_metadata_parse = contextlib.nullcontext
t = time.perf_counter()
loading.convert_gguf(registry.resolve(sys.argv[1]), progress=False)
print(time.perf_counter() - t)
"""


def convert_seconds(source: str, mode: str) -> float:
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "LLAMAWRAPPER_HOME": home}
        out = subprocess.run([sys.executable, "-c", _CONVERT, source, mode], env=env, capture_output=True,
                             text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.conversion", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="smollm2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    times: dict[str, list[float]] = {"per-reader": [], "once": []}
    for _ in range(args.rounds):
        for mode in times:
            times[mode].append(round(convert_seconds(args.source, mode), 2))
            print(mode, times[mode][-1], file=sys.stderr)
    med = {m: statistics.median(v) for m, v in times.items()}
    emit_json({"source": args.source, "seconds": times, "median_s": med,
               "once_over_per_reader": round(med["once"] / med["per-reader"], 3), "loadavg": os.getloadavg(),
               "time": time.strftime("%Y-%m-%d %H:%M:%S")}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
