"""Prompt-lookup (n-gram) speculative decoding: drafts without a second model.

A running request's last ``n`` tokens (n = 3, else 2; see below for why not 1) are looked up in its own prompt +
generated tokens; where they occurred before, the tokens that followed that occurrence are the
draft (at most ``k``). The engine then verifies the draft in one forward of the model, feeding
``[last token, d0 .. d(m-1)]`` at consecutive positions and taking the argmax at every position:
``g0`` is what a plain decode step would have chosen, ``g(j)`` what it would choose after
``d0 .. d(j-1)``. The answer takes ``g0, g1, ...`` while ``g(j) == d(j)``, then the first ``g``
that differs, so a verify step yields 1..m+1 tokens, each one exactly the greedy choice (only the
shapes of the matmuls change, as they do between batch sizes). The keys/values written for
rejected draft positions lie beyond the sequence's length and are overwritten before anything
reads them (the slot cache is position-indexed and the attention mask stops at each query's own
position).

Only requests whose next token is a plain argmax of the model's logits can be verified this way:
greedy, no logits processor (grammars, structured output), no penalties or ``logit_bias``, no
``logprobs``. Every other request decodes as before, one token per step, in the same forward.

Why 3 → 2 and not 1: a longer match predicts the continuation better (a 3-gram seen before
usually continues the same way in copied text). A 1-gram finds a draft almost always, but a poor
one: measured on smollm2 (docs/BENCHMARKS.md, "7. Prompt-lookup speculative decoding"), drafts
from n >= 1 were accepted 15-21 % of the time on open chat against 37-48 % from n >= 2, and a
verify step is not cheap here (fp32 matmuls of 2+ rows cost about twice one row's on AVX2), so
1-gram drafts made chat slower (0.76x at batch 16) where n >= 2 broke even. The engine uses
``min_ngram=2`` (``Engine.lookup_min_ngram``).

Exact only in float32: with bf16 activations (bf16, int8 and int4 models) the logits of a
T-token forward differ from T one-token steps enough to flip greedy choices, so the engine does
not speculate for those models.
"""

from __future__ import annotations

from typing import Any

MAX_NGRAM = 3


def speculable(req: Any) -> bool:
    """Whether a request's next token is the plain argmax of the raw logits (so a draft can be
    verified exactly)."""
    p = req.params
    return p.greedy and not p.penalized and not p.logprobs and req.logits_processor is None


class PromptLookup:
    """An index of one sequence's n-grams (n = 1..``max_ngram``) to the end of their latest
    occurrence, extended as tokens are generated; ``draft(k)`` proposes what followed the latest
    earlier occurrence of the sequence's last n tokens, longest n first."""

    def __init__(self, tokens: list[int], max_ngram: int = MAX_NGRAM, min_ngram: int = 1) -> None:
        self.tokens = list(tokens)
        self.sizes = list(range(max_ngram, min_ngram - 1, -1))
        self.latest: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.indexed = 0  # n-grams ending at positions (exclusive) <= indexed are in ``latest``

    def extend(self, ids: list[int]) -> None:
        self.tokens.extend(ids)

    def draft(self, k: int) -> list[int]:
        """At most ``k`` tokens that followed the latest earlier occurrence of the last n tokens."""
        toks, L = self.tokens, len(self.tokens)
        if k <= 0:
            return []
        for end in range(self.indexed + 1, L):  # index every n-gram that ends before the last token
            for n in self.sizes:
                if end >= n:
                    self.latest[n][tuple(toks[end - n : end])] = end
        self.indexed = max(self.indexed, L - 1)
        for n in self.sizes:
            if L <= n:
                continue
            end = self.latest[n].get(tuple(toks[L - n :]))
            if end is not None:
                return toks[end : end + k]
        return []


def lookup_of(req: Any, min_ngram: int = 1) -> PromptLookup:
    """The request's index, created on first use and brought up to date with its output."""
    lk = req.lookup
    if lk is None:
        lk = req.lookup = PromptLookup(req.prompt_ids + req.output_ids, min_ngram=min_ngram)
    else:
        have = len(lk.tokens) - len(req.prompt_ids)
        if have < len(req.output_ids):
            lk.extend(req.output_ids[have:])
    return lk
