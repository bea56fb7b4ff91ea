"""Streaming detokenizer: turns tokens into text deltas that are always whole characters.

It decodes a small window of recent tokens and emits only what the window adds, holding text
back while it ends in an incomplete UTF-8 sequence (U+FFFD), so emoji, CJK and accented
characters split across tokens arrive intact. At the end of a request, the bytes of a character
that was never completed (the answer was cut inside it) are dropped rather than shown as U+FFFD,
so the text is always the decoding of the generated tokens less an incomplete last character.
"""

from __future__ import annotations

from typing import Any


class StreamingDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """The end of the text: whatever is still held back, less the replacement characters of
        an incomplete character at the very end (its bytes can no longer be completed)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :].rstrip("\ufffd") if len(full) > len(prefix) else ""
