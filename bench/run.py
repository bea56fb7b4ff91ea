"""The benchmark command: ``python -m bench [--workloads ...] [--systems ...] [--quick] [--out DIR]``.

Runs each system in its own subprocess (``bench.worker``), one after another, on the same model,
prompts and settings; then writes ``DIR/bench-<time>.json`` (plus ``latest.json``), the plot
``bench-<time>.png`` (plus ``latest.png``) and the Markdown tables ``latest.md``, and prints the
tables. A system that cannot run here (llama-cpp-python missing, a load option not built yet)
is reported as unavailable, never skipped silently.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import report
from .metrics import machine, versions
from .workloads import BenchSettings
from .worker import ALL_WORKLOADS, EXTRA_WORKLOADS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SYSTEMS = "engine,hf_sequential,hf_padded,llamacpp"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description="LlamaWrapper's engine against plain transformers and llama.cpp.")
    ap.add_argument("--workloads", default=",".join(ALL_WORKLOADS),
                    help=f"comma-separated subset of {','.join(ALL_WORKLOADS)} (prefix and rss run on engines only); "
                         f"also {','.join(EXTRA_WORKLOADS)} (not in the default set; see bench.worker)")
    ap.add_argument("--systems", default=DEFAULT_SYSTEMS,
                    help="comma-separated: engine, hf_sequential, hf_padded, llamacpp; engine variants take load options, "
                         "e.g. engine:quantization=int8 or engine:dtype=bfloat16 or engine:prefix_cache_mb=64")
    ap.add_argument("--model", default="smollm2", help="alias, folder, .gguf file or hub id (llama.cpp needs a GGUF)")
    ap.add_argument("--quick", action="store_true", help="small workloads for a smoke run (minutes, not figures)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one BenchSettings field, e.g. --set w2_new_tokens=32 --set sweep=1,4,16")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for JSON, PNG and Markdown")
    ap.add_argument("--render", metavar="JSON", help="only re-render the tables and plot of an earlier result file")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per system before it is reported as failed")
    return ap.parse_args(argv)


def make_settings(quick: bool, overrides: list[str]) -> BenchSettings:
    settings = BenchSettings.quick() if quick else BenchSettings()
    for item in overrides:
        key, _, value = item.partition("=")
        if not hasattr(settings, key):
            raise SystemExit(f"unknown setting {key!r}; known: {', '.join(settings.to_dict())}")
        current = getattr(settings, key)
        if isinstance(current, list):
            parsed: Any = [int(v) for v in value.split(",") if v]
        elif isinstance(current, bool):
            parsed = value.lower() in ("1", "true", "yes")
        else:
            parsed = type(current)(value)
        setattr(settings, key, parsed)
    return settings


def library_env(library_src: Path) -> dict[str, str]:
    """The environment of a process that imports ``llamawrapper`` from ``library_src`` (an older
    commit's ``src``) and only ``bench/`` from this checkout, with that library's C++ kernels built
    in a folder of their own beside it: one build folder for both libraries would be rebuilt each
    time they took turns (torch's builds are keyed by the sources' paths too)."""
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), str(library_src)]), "TORCH_EXTENSIONS_DIR": str(library_src.parent / "extensions")}


def run_system(spec: str, args: argparse.Namespace, settings: BenchSettings, library_src: Path | None = None) -> dict[str, Any]:
    """One system in a fresh process; its JSON result (or why it failed). ``library_src``: import
    ``llamawrapper`` from this folder instead (an older commit's ``src``, as ``bench.versus --baseline`` does)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench.worker", "--system", spec, "--model", args.model, "--workloads", args.workloads,
               "--settings", json.dumps(settings.to_dict()), "--out", str(out)]
        path = [str(ROOT), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path).rstrip(os.pathsep),
               "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
        if library_src is not None:
            env.update(library_env(library_src))
        t = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=args.timeout, stdout=sys.stderr)
        except subprocess.TimeoutExpired:
            return {"system": spec, "status": "error", "reason": f"timed out after {args.timeout:.0f}s"}
        if out.is_file():
            return json.loads(out.read_text())
        return {"system": spec, "status": "error", "reason": f"worker exited {proc.returncode} after {time.time() - t:.0f}s without a result"}


def render(path: Path) -> int:
    doc = json.loads(path.read_text())
    doc["ratios"] = report.ratios(doc["systems"])
    png = report.plot(doc, path.with_suffix(".png"))
    table = report.markdown(doc)
    path.with_suffix(".md").write_text(table)
    print(table)
    print(f"plot: {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(Path(args.render))
    settings = make_settings(args.quick, args.set)
    unknown = set(args.workloads.split(",")) - set(ALL_WORKLOADS) - set(EXTRA_WORKLOADS)
    if unknown:
        raise SystemExit(f"unknown workload {sorted(unknown)[0]!r}; known: {', '.join(ALL_WORKLOADS + EXTRA_WORKLOADS)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    doc: dict[str, Any] = {
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "model": args.model,
        "quick": args.quick,
        "workloads": args.workloads.split(","),
        "machine": machine(),
        "versions": versions(),
        "settings": settings.to_dict(),
        "notes": [
            "greedy decoding; every request generates exactly its new-token count (EOS treated as an ordinary token)",
            "each system runs in its own process, one system at a time; figures are wall-clock on a shared machine",
            "requests of a workload all arrive at once; serial peers (hf_sequential, llamacpp) serve them in order, and beyond "
            f"{settings.peer_max_requests} requests or {settings.peer_time_budget_s:.0f} s per run the rest are extrapolated "
            "from the measured requests' median service time (flagged 'extrapolated', starred in tables, hollow in the plot)",
            "the engine's prefix cache and llama.cpp's remembered prompt are cleared before each workload (cold start); "
            "reuse within a workload counts",
            "cpu_s is the system process's own CPU time; tokens per CPU-second ratios are less sensitive to other load",
        ],
        "systems": {},
    }
    for spec in [s for s in args.systems.split(",") if s]:
        print(f"== {spec}", file=sys.stderr, flush=True)
        doc["systems"][spec] = run_system(spec, args, settings)
        (out_dir / "partial.json").write_text(json.dumps(doc, indent=1))  # survives a crash of a later system
        status = doc["systems"][spec].get("status")
        print(f"== {spec}: {status} {doc['systems'][spec].get('reason', '')}", file=sys.stderr, flush=True)
    doc["duration_s"] = time.time() - started
    doc["machine"]["loadavg_at_end"] = list(os.getloadavg())
    doc["ratios"] = report.ratios(doc["systems"])
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    json_path = out_dir / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(doc, indent=1))
    (out_dir / "latest.json").write_text(json.dumps(doc, indent=1))
    png = report.plot(doc, out_dir / f"bench-{stamp}.png")
    if png:
        (out_dir / "latest.png").write_bytes(png.read_bytes())
    table = report.markdown(doc)
    (out_dir / "latest.md").write_text(table)
    print(table)
    print(f"results: {json_path}" + (f"\nplot: {png}" if png else "\nplot: matplotlib missing (pip install -e .[bench])"))
    print(f"took {doc['duration_s'] / 60:.1f} min")
    return 0 if all(r.get("status") in ("ok", "unavailable") for r in doc["systems"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
