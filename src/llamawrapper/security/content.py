"""Prompt and answer text for the audit log, only when ``log_content`` is on, always passed
through the PII redaction plugin's ``redact`` (e-mails, phone and card numbers).

``request_text`` reads an OpenAI request body (chat ``messages`` or completion ``prompt``);
``ContentCapture`` collects a response (JSON or an SSE stream, up to ``MAX_BYTES``) and gives
back the answer text of its choices."""

from __future__ import annotations

import json
from typing import Any, Optional

from ..plugins.redaction import redact

MAX_BYTES = 1 << 20


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def request_text(body: Any) -> Optional[str]:
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("messages"), list):
        text = "\n".join(f"{m.get('role', '')}: {_text_of(m.get('content'))}" for m in body["messages"] if isinstance(m, dict))
    elif "prompt" in body:
        prompt = body["prompt"]
        text = prompt if isinstance(prompt, str) else "\n".join(p for p in prompt if isinstance(p, str)) if isinstance(prompt, list) else ""
    elif "input" in body:
        text = body["input"] if isinstance(body["input"], str) else json.dumps(body["input"])
    else:
        return None
    return redact(text)


def _choice_text(choice: dict) -> str:
    message = choice.get("message") or choice.get("delta") or {}
    return _text_of(message.get("content")) if isinstance(message, dict) and "content" in message else choice.get("text") or ""


class ContentCapture:
    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._stream = False

    def start(self, content_type: str) -> None:
        self._stream = content_type.startswith("text/event-stream")

    def add(self, chunk: bytes) -> None:
        if self._size < MAX_BYTES:
            self._chunks.append(chunk)
            self._size += len(chunk)

    def text(self) -> Optional[str]:
        raw = b"".join(self._chunks).decode("utf-8", "replace")
        texts: dict[int, str] = {}
        try:
            if self._stream:
                for line in raw.splitlines():
                    if line.startswith("data: ") and line[6:].strip() != "[DONE]":
                        for c in json.loads(line[6:]).get("choices", []):
                            texts[c.get("index", 0)] = texts.get(c.get("index", 0), "") + _choice_text(c)
            else:
                for c in json.loads(raw).get("choices", []):
                    texts[c.get("index", 0)] = _choice_text(c)
        except (ValueError, AttributeError):
            return None
        return redact("\n".join(texts[i] for i in sorted(texts))) if texts else None
