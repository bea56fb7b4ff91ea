"""Next-token selection for one decode step, batched over the rows of the step.

    logits [B, V] ─ per-row logits processors (grammars) ─ repetition penalty (transformers)
                  ─ presence/frequency penalties (OpenAI, one scatter over the rows that ask)
                  ─ logit_bias (one index_put over every row's bias; a greedy row with no other
                    change compares its argmax with its biased tokens instead: ``biased_greedy``)
                  ─ greedy rows: one argmax │ sampled rows: temperature, top-k, top-p as masks
                                              over one sort, then inverse-CDF draws
    log-probabilities (when asked) come from the raw logits: one log_softmax + top-k (and, for a
    prompt whose log-probabilities are asked, the same over every prompt position while prefilling).

Each sampled row draws its uniform number from its request's own generator, so a seed
reproduces an answer whatever else shares the batch. Rows whose processor raises are reported
to ``on_error`` and left out; the others go on.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ..types import TokenLogprob


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """transformers' rule: a seen token's logit is divided by ``penalty`` if positive, else multiplied."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), dtype=torch.long)
    vals = logits[idx]
    logits[idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def apply_openai_penalties(logits: torch.Tensor, outputs: Sequence[list[int]], presence: torch.Tensor,
                           frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's rule over the tokens generated so far, for R rows at once (in place):
    ``logit[j] -= count[j] * frequency + (count[j] > 0) * presence``.

    logits [R, V]; outputs: R lists of generated ids; presence, frequency [R]."""
    R, V = logits.shape
    longest = max((len(o) for o in outputs), default=0)
    if longest == 0:
        return logits
    ids = torch.zeros(R, longest, dtype=torch.long)
    ones = torch.zeros(R, longest)
    for r, out in enumerate(outputs):
        ids[r, : len(out)] = torch.tensor(out, dtype=torch.long)
        ones[r, : len(out)] = 1.0
    counts = torch.zeros(R, V).scatter_add_(1, ids, ones)  # [R, V]
    logits -= counts * frequency.unsqueeze(1) + (counts > 0).float() * presence.unsqueeze(1)
    return logits


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[dict[int, float]]) -> torch.Tensor:
    """Add each row's ``{token id: bias}`` to its logits (in place), one indexed add for all rows."""
    rows = [r for r, b in enumerate(biases) for _ in b]
    if not rows:
        return logits
    tokens = [t for b in biases for t in b]
    values = [v for b in biases for v in b.values()]
    logits.index_put_((torch.tensor(rows), torch.tensor(tokens)), torch.tensor(values, dtype=logits.dtype), accumulate=True)
    return logits


def biased_greedy(logits: torch.Tensor, rows: Sequence[int], greedy: Sequence[int],
                  biases: Sequence[dict[int, float]]) -> dict[int, int]:
    """The greedy token of each of ``rows`` after its ``logit_bias``, from the raw logits [B, V]
    and their plain argmax ``greedy`` (per row of the batch), without a biased copy of the rows:
    the biased argmax is either the row's own argmax or one of its biased tokens, compared with
    the values ``apply_logit_bias`` would give them, the lowest id first among equals, as
    ``argmax`` takes it. A row whose own argmax is biased itself (the answer may then be any
    token) or whose biased values are not numbers is left out, for the full path."""
    rows = [i for i in rows if greedy[i] not in biases[i]]
    if not rows:
        return {}
    pairs = [(i, t, b) for i in rows for t, b in sorted(biases[i].items())]
    biased = (logits[torch.tensor([i for i, _, _ in pairs]), torch.tensor([t for _, t, _ in pairs])]
              + torch.tensor([b for _, _, b in pairs], dtype=logits.dtype)).tolist()
    own = logits[torch.tensor(rows), torch.tensor([greedy[i] for i in rows])].tolist()
    best = {i: (value, greedy[i]) for i, value in zip(rows, own)}
    spoiled = set()
    for (i, t, _), value in zip(pairs, biased):
        top, token = best[i]
        if value != value:  # NaN: argmax's rules for it are the full path's business
            spoiled.add(i)
        elif value > top or (value == top and t < token):
            best[i] = (value, t)
    return {i: token for i, (_, token) in best.items() if i not in spoiled}


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                uniform: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse-CDF sampling after temperature, top-k and top-p.

    logits [S, V]; temperature, top_p, uniform [S] float (uniform in [0, 1)); top_k [S] long
    (0 = off). Returns [S] long token ids."""
    S, V = logits.shape
    scaled = logits / temperature.unsqueeze(1)
    if bool((top_k > 0).any()) or bool((top_p < 1.0).any()):
        scaled, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(scaled, dim=-1)
        k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
        keep = torch.arange(V).unsqueeze(0) < k.unsqueeze(1)
        keep &= (torch.cumsum(probs, dim=-1) - probs) < top_p.unsqueeze(1)  # the smallest set reaching top_p
        probs = probs * keep
    else:
        order = None
        probs = torch.softmax(scaled, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    idx = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1), right=True).clamp(max=V - 1)  # [S, 1]
    return (order.gather(1, idx) if order is not None else idx).squeeze(1)


class TokenPieces:
    """Text and UTF-8 bytes of single tokens (cached), for log-probability entries. Byte-level
    BPE pieces map back to their exact bytes; other tokenizers fall back to decoding the token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._piece(token_id)
        return hit

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        raw: Optional[bytes] = None
        if self.byte_level and token_id not in self.special:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and all(ch in _BYTE_OF for ch in piece):
                raw = bytes(_BYTE_OF[ch] for ch in piece)
        if raw is None:
            raw = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False).encode()
        return raw.decode("utf-8", errors="backslashreplace"), list(raw)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's reversible map between bytes and printable characters (character -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_level_alphabet()


def _bias_only(req: Any) -> bool:
    """Whether a request's only change to its logits is its ``logit_bias``."""
    p = req.params
    return (req.logits_processor is None and bool(p.logit_bias) and not p.presence_penalty and not p.frequency_penalty
            and p.repetition_penalty == 1.0)


class Sampler:
    """Selects the next token of every row of a step (see the module docstring)."""

    def __init__(self, tokenizer: Any) -> None:
        self.pieces = TokenPieces(tokenizer)

    def select(self, logits: torch.Tensor, reqs: Sequence[Any], greedy: Optional[list[int]],
               on_error: Callable[[Any, BaseException], None]) -> list[Optional[int]]:
        """The next token of each request (None for a row whose processing failed).

        logits [B, V] (raw model output, not modified); reqs: B engine requests (``params``,
        ``output_ids``, ``prompt_ids``, ``logits_processor``, ``generator``); greedy: the
        batch's plain argmax per row, if already computed."""
        B = logits.shape[0]
        tokens: list[Optional[int]] = [None] * B
        work = logits
        changed = [r.logits_processor is not None or r.params.penalized for r in reqs]
        if greedy is not None:  # greedy rows whose only change is a logit_bias: no copy of the logits
            biased = [i for i, r in enumerate(reqs) if changed[i] and r.params.greedy and _bias_only(r)]
            if biased:
                for i, token in biased_greedy(logits, biased, greedy, [r.params.logit_bias for r in reqs]).items():
                    tokens[i], changed[i] = token, False
        alive = list(range(B))
        if any(changed):
            work = logits.clone()
            for i, req in enumerate(reqs):
                if not changed[i]:
                    continue
                try:
                    if req.logits_processor is not None:
                        work[i] = req.logits_processor(req.output_ids, work[i].clone())
                    if req.params.repetition_penalty != 1.0:
                        apply_repetition_penalty(work[i], req.prompt_ids + req.output_ids, req.params.repetition_penalty)
                except Exception as exc:
                    on_error(req, exc)
                    alive.remove(i)
            openai = [i for i in alive if changed[i] and (reqs[i].params.presence_penalty or reqs[i].params.frequency_penalty)]
            if openai:
                rows = torch.tensor(openai)
                work[rows] = apply_openai_penalties(
                    work[rows], [reqs[i].output_ids for i in openai],
                    torch.tensor([reqs[i].params.presence_penalty for i in openai]),
                    torch.tensor([reqs[i].params.frequency_penalty for i in openai]))
            apply_logit_bias(work, [reqs[i].params.logit_bias if i in alive and changed[i] else {} for i in range(B)])
        greedy_rows = [i for i in alive if reqs[i].params.greedy]
        recompute = [i for i in greedy_rows if changed[i] or greedy is None]
        if recompute:
            for i, t in zip(recompute, work[torch.tensor(recompute)].argmax(dim=-1).tolist()):
                tokens[i] = t
        for i in greedy_rows:
            if tokens[i] is None:
                tokens[i] = greedy[i]
        sampled = [i for i in alive if not reqs[i].params.greedy]
        if sampled:
            ps = [reqs[i].params for i in sampled]
            drawn = sample_rows(
                work[torch.tensor(sampled)],
                torch.tensor([p.temperature for p in ps]),
                torch.tensor([p.top_k for p in ps], dtype=torch.long),
                torch.tensor([p.top_p for p in ps]),
                torch.stack([torch.rand((), generator=reqs[i].generator) for i in sampled]))
            for i, t in zip(sampled, drawn.tolist()):
                tokens[i] = t
        return tokens

    def logprobs(self, logits: torch.Tensor, reqs: Sequence[Any], tokens: Sequence[Optional[int]]) -> list[Optional[TokenLogprob]]:
        """Each asking row's chosen token with its log-probability and its ``top_logprobs``
        most likely alternatives, from the raw logits [B, V] (one log_softmax for all rows)."""
        rows = [i for i, r in enumerate(reqs) if r.params.logprobs and tokens[i] is not None]
        out: list[Optional[TokenLogprob]] = [None] * len(reqs)
        if not rows:
            return out
        entries = self._entries(logits[torch.tensor(rows)], [tokens[i] for i in rows], [reqs[i].params.top_logprobs for i in rows])
        for i, entry in zip(rows, entries):
            out[i] = entry
        return out

    def positions(self, logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
        """Entries of ``targets[t]`` under ``logits[t]`` [T, V], one per position (prompt log-probabilities)."""
        return self._entries(logits, targets, [k] * len(targets))

    def _entries(self, logits: torch.Tensor, chosen_ids: list[int], ks: list[int]) -> list[TokenLogprob]:
        lp = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
        chosen = lp.gather(1, torch.tensor(chosen_ids).unsqueeze(1)).squeeze(1).tolist()
        k = max(ks, default=0)
        top_vals, top_ids = (lp.topk(k, dim=-1) if k else (torch.empty(len(ks), 0), torch.empty(len(ks), 0, dtype=torch.long)))
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        return [self._entry(t, chosen[r], [self._entry(a, v) for a, v in zip(top_ids[r][:n], top_vals[r][:n])])
                for r, (t, n) in enumerate(zip(chosen_ids, ks))]

    def _entry(self, token_id: int, logprob: float, top: Optional[list[TokenLogprob]] = None) -> TokenLogprob:
        text, raw = self.pieces(token_id)
        return TokenLogprob(token_id, text, raw, logprob, top or [])
