"""Constrained decoding: turns a ``response_format`` (JSON object, JSON schema, regex, choice
list, or a raw Lark grammar) into a per-request logits processor for the engine.

The grammar engine is llguidance (the one behind OpenAI's structured outputs, also used by
vLLM, SGLang and llama.cpp). Measured here against xgrammar and outlines-core on smollm2's
tokenizer (``bench/structured.py``, docs/BENCHMARKS.md): ≈0.3 ms/token including masking, against
≈1.1 ms (xgrammar) and ≈4.6 ms (outlines-core, whose guide hands back Python lists); and — the
deciding point — it *refuses* JSON-schema keywords it cannot enforce (``not``, ``uniqueItems``,
unknown formats) where xgrammar silently ignores them, so an unsupported feature becomes an
``InvalidRequestError`` naming it.

``GrammarProcessor`` follows the engine's contract ``(output_ids, logits_row) -> logits_row``:
it feeds the tokens generated since its last call into the matcher, masks every token the
grammar forbids, and once the grammar is complete allows only end-of-sequence, so generation
ends exactly where the structure does.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Iterable, Optional

import numpy as np
import torch

from ...errors import GenerationError, InvalidRequestError

# Compact, single-line JSON with the spacing models usually write (``{"a": 1, "b": 2}``): no
# free whitespace, so a model cannot pad its answer with newlines until max_tokens runs out.
JSON_DEFAULTS = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}

FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "choice", "grammar")

# Keywords llguidance parses but does not enforce; a schema using them would be silently
# weaker than asked, so they are refused by name.
_UNENFORCED = ("if", "then", "else", "dependentSchemas", "dependentRequired", "unevaluatedProperties",
               "unevaluatedItems", "contains", "minContains", "maxContains", "propertyNames")


def _llg():
    try:
        import llguidance
        import llguidance.hf  # noqa: F401
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise InvalidRequestError("Structured output needs the 'llguidance' package (pip install llguidance).",
                                  param="response_format") from exc
    return llguidance


# -- building grammars ----------------------------------------------------------------------------
def _find_unenforced(schema: Any, path: str = "$") -> Optional[str]:
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in _UNENFORCED:
                return f"{path}.{key}"
            if key in ("properties", "$defs", "definitions", "patternProperties"):
                if isinstance(value, dict):
                    for name, sub in value.items():
                        found = _find_unenforced(sub, f"{path}.{key}.{name}")
                        if found:
                            return found
                continue
            if key in ("enum", "const", "default", "examples", "required", "description", "title"):
                continue
            found = _find_unenforced(value, f"{path}.{key}")
            if found:
                return found
    elif isinstance(schema, list):
        for i, sub in enumerate(schema):
            found = _find_unenforced(sub, f"{path}[{i}]")
            if found:
                return found
    return None


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists its
    ``properties`` and says nothing about extra ones. Every output still validates against the
    original schema (it only narrows what is generated), as OpenAI's structured outputs do; left
    open, a small model keeps inventing keys until max_tokens. Branches of ``allOf`` stay
    untouched, since closing them could make the conjunction unsatisfiable."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, dict):
            out[key] = {k: closed_objects(v) for k, v in value.items()}
        elif key in ("items", "prefixItems", "anyOf", "oneOf", "additionalProperties"):
            out[key] = closed_objects(value)
        else:
            out[key] = value
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out and "allOf" not in out:
        out["additionalProperties"] = False
    return out


def json_schema_grammar(schema: Any, param: str = "response_format") -> str:
    """An llguidance grammar (JSON text) for a JSON schema; refuse what cannot be enforced."""
    if schema is True or schema == {}:
        schema = {"type": "object"} if schema == {} else {}
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"'{param}' schema must be a JSON object, got {type(schema).__name__}.", param=param)
    bad = _find_unenforced(schema)
    if bad:
        raise InvalidRequestError(f"Unsupported JSON schema feature '{bad.rsplit('.', 1)[-1]}' at {bad}: "
                                  "it cannot be enforced during decoding.", param=param)
    return validated(_llg().LLMatcher.grammar_from_json_schema(closed_objects(schema), defaults=JSON_DEFAULTS), param)


def validated(grammar: str, param: str) -> str:
    """``grammar`` if llguidance can enforce all of it; else ``InvalidRequestError`` quoting
    llguidance's reason (``Unimplemented keys: ["not"]``, ``Unknown format: ...``)."""
    is_error, messages = _llg().LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error or messages:
        why = "; ".join(messages) if messages else "invalid grammar"
        raise InvalidRequestError(f"Unsupported feature in {param}: {why}.", param=param)
    return grammar


def choice_grammar(choices: Iterable[Any], param: str = "response_format") -> str:
    items = list(choices) if isinstance(choices, (list, tuple)) else None
    if not items or not all(isinstance(c, str) and c for c in items):
        raise InvalidRequestError("A choice list must be a non-empty list of non-empty strings.", param=param)
    return validated(_llg().LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in items)), param)


def grammar_for(response_format: Any) -> Optional[str]:
    """The grammar a ``response_format`` asks for, or None for free text.

    Accepted shapes: ``{"type": "text"}``, ``{"type": "json_object"}``,
    ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``,
    ``{"type": "regex", "regex": "..."}``, ``{"type": "choice", "choices": [...]}`` and
    ``{"type": "grammar", "grammar": "<lark>"}``.
    """
    if response_format is None:
        return None
    rf = response_format
    if hasattr(rf, "model_dump"):  # a pydantic request model from the HTTP layer
        rf = rf.model_dump(by_alias=True, exclude_none=True)
    if not isinstance(rf, dict) or rf.get("type") not in FORMAT_TYPES:
        raise InvalidRequestError(f"response_format.type must be one of {', '.join(FORMAT_TYPES)}; got "
                                  f"{rf.get('type') if isinstance(rf, dict) else rf!r}.", param="response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"})
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequestError("response_format.json_schema must be an object with a 'schema'.",
                                      param="response_format.json_schema")
        schema = spec.get("schema", spec.get("schema_", {"type": "object"}))
        return json_schema_grammar(schema, "response_format.json_schema.schema")
    if kind == "regex":
        pattern = rf.get("regex", rf.get("pattern"))
        if not isinstance(pattern, str) or not pattern:
            raise InvalidRequestError("response_format.regex must be a non-empty string.", param="response_format.regex")
        return validated(_llg().LLMatcher.grammar_from_regex(pattern), "response_format.regex")
    if kind == "choice":
        return choice_grammar(rf.get("choices"), "response_format.choices")
    lark = rf.get("grammar")
    if not isinstance(lark, str) or not lark:
        raise InvalidRequestError("response_format.grammar must be a Lark grammar string.", param="response_format.grammar")
    return validated(_llg().LLMatcher.grammar_from_lark(lark), "response_format.grammar")


# -- compiling for a tokenizer ----------------------------------------------------------------------
class GrammarCompiler:
    """Per-model state: the llguidance tokenizer (built once, ≈0.5 s) and checked grammars."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(set(int(t) for t in eos_token_ids))
        self._ll_tokenizer = None
        self._lock = threading.Lock()
        self._checked: OrderedDict[str, None] = OrderedDict()

    @property
    def ll_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                llg = _llg()
                eos = self.eos_token_ids[0] if self.eos_token_ids else None
                self._ll_tokenizer = llg.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=eos)
            return self._ll_tokenizer

    def check(self, grammar: str, param: str = "response_format") -> None:
        """Raise ``InvalidRequestError`` naming the problem if the grammar is invalid or uses
        something llguidance cannot enforce."""
        with self._lock:
            if grammar in self._checked:
                self._checked.move_to_end(grammar)
                return
        llg = _llg()
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if is_error or messages:
            why = "; ".join(messages) if messages else "invalid grammar"
            raise InvalidRequestError(f"Unsupported or invalid {param}: {why}.", param=param)
        with self._lock:
            self._checked[grammar] = None
            if len(self._checked) > 256:
                self._checked.popitem(last=False)

    def processor(self, grammar: str, param: str = "response_format") -> "GrammarProcessor":
        self.check(grammar, param)
        matcher = _llg().LLMatcher(self.ll_tokenizer, grammar)
        if matcher.is_error():
            raise InvalidRequestError(f"Unsupported or invalid {param}: {matcher.get_error()}.", param=param)
        return GrammarProcessor(matcher, self.vocab_size, self.eos_token_ids)


class GrammarProcessor:
    """A logits processor for one request that keeps the output inside a grammar."""

    def __init__(self, matcher: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_set = set(eos_token_ids)
        self.eos_ids = np.array(eos_token_ids, dtype=np.int64)
        self.words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self.seen = 0

    @property
    def complete(self) -> bool:
        """True once the grammar accepts the output as a whole."""
        return self.matcher.is_accepting() or self.matcher.is_stopped()

    def __call__(self, output_ids: list, logits: torch.Tensor) -> torch.Tensor:
        self._consume(output_ids)
        if self.matcher.is_stopped():  # nothing more can follow: force end of sequence
            forced = np.full(logits.shape[-1], -np.inf, dtype=np.float32)
            forced[self.eos_ids] = 0.0
            return torch.from_numpy(forced).to(logits.dtype)
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        if self.matcher.is_error():
            raise GenerationError(f"constrained decoding failed: {self.matcher.get_error()}")
        # numpy, not torch: single-threaded, so these µs-sized ops never wait on an OpenMP pool
        # that is busy (torch's small ops took milliseconds on a loaded 2-core machine).
        allowed = np.unpackbits(self.words.view(np.uint8), bitorder="little")[: logits.shape[-1]]
        if self.matcher.is_accepting():
            allowed[self.eos_ids] = 1
        row = logits.detach().cpu().contiguous()
        np.putmask(row.numpy(), allowed == 0, -np.inf)
        return row

    def _consume(self, output_ids: list) -> None:
        new = [t for t in output_ids[self.seen :] if t not in self.eos_set]
        self.seen = len(output_ids)
        if new and not self.matcher.consume_tokens(new):
            raise GenerationError(f"constrained decoding rejected token(s) {new}: {self.matcher.get_error()}")
