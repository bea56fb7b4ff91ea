"""Chat messages: validation, prompt rendering with the model's chat template, truncation."""

from __future__ import annotations

from typing import Any, Callable, Union

from .errors import InvalidRequestError

Messages = Union[str, list[dict[str, Any]]]
ROLES = ("system", "developer", "user", "assistant", "tool")


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text parts are supported
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(f"{where}[{j}] must be a text part {{'type': 'text', 'text': ...}}.", param=where)
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequestError(f"{where} must be a string, got {type(content).__name__}.", param=where)


def normalize_messages(messages: Messages) -> list[dict[str, Any]]:
    """Validate OpenAI-style messages (or a single user string) into plain dicts."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty list of messages.", param="messages")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequestError(f"{where} must be an object with 'role' and 'content'.", param=where)
        role = msg.get("role")
        if role not in ROLES:
            raise InvalidRequestError(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}.", param=f"{where}.role")
        content = msg.get("content")
        if content is None and role == "assistant" and msg.get("tool_calls"):
            content = ""
        if content is None:
            raise InvalidRequestError(f"{where}.content is missing.", param=f"{where}.content")
        clean = dict(msg)
        clean["role"] = "system" if role == "developer" else role
        clean["content"] = _content_text(content, f"{where}.content")
        out.append(clean)
    return out


def render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
    """The prompt text the model sees for ``messages``."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("This model has no chat template; use generate() with a raw prompt.", param="messages")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs)


def truncate_oldest(messages: list[dict[str, Any]], fits: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """Drop the oldest non-system turns until ``fits(messages)``; system messages and the last
    message are always kept. Returns the shortest list tried if nothing fits."""
    msgs = list(messages)
    while not fits(msgs):
        droppable = [i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"]
        if not droppable:
            break
        del msgs[droppable[0]]
    return msgs
