"""The quality gate for quantized and reshaped models: perplexity on a fixed text shipped with
the package (``data/eval.txt``, written for this project) and greedy answers to a small fixed
question set. ``llamawrapper eval-ppl`` prints both; tests assert int8 stays within +3% and
int4 within +15% and w8a8 within +5% of the fp32 perplexity."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

# (question, substrings any one of which must appear in the greedy answer, case-insensitive).
# The France question carries an instruction: asked bare, smollm2's (float32) first token was
# "The" over "L" by 0.08 nats, and int8 or w8a8 went "L'Étoile, ..." on some CPUs; asked this
# way, its narrowest margin over the first six tokens is 1.5 nats
QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France? Answer with the name of the city.", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is 2 + 2? Answer with a number.", ("4", "four")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("How many days are in a week?", ("7", "seven")),
    ("What is the opposite of hot?", ("cold",)),
]

PPL_LIMITS = {"int8": 0.03, "int4": 0.15, "w8a8": 0.05}  # allowed relative increase over fp32


def eval_text() -> str:
    return resources.files("llamawrapper").joinpath("data/eval.txt").read_text(encoding="utf-8")


@dataclass
class EvalReport:
    model: str
    quantization: str | None
    dtype: str
    tokens: int
    perplexity: float
    seconds: float
    answers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def answers_correct(self) -> int:
        return sum(1 for a in self.answers if a["correct"])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "answers_correct": self.answers_correct, "answers_total": len(self.answers)}


def perplexity(model: Any, token_ids: list[int], window: int = 1024, stride: int = 512) -> float:
    """Perplexity of ``token_ids`` under ``model`` (a Hugging Face causal LM), scored in sliding
    windows of ``window`` tokens that advance by ``stride``; every token after the first is
    scored once, with at least ``window - stride`` tokens of context after the first window."""
    import torch
    import torch.nn.functional as F

    ids = torch.tensor(token_ids).unsqueeze(0)
    n = ids.shape[1]
    nll, count, scored_to = 0.0, 0, 1  # token 0 has no context and is never scored
    start = 0
    with torch.inference_mode():
        while scored_to < n:
            end = min(start + window, n)
            chunk = ids[:, start:end]
            hidden = model.model(input_ids=chunk).last_hidden_state[0]  # [T, hidden]
            first = scored_to - start  # positions in the chunk whose token we score
            logits = model.lm_head(hidden[first - 1 : end - start - 1]).float()
            targets = chunk[0, first:]
            nll += F.cross_entropy(logits, targets, reduction="sum").item()
            count += targets.numel()
            scored_to = end
            start = max(0, end - (window - stride)) if end < n else end
    return math.exp(nll / count)


def answer_questions(llm: Any, max_tokens: int = 24) -> list[dict[str, Any]]:
    """Greedy answers to ``QUESTIONS``, asked together in one batch (a greedy answer is the same
    alone and in a batch)."""
    results = llm.batch([q for q, _ in QUESTIONS], max_tokens=max_tokens, temperature=0, cache=False)
    return [{"question": q, "answer": r.text, "expected": list(expected), "correct": any(e in r.text.lower() for e in expected)}
            for (q, expected), r in zip(QUESTIONS, results)]


def evaluate(llm: Any, questions: bool = True, tokens: int | None = None) -> EvalReport:
    """Perplexity of ``data/eval.txt`` (its first ``tokens`` tokens if given: a quicker, coarser
    gate) and (optionally) the fixed questions for a loaded ``LlamaWrapper``."""
    if tokens is not None and tokens < 2:
        raise ValueError("tokens must be at least 2 (the first token is never scored)")
    ids = llm.tokenize(eval_text(), add_special_tokens=False)[:tokens]
    llm.engine.runner.bind_rows([""])  # the base model, not an adapter
    t = time.perf_counter()
    ppl = perplexity(llm.loaded.model, ids)
    seconds = time.perf_counter() - t
    info = llm.info()
    return EvalReport(llm.name, info.get("quantization"), info["dtype"], len(ids), ppl, seconds,
                      answer_questions(llm) if questions else [])
