"""The bench command: runs the source checkout's bench/ package."""

from __future__ import annotations

import sys

import typer

from . import app
from .common import fail


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """Benchmark the engine against plain transformers and llama.cpp (runs the source checkout's
    bench/ package, same options as `python -m bench`; `llamawrapper bench --help` lists them)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    if not (root / "bench" / "run.py").is_file():
        fail(RuntimeError("the benchmark ships with the source checkout (bench/); run it there: python -m bench"))
    sys.path.insert(0, str(root))
    from bench.run import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)))


