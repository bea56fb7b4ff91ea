"""What every command shares: the consoles, one-line errors, loading a model from flags, and
the sampling/model options."""

from __future__ import annotations

import json
from typing import Any, List, Optional

import typer
from rich.console import Console

from ..errors import LlamaWrapperError  # noqa: F401  (re-exported for the command modules)

out = Console()
err = Console(stderr=True)


def fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
    raise typer.Exit(1)


def load_model(model: str, dtype: Optional[str], quiet: bool = False, quantization: Optional[str] = None,
          override: Optional[List[str]] = None, adapter: Optional[List[str]] = None,
          plugins: Optional[List[str]] = None, cache: Optional[bool] = None):
    """Load ``model`` (``base:adapter`` selects a LoRA adapter given by ``--adapter NAME=PATH``);
    returns the wrapper and the selected adapter name."""
    from ..models.adapters import split_model_name
    from ..api import LlamaWrapper

    adapters = pairs(adapter, "--adapter", parse=False)
    base, selected = split_model_name(model) if adapters else (model, None)
    llm = LlamaWrapper.load(base, dtype=dtype, progress=not quiet, quantization=quantization,
                            overrides=pairs(override, "--override") or None, adapters=adapters or None,
                            plugins=plugins_option(plugins), cache=cache)
    return llm, selected


def plugins_option(items: Optional[List[str]]) -> Optional[list]:
    """``--plugin NAME`` or ``--plugin 'NAME={"option": ...}'`` (repeatable); None = the config file's."""
    if not items:
        return None
    out: list = []
    for item in items:
        name, sep, options = item.partition("=")
        out.append({"name": name, **(json.loads(options) if sep else {})})
    return out


def response_format_option(schema: Optional[str], regex: Optional[str], choice: Optional[List[str]], json_mode: bool) -> Optional[dict]:
    """``--schema`` (JSON text or @file), ``--regex``, ``--choice`` (repeatable), ``--json-object``."""
    from ..errors import InvalidRequestError

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


def pairs(items: Optional[List[str]], flag: str, parse: bool = True) -> dict[str, Any]:
    """``KEY=VALUE`` flags as a dict; values are JSON when they parse as JSON (numbers, objects)."""
    from ..errors import InvalidRequestError

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


def sampling_options(max_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed, presence_penalty=None,
                     frequency_penalty=None, logit_bias=None, logprobs=False, top_logprobs=None) -> dict[str, Any]:
    """The library's sampling keywords from the flags (OpenAI's names; ``--logit-bias ID=BIAS``)."""
    out = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
               repetition_penalty=repetition_penalty, stop=list(stop or []), seed=seed,
               presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
               logit_bias=pairs(logit_bias, "--logit-bias") or None)
    if logprobs or top_logprobs:
        out.update(logprobs=True, top_logprobs=top_logprobs or 0)
    from ..types import SamplingParams

    SamplingParams(**{k: v for k, v in out.items() if v is not None})  # a bad flag is refused now, not after seconds of loading the model
    return out


MaxTokens = typer.Option(None, "--max-tokens", help="Most tokens to generate (default: the rest of the context).")
Temperature = typer.Option(0.7, help="0 = greedy and deterministic; up to 2.")
TopP = typer.Option(1.0, "--top-p", help="Nucleus sampling mass.")
TopK = typer.Option(0, "--top-k", help="Sample from the k most likely tokens (0 = off).")
RepPenalty = typer.Option(1.0, "--repetition-penalty", help="Penalty for tokens already seen (1 = off).")
Stop = typer.Option(None, "--stop", help="Stop string (repeatable); never part of the answer.")
Seed = typer.Option(None, help="Seed that makes a sampled answer reproducible.")
PresencePenalty = typer.Option(None, "--presence-penalty", help="-2..2: lower the odds of every token already generated.")
FrequencyPenalty = typer.Option(None, "--frequency-penalty", help="-2..2: lower a token's odds by how often it was generated.")
LogitBias = typer.Option(None, "--logit-bias", help="TOKEN_ID=BIAS (-100..100) added to that token's logit (repeatable).")
Logprobs = typer.Option(False, "--logprobs", help="Show each generated token's log-probability.")
TopLogprobs = typer.Option(None, "--top-logprobs", help="...and this many most likely alternatives (0-20; implies --logprobs).")
Dtype = typer.Option(None, help="float32 (default), bfloat16 or float16.")
Quantization = typer.Option(None, "--quantization", help="Quantization: int8 or int4 (weight-only), w8a8 (int8 weights and activations); cached after the first load.")
Override = typer.Option(None, "--override", help="Model config override KEY=VALUE (repeatable), e.g. num_hidden_layers=12.")
Adapter = typer.Option(None, "--adapter", help="LoRA adapter NAME=PATH (repeatable); select one with MODEL:NAME.")
Plugin = typer.Option(None, "--plugin", help="Switch on a plugin: NAME or NAME='{\"option\": ...}' (repeatable; default: the config file's).")
CacheFlag = typer.Option(None, "--cache/--no-cache", help="Use the response cache for deterministic requests (default: [cache] settings).")


