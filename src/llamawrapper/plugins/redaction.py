"""PII redaction: e-mail addresses, phone numbers and payment-card numbers, in whole texts and
in streams whose deltas may split a match (``RedactingStream`` holds back the tail of the text
that could still grow into a match, so a stream redacts exactly what the whole text would)."""

from __future__ import annotations

import re

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# 13-19 digits, optionally grouped by single spaces or dashes (checked with Luhn below).
CARD = re.compile(r"(?<![\d])\d(?:[ -]?\d){12,18}(?![\d])")
# International or national phone numbers: 7-15 digits with the usual separators.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?![\w])")
LABELS = {"email": "[EMAIL]", "card": "[CARD]", "phone": "[PHONE]"}


def _luhn(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group())
    return LABELS["card"] if _luhn(digits) else m.group()


DATE = re.compile(r"\d{4}[-.]\d{2}[-.]\d{2}|\d{2}[-.]\d{2}[-.]\d{4}")


def _phone(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group())
    if DATE.fullmatch(m.group()):  # 2024-05-01 has eight digits but is a date
        return m.group()
    return LABELS["phone"] if 7 <= len(digits) <= 15 else m.group()


def redact(text: str, kinds: tuple[str, ...] = ("email", "card", "phone")) -> str:
    """``text`` with every e-mail, card and phone number replaced by a label."""
    if "email" in kinds:
        text = EMAIL.sub(LABELS["email"], text)
    if "card" in kinds:
        text = CARD.sub(_card, text)
    if "phone" in kinds:
        text = PHONE.sub(_phone, text)
    return text


# The longest suffix that a later delta could still extend into a match: a number with its
# separators (and an opening "+" or "("), or a word that may be (part of) an e-mail address.
_OPEN_TAIL = re.compile(r"(?:[+(]*\d[\d ().+-]*|[\w.%+-]+@?[\w.-]*|[+(]+)$")


def _holdback(text: str) -> int:
    """Where the still-open tail of ``text`` begins."""
    m = _OPEN_TAIL.search(text)
    return m.start() if m else len(text)


class RedactingStream:
    """Stream filter: emits redacted text, holding back a tail that could still become a match."""

    def __init__(self, kinds: tuple[str, ...] = ("email", "card", "phone")) -> None:
        self.kinds = kinds
        self.pending = ""

    def feed(self, delta: str) -> str:
        self.pending += delta
        cut = _holdback(self.pending)
        if cut == 0:
            return ""
        # Redact the whole pending text, then emit the part before the open tail; the tail's
        # characters were not touched by any match that also covers emitted text.
        ready, self.pending = self.pending[:cut], self.pending[cut:]
        return redact(ready, self.kinds)

    def flush(self) -> str:
        out, self.pending = redact(self.pending, self.kinds), ""
        return out
