"""Log-probabilities in OpenAI's two wire shapes, from the library's ``TokenLogprob`` entries.

- chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": null}``;
- legacy completions: ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``,
  where each ``top_logprobs`` dict holds the asked-for alternatives plus the chosen token (as
  OpenAI's does), and ``text_offset`` is where each token's text starts in the choice's text.
  With ``echo``, the prompt's tokens come first; the first has ``null`` values (nothing predicts it).
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..types import TokenLogprob


def chat_logprobs(entries: Optional[Sequence[TokenLogprob]]) -> Optional[dict]:
    if entries is None:
        return None
    return {"content": [t.to_dict() for t in entries], "refusal": None}


class CompletionLogprobs:
    """Builds the legacy shape for one choice, chunk by chunk (``text_offset`` runs on)."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset

    def prompt(self, first_token: str, entries: Sequence[Optional[TokenLogprob]]) -> dict:
        """The echoed prompt's part: ``first_token`` is the text of the prompt's first token."""
        out = {"tokens": [first_token], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [self.offset]}
        self.offset += len(first_token)
        return join(out, self([e for e in entries[1:] if e is not None]))

    def __call__(self, entries: Optional[Sequence[TokenLogprob]]) -> Optional[dict]:
        if entries is None:
            return None
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in entries:
            out["tokens"].append(t.token)
            out["token_logprobs"].append(t.logprob)
            top = {a.token: a.logprob for a in t.top_logprobs}
            top.setdefault(t.token, t.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(t.token)
        return out


def join(*parts: Optional[dict]) -> Optional[dict]:
    """Legacy logprobs of consecutive pieces of one choice as one object."""
    given = [p for p in parts if p is not None]
    if not given:
        return None
    return {key: [v for p in given for v in p[key]] for key in given[0]}
