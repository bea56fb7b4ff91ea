"""Commands about models on this machine: pull, models (list), eval-ppl."""

from __future__ import annotations

import json
import sys
from typing import Any, List, Optional

import typer
from rich.table import Table

from . import app
from .common import (Dtype, LlamaWrapperError, Override, Quantization, fail, load_model, out, pairs)


@app.command()
def pull(model: str = typer.Argument("smollm2", help="Alias, folder, .gguf file or hub id[@revision]."),
         force: bool = typer.Option(False, help="Convert again even if the cache is valid."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
         quantization: Optional[str] = Quantization) -> None:
    """Fetch and convert a model into the local cache (and quantize it, with --quantization)."""
    from ..models import loading, registry

    try:
        source = registry.resolve(model)
        if source.kind == "gguf":
            folder = loading.convert_gguf(source, progress=not quiet, force=force)
        else:
            folder = loading.resolve_folder(source, progress=not quiet)
        if quantization:
            loading.load(source, progress=not quiet, quantization=quantization)
    except LlamaWrapperError as exc:
        fail(exc)
    if not quiet:
        out.print(f"{source.display_name}: ready in {folder}", highlight=False)


models_app = typer.Typer(help="List aliases and cached models; `models lock FILE` pins a models file's hashes.")
app.add_typer(models_app, name="models")


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
           verbose: bool = typer.Option(False, "--verbose", "-v", help="Show each cached model's effective config."),
           override: Optional[List[str]] = Override) -> None:
    """List registry aliases and cached (converted) models with sizes and hashes; --verbose adds
    each one's effective config (after the config file's and --override's changes) and its
    cached quantized variants."""
    if ctx.invoked_subcommand is not None:
        return
    from ..models import registry

    aliases = [{"alias": a.name, "description": a.description, "package": a.package} for a in registry.ALIASES.values()]
    cached = registry.cached_models()
    if verbose:
        try:
            for entry in cached:
                entry.update(_effective(entry, pairs(override, "--override")))
        except LlamaWrapperError as exc:
            fail(exc)
    if as_json:
        out.print_json(data={"aliases": aliases, "cached": cached})
        return
    table = Table(title="Aliases")
    for col in ("alias", "description", "package"):
        table.add_column(col)
    for a in aliases:
        table.add_row(a["alias"], a["description"], a["package"])
    out.print(table)
    table = Table(title=f"Cached models ({registry.models_dir()})")
    for col in ("name", "size", "source sha256", "dtype", "folder"):
        table.add_column(col)
    for c in cached:
        table.add_row(c.get("name", "?"), f"{c['size_bytes'] / 1e6:.0f} MB", str(c.get("source_sha256", ""))[:16],
                      str(c.get("dtype")), c["folder"])
    out.print(table)
    if verbose:
        for c in cached:
            out.print(f"[bold]{c.get('name')}[/] quantized: {', '.join(c.get('quantized') or []) or 'none'}; "
                      f"overrides: {c.get('overrides') or 'none'}; effective config:")
            out.print_json(data=c.get("config"))


@models_app.command("lock")
def lock(path: str = typer.Argument(..., help="The models file (TOML, one [NAME] table per model).")) -> None:
    """Write each model's current source sha256 into the models file; `serve --models-file`
    then refuses a source whose hash differs."""
    from ..models.modelsfile import lock_models_file

    try:
        locked = lock_models_file(path)
    except LlamaWrapperError as exc:
        fail(exc)
    for name, sha in locked.items():
        out.print(f"{name}: sha256 {sha}", highlight=False)


def _effective(entry: dict, flags: dict[str, Any]) -> dict[str, Any]:
    """The effective config and quantized variants of one cached model."""
    from pathlib import Path

    from transformers import AutoConfig

    from ..config import model_table
    from ..models.overrides import apply_overrides, effective_config

    folder = Path(entry["folder"])
    overrides = {**(model_table(entry.get("name", "")).get("overrides") or {}), **flags}
    try:
        config = effective_config(apply_overrides(AutoConfig.from_pretrained(folder), overrides))
    except (OSError, ValueError):
        config = None
    quantized = sorted(p.name for p in folder.glob("quant-*") if (p / "manifest.json").is_file())
    return {"config": config, "overrides": overrides, "quantized": quantized}


@app.command("eval-ppl")
def eval_ppl(model: str = typer.Argument("smollm2", help="Alias, folder, .gguf file or hub id."),
             dtype: Optional[str] = Dtype, quantization: Optional[str] = Quantization,
             override: Optional[List[str]] = Override,
             questions: bool = typer.Option(True, help="Also answer the fixed question set greedily."),
             tokens: Optional[int] = typer.Option(None, min=2, help="Score only the text's first N tokens (quicker, coarser)."),
             as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    """Perplexity on the shipped evaluation text (and the fixed questions): the quality gate for
    quantization and config overrides."""
    from ..models.evaluation import evaluate

    try:
        llm, _ = load_model(model, dtype, True, quantization, override)
        report = evaluate(llm, questions=questions, tokens=tokens)
    except LlamaWrapperError as exc:
        fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), ensure_ascii=False) + "\n")
        return
    out.print(f"{report.model} quantization={report.quantization or 'none'} dtype={report.dtype}: "
              f"perplexity {report.perplexity:.3f} over {report.tokens} tokens ({report.seconds:.1f} s)", highlight=False)
    if questions:
        out.print(f"questions: {report.answers_correct}/{len(report.answers)} correct", highlight=False)
        for a in report.answers:
            out.print(f"  {'ok ' if a['correct'] else 'BAD'} {a['question']} -> {a['answer'].strip()[:60]!r}", highlight=False)


