"""Built-in plugins, registered through the same hooks as third-party ones:

- ``system_prompt``: adds a system message when the request has none
  (options: ``text``; ``mode = "prepend"`` puts it before an existing system message instead);
- ``pii_redaction``: redacts e-mails, phone numbers and card numbers in prompts and/or answers
  (options: ``where = "both" | "prompt" | "answer"``, ``kinds = ["email", "phone", "card"]``);
- ``input_guard``: refuses requests whose messages are longer than ``max_chars`` characters
  in total or have more than ``max_messages`` messages.
"""

from __future__ import annotations

from typing import Any, Optional

from ..errors import InvalidRequestError
from . import hookimpl
from .redaction import RedactingStream, redact

DEFAULT_KINDS = ("email", "phone", "card")


class SystemPrompt:
    @hookimpl
    def before_request(self, messages: list, options: dict) -> None:
        text = options.get("text")
        if not text:
            return
        if messages and messages[0].get("role") in ("system", "developer"):
            if options.get("mode") == "prepend":
                messages[0] = {**messages[0], "content": f"{text}\n\n{messages[0]['content']}"}
            return
        messages.insert(0, {"role": "system", "content": text})


def _kinds(options: dict) -> tuple[str, ...]:
    kinds = tuple(options.get("kinds") or DEFAULT_KINDS)
    unknown = set(kinds) - set(DEFAULT_KINDS)
    if unknown:
        raise ValueError(f"unknown PII kind(s) {sorted(unknown)}; known: {', '.join(DEFAULT_KINDS)}")
    return kinds


class PIIRedaction:
    @hookimpl
    def before_request(self, messages: list, options: dict) -> None:
        if options.get("where", "both") in ("both", "prompt"):
            kinds = _kinds(options)
            for i, m in enumerate(messages):
                if isinstance(m.get("content"), str):
                    messages[i] = {**m, "content": redact(m["content"], kinds)}

    @hookimpl
    def stream_filter(self, options: dict) -> Optional[RedactingStream]:
        if options.get("where", "both") in ("both", "answer"):
            return RedactingStream(_kinds(options))
        return None

    @hookimpl
    def after_response(self, text: str, options: dict) -> Optional[str]:
        if options.get("where", "both") in ("both", "answer"):
            return redact(text, _kinds(options))
        return None


class InputGuard:
    @hookimpl
    def before_request(self, messages: list, options: dict) -> None:
        max_chars = int(options.get("max_chars", 32000))
        max_messages = int(options.get("max_messages", 256))
        total = sum(len(m.get("content") or "") for m in messages)
        if total > max_chars:
            raise InvalidRequestError(f"The input is {total} characters long; this model accepts at most {max_chars}.",
                                      param="messages")
        if len(messages) > max_messages:
            raise InvalidRequestError(f"The request has {len(messages)} messages; this model accepts at most {max_messages}.",
                                      param="messages")


BUILTINS: dict[str, Any] = {"system_prompt": SystemPrompt(), "pii_redaction": PIIRedaction(), "input_guard": InputGuard()}
