"""Commands that generate: run (one prompt), chat (interactive), tokenize."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from . import app
from .common import (Adapter, CacheFlag, Dtype, FrequencyPenalty, LlamaWrapperError, LogitBias, Logprobs, MaxTokens, Override, Plugin,
                     PresencePenalty, Quantization, RepPenalty, Seed, Stop, Temperature, TopK, TopLogprobs, TopP, err, fail, load_model,
                     out, response_format_option, sampling_options)


@app.command()
def run(model: str = typer.Argument(..., help="Alias, folder, .gguf file or hub id."),
        prompt: str = typer.Argument(..., help="The user message."),
        system: Optional[str] = typer.Option(None, help="A system prompt."),
        as_json: bool = typer.Option(False, "--json", help="Print the result object as JSON instead of streaming."),
        max_tokens: Optional[int] = MaxTokens, temperature: float = Temperature, top_p: float = TopP,
        top_k: int = TopK, repetition_penalty: float = RepPenalty, stop: Optional[List[str]] = Stop,
        seed: Optional[int] = Seed, presence_penalty: Optional[float] = PresencePenalty,
        frequency_penalty: Optional[float] = FrequencyPenalty, logit_bias: Optional[List[str]] = LogitBias,
        logprobs: bool = Logprobs, top_logprobs: Optional[int] = TopLogprobs,
        n: int = typer.Option(1, "--n", "-n", help="Answer with this many choices (each its own seed derived from --seed)."),
        dtype: Optional[str] = Dtype, quantization: Optional[str] = Quantization,
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
    try:
        sampling = sampling_options(max_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed, presence_penalty,
                                    frequency_penalty, logit_bias, logprobs, top_logprobs)
        llm, selected = load_model(model, dtype, quiet or as_json, quantization, override, adapter, plugin, cache)
        sampling["adapter"] = selected
        sampling["response_format"] = response_format_option(schema, regex, choice, json_object)
        if tools:
            from pathlib import Path

            sampling["tools"] = json.loads(Path(tools[1:]).read_text() if tools.startswith("@") else tools)
            named = tool_choice not in (None, "auto", "required", "none")
            sampling["tool_choice"] = {"type": "function", "function": {"name": tool_choice}} if named else tool_choice
        if n != 1:
            results = llm.choices(messages, n=n, **sampling)
            if as_json:
                sys.stdout.write(json.dumps({"model": llm.name, "choices": [r.to_dict() for r in results]}, ensure_ascii=False) + "\n")
                return
            for k, result in enumerate(results):
                sys.stdout.write(f"[choice {k}]\n{result.text}\n")
                _print_logprobs(result.logprobs)
            return
        if as_json:
            result = llm.chat(messages, **sampling)
            sys.stdout.write(json.dumps({"model": llm.name, **result.to_dict()}, ensure_ascii=False) + "\n")
            return
        entries = []
        for event in llm.stream(messages, **sampling):
            sys.stdout.write(event.text)
            if event.tool_calls:
                sys.stdout.write(json.dumps(event.tool_calls, ensure_ascii=False))
            sys.stdout.flush()
            entries += event.logprobs or []
        sys.stdout.write("\n")
        _print_logprobs(entries if sampling.get("logprobs") else None)
    except LlamaWrapperError as exc:
        fail(exc)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        raise typer.Exit(130)


def _print_logprobs(entries) -> None:
    """One line per generated token on stderr: its text, log-probability and the alternatives."""
    for t in entries or []:
        alternatives = "  ".join(f"{a.token!r} {a.logprob:.3f}" for a in t.top_logprobs)
        err.print(f"{t.token!r:>16} {t.logprob:8.3f}   {alternatives}", highlight=False, markup=False)


@app.command()
def chat(model: str = typer.Argument("smollm2", help="Alias, folder, .gguf file or hub id."),
         system: Optional[str] = typer.Option(None, help="A system prompt."),
         max_tokens: Optional[int] = typer.Option(512, "--max-tokens", help="Most tokens per answer."),
         temperature: float = Temperature, top_p: float = TopP, top_k: int = TopK,
         repetition_penalty: float = RepPenalty, stop: Optional[List[str]] = Stop, seed: Optional[int] = Seed,
         presence_penalty: Optional[float] = PresencePenalty, frequency_penalty: Optional[float] = FrequencyPenalty,
         logit_bias: Optional[List[str]] = LogitBias,
         dtype: Optional[str] = Dtype, quantization: Optional[str] = Quantization,
         override: Optional[List[str]] = Override, adapter: Optional[List[str]] = Adapter) -> None:
    """Interactive multi-turn chat, streamed. /reset clears the conversation, /exit (or Ctrl-D) quits,
    Ctrl-C stops the current answer."""
    from ..chat_session import ChatSession

    try:
        sampling = sampling_options(max_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed, presence_penalty,
                                    frequency_penalty, logit_bias)
        llm, selected = load_model(model, dtype, quantization=quantization, override=override, adapter=adapter)
        sampling["adapter"] = selected
        ChatSession(llm, system=system, sampling=sampling).loop()
    except LlamaWrapperError as exc:
        fail(exc)


@app.command()
def tokenize(model: str = typer.Argument(..., help="Alias, folder, .gguf file or hub id."),
             text: str = typer.Argument(..., help="Text to split into tokens."),
             as_json: bool = typer.Option(False, "--json", help="Print ids and pieces as JSON.")) -> None:
    """Show the token ids (and pieces) of a text."""
    try:
        llm, _ = load_model(model, "float32", quiet=True)
        ids = llm.tokenize(text)
    except LlamaWrapperError as exc:
        fail(exc)
    pieces = [llm.detokenize([i]) for i in ids]
    if as_json:
        sys.stdout.write(json.dumps({"count": len(ids), "ids": ids, "pieces": pieces}, ensure_ascii=False) + "\n")
    else:
        out.print(f"{len(ids)} tokens", highlight=False)
        for i, p in zip(ids, pieces):
            out.print(f"{i:>8}  {p!r}", highlight=False)


