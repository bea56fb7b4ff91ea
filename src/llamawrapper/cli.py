"""The ``llamawrapper`` command line: pull, models, run, chat, tokenize (and serve, bench).

Every command loads models through the Python API and reports ``LlamaWrapperError``s as one
line on stderr with exit status 1, never a traceback."""

from __future__ import annotations

import json
import sys
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import LogSettings
from .errors import LlamaWrapperError

app = typer.Typer(help="LlamaWrapper: chat models on a plain CPU, as a library, a CLI and an OpenAI-compatible server.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
out = Console()
err = Console(stderr=True)


@app.callback()
def _main(
    log_level: Optional[str] = typer.Option(None, help="Logging level (default: INFO, or LLAMAWRAPPER_LOG_LEVEL)."),
    log_format: Optional[str] = typer.Option(None, help="'text' or 'json' (one JSON object per line)."),
) -> None:
    from . import logs

    settings = LogSettings(**{k: v for k, v in (("log_level", log_level), ("log_format", log_format)) if v})
    logs.configure(settings.log_level, settings.log_format)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
    raise typer.Exit(1)


def _load(model: str, dtype: Optional[str], quiet: bool = False, quantization: Optional[str] = None,
          override: Optional[List[str]] = None, adapter: Optional[List[str]] = None,
          plugins: Optional[List[str]] = None, cache: Optional[bool] = None):
    """Load ``model`` (``base:adapter`` selects a LoRA adapter given by ``--adapter NAME=PATH``);
    returns the wrapper and the selected adapter name."""
    from .adapters import split_model_name
    from .api import LlamaWrapper

    adapters = _pairs(adapter, "--adapter", parse=False)
    base, selected = split_model_name(model) if adapters else (model, None)
    llm = LlamaWrapper.load(base, dtype=dtype, progress=not quiet, quantization=quantization,
                            overrides=_pairs(override, "--override") or None, adapters=adapters or None,
                            plugins=_plugins(plugins), cache=cache)
    return llm, selected


def _plugins(items: Optional[List[str]]) -> Optional[list]:
    """``--plugin NAME`` or ``--plugin 'NAME={"option": ...}'`` (repeatable); None = the config file's."""
    if not items:
        return None
    out: list = []
    for item in items:
        name, sep, options = item.partition("=")
        out.append({"name": name, **(json.loads(options) if sep else {})})
    return out


def _response_format(schema: Optional[str], regex: Optional[str], choice: Optional[List[str]], json_mode: bool) -> Optional[dict]:
    """``--schema`` (JSON text or @file), ``--regex``, ``--choice`` (repeatable), ``--json-object``."""
    from .errors import InvalidRequestError

    given = [x for x in (schema, regex, choice or None, json_mode or None) if x]
    if len(given) > 1:
        raise InvalidRequestError("Give at most one of --schema, --regex, --choice, --json-object.", param="response_format")
    if schema:
        from pathlib import Path

        text = Path(schema[1:]).read_text() if schema.startswith("@") else schema
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise InvalidRequestError(f"--schema is not valid JSON: {exc}", param="schema") from exc
        return {"type": "json_schema", "json_schema": {"name": "cli", "schema": parsed}}
    if regex:
        return {"type": "regex", "regex": regex}
    if choice:
        return {"type": "choice", "choices": list(choice)}
    return {"type": "json_object"} if json_mode else None


def _pairs(items: Optional[List[str]], flag: str, parse: bool = True) -> dict[str, Any]:
    """``KEY=VALUE`` flags as a dict; values are JSON when they parse as JSON (numbers, objects)."""
    from .errors import InvalidRequestError

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequestError(f"{flag} takes KEY=VALUE; got {item!r}.", param=flag.lstrip("-"))
        try:
            out[key] = json.loads(value) if parse else value
        except ValueError:
            out[key] = value
    return out


def _sampling(max_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed) -> dict[str, Any]:
    return dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                repetition_penalty=repetition_penalty, stop=list(stop or []), seed=seed)


MaxTokens = typer.Option(None, "--max-tokens", help="Most tokens to generate (default: the rest of the context).")
Temperature = typer.Option(0.7, help="0 = greedy and deterministic; up to 2.")
TopP = typer.Option(1.0, "--top-p", help="Nucleus sampling mass.")
TopK = typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0 = off).")
RepPenalty = typer.Option(1.0, "--repetition-penalty", help="Penalty for tokens already seen (1 = off).")
Stop = typer.Option(None, "--stop", help="Stop string (repeatable); never part of the answer.")
Seed = typer.Option(None, help="Seed that makes a sampled answer reproducible.")
Dtype = typer.Option(None, help="float32 (default), bfloat16 or float16.")
Quantization = typer.Option(None, "--quantization", help="Weight-only quantization: int8 or int4 (cached after the first load).")
Override = typer.Option(None, "--override", help="Model config override KEY=VALUE (repeatable), e.g. num_hidden_layers=12.")
Adapter = typer.Option(None, "--adapter", help="LoRA adapter NAME=PATH (repeatable); select one with MODEL:NAME.")
Plugin = typer.Option(None, "--plugin", help="Switch on a plugin: NAME or NAME='{\"option\": ...}' (repeatable; default: the config file's).")
CacheFlag = typer.Option(None, "--cache/--no-cache", help="Use the response cache for deterministic requests (default: [cache] settings).")


@app.command()
def pull(model: str = typer.Argument("smollm2", help="Alias, folder, .gguf file or hub id[@revision]."),
         force: bool = typer.Option(False, help="Convert again even if the cache is valid."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
         quantization: Optional[str] = Quantization) -> None:
    """Fetch and convert a model into the local cache (and quantize it, with --quantization)."""
    from . import loading, registry

    try:
        source = registry.resolve(model)
        if source.kind == "gguf":
            folder = loading.convert_gguf(source, progress=not quiet, force=force)
        else:
            folder = loading.resolve_folder(source, progress=not quiet)
        if quantization:
            loading.load(source, progress=not quiet, quantization=quantization)
    except LlamaWrapperError as exc:
        _fail(exc)
    if not quiet:
        out.print(f"{source.display_name}: ready in {folder}", highlight=False)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
           verbose: bool = typer.Option(False, "--verbose", "-v", help="Show each cached model's effective config."),
           override: Optional[List[str]] = Override) -> None:
    """List registry aliases and cached (converted) models with sizes and hashes; --verbose adds
    each one's effective config (after the config file's and --override's changes) and its
    cached quantized variants."""
    from . import registry

    aliases = [{"alias": a.name, "description": a.description, "package": a.package} for a in registry.ALIASES.values()]
    cached = registry.cached_models()
    if verbose:
        try:
            for entry in cached:
                entry.update(_effective(entry, _pairs(override, "--override")))
        except LlamaWrapperError as exc:
            _fail(exc)
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


def _effective(entry: dict, flags: dict[str, Any]) -> dict[str, Any]:
    """The effective config and quantized variants of one cached model."""
    from pathlib import Path

    from transformers import AutoConfig

    from .config import model_table
    from .overrides import apply_overrides, effective_config

    folder = Path(entry["folder"])
    overrides = {**(model_table(entry.get("name", "")).get("overrides") or {}), **flags}
    try:
        config = effective_config(apply_overrides(AutoConfig.from_pretrained(folder), overrides))
    except (OSError, ValueError):
        config = None
    quantized = sorted(p.name for p in folder.glob("quant-*") if (p / "manifest.json").is_file())
    return {"config": config, "overrides": overrides, "quantized": quantized}


@app.command()
def run(model: str = typer.Argument(..., help="Alias, folder, .gguf file or hub id."),
        prompt: str = typer.Argument(..., help="The user message."),
        system: Optional[str] = typer.Option(None, help="A system prompt."),
        as_json: bool = typer.Option(False, "--json", help="Print the result object as JSON instead of streaming."),
        max_tokens: Optional[int] = MaxTokens, temperature: float = Temperature, top_p: float = TopP,
        top_k: int = TopK, repetition_penalty: float = RepPenalty, stop: Optional[List[str]] = Stop,
        seed: Optional[int] = Seed, dtype: Optional[str] = Dtype, quantization: Optional[str] = Quantization,
        override: Optional[List[str]] = Override, adapter: Optional[List[str]] = Adapter,
        schema: Optional[str] = typer.Option(None, "--schema", help="Answer as JSON valid for this JSON schema (JSON text or @file)."),
        json_object: bool = typer.Option(False, "--json-object", help="Answer as a JSON object."),
        regex: Optional[str] = typer.Option(None, "--regex", help="Answer matching this regular expression."),
        choice: Optional[List[str]] = typer.Option(None, "--choice", help="Answer with one of these strings (repeatable)."),
        tools: Optional[str] = typer.Option(None, "--tools", help="OpenAI-style tools: a JSON list (or @file)."),
        tool_choice: Optional[str] = typer.Option(None, "--tool-choice", help="auto, required, none or a function name."),
        plugin: Optional[List[str]] = Plugin, cache: Optional[bool] = CacheFlag,
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar.")) -> None:
    """Answer one prompt, streamed to the terminal (tool calls are printed as JSON)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    sampling = _sampling(max_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed)
    try:
        llm, selected = _load(model, dtype, quiet or as_json, quantization, override, adapter, plugin, cache)
        sampling["adapter"] = selected
        sampling["response_format"] = _response_format(schema, regex, choice, json_object)
        if tools:
            from pathlib import Path

            sampling["tools"] = json.loads(Path(tools[1:]).read_text() if tools.startswith("@") else tools)
            named = tool_choice not in (None, "auto", "required", "none")
            sampling["tool_choice"] = {"type": "function", "function": {"name": tool_choice}} if named else tool_choice
        if as_json:
            result = llm.chat(messages, **sampling)
            sys.stdout.write(json.dumps({"model": llm.name, **result.to_dict()}, ensure_ascii=False) + "\n")
            return
        for event in llm.stream(messages, **sampling):
            sys.stdout.write(event.text)
            if event.tool_calls:
                sys.stdout.write(json.dumps(event.tool_calls, ensure_ascii=False))
            sys.stdout.flush()
        sys.stdout.write("\n")
    except LlamaWrapperError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        raise typer.Exit(130)


@app.command()
def chat(model: str = typer.Argument("smollm2", help="Alias, folder, .gguf file or hub id."),
         system: Optional[str] = typer.Option(None, help="A system prompt."),
         max_tokens: Optional[int] = typer.Option(512, "--max-tokens", help="Most tokens per answer."),
         temperature: float = Temperature, top_p: float = TopP, top_k: int = TopK,
         repetition_penalty: float = RepPenalty, stop: Optional[List[str]] = Stop, seed: Optional[int] = Seed,
         dtype: Optional[str] = Dtype, quantization: Optional[str] = Quantization,
         override: Optional[List[str]] = Override, adapter: Optional[List[str]] = Adapter) -> None:
    """Interactive multi-turn chat, streamed. /reset clears the conversation, /exit (or Ctrl-D) quits,
    Ctrl-C stops the current answer."""
    from .chat_session import ChatSession

    sampling = _sampling(max_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed)
    try:
        llm, selected = _load(model, dtype, quantization=quantization, override=override, adapter=adapter)
        sampling["adapter"] = selected
        ChatSession(llm, system=system, sampling=sampling).loop()
    except LlamaWrapperError as exc:
        _fail(exc)


@app.command()
def tokenize(model: str = typer.Argument(..., help="Alias, folder, .gguf file or hub id."),
             text: str = typer.Argument(..., help="Text to split into tokens."),
             as_json: bool = typer.Option(False, "--json", help="Print ids and pieces as JSON.")) -> None:
    """Show the token ids (and pieces) of a text."""
    try:
        llm, _ = _load(model, "float32", quiet=True)
        ids = llm.tokenize(text)
    except LlamaWrapperError as exc:
        _fail(exc)
    pieces = [llm.detokenize([i]) for i in ids]
    if as_json:
        sys.stdout.write(json.dumps({"count": len(ids), "ids": ids, "pieces": pieces}, ensure_ascii=False) + "\n")
    else:
        out.print(f"{len(ids)} tokens", highlight=False)
        for i, p in zip(ids, pieces):
            out.print(f"{i:>8}  {p!r}", highlight=False)


from .server.command import serve_command  # noqa: E402  (flags derived from ServerSettings/EngineSettings)

app.command("serve")(serve_command)


@app.command("eval-ppl")
def eval_ppl(model: str = typer.Argument("smollm2", help="Alias, folder, .gguf file or hub id."),
             dtype: Optional[str] = Dtype, quantization: Optional[str] = Quantization,
             override: Optional[List[str]] = Override,
             questions: bool = typer.Option(True, help="Also answer the fixed question set greedily."),
             as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    """Perplexity on the shipped evaluation text (and the fixed questions): the quality gate for
    quantization and config overrides."""
    from .evaluation import evaluate

    try:
        llm, _ = _load(model, dtype, True, quantization, override)
        report = evaluate(llm, questions=questions)
    except LlamaWrapperError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), ensure_ascii=False) + "\n")
        return
    out.print(f"{report.model} quantization={report.quantization or 'none'} dtype={report.dtype}: "
              f"perplexity {report.perplexity:.3f} over {report.tokens} tokens ({report.seconds:.1f} s)", highlight=False)
    if questions:
        out.print(f"questions: {report.answers_correct}/{len(report.answers)} correct", highlight=False)
        for a in report.answers:
            out.print(f"  {'ok ' if a['correct'] else 'BAD'} {a['question']} -> {a['answer'].strip()[:60]!r}", highlight=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """Benchmark the engine against plain transformers and llama.cpp (runs the source checkout's
    bench/ package, same options as `python -m bench`; `llamawrapper bench --help` lists them)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "run.py").is_file():
        _fail(RuntimeError("the benchmark ships with the source checkout (bench/); run it there: python -m bench"))
    sys.path.insert(0, str(root))
    from bench.run import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
