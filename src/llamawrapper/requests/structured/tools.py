"""Tool calling, OpenAI-shaped: validates ``tools`` and ``tool_choice``, describes the tools to
the model, builds the grammar that makes a call well-formed, and parses the answer into
``tool_calls``.

Wire format the model writes (the Hermes/Qwen convention, which small instruct models follow):
``<tool_call>{"name": "...", "arguments": {...}}</tool_call>``. The grammar guarantees it:

- ``tool_choice="none"``: free text, tools are not described;
- ``"auto"``: free text (not starting with ``<``) *or* exactly one well-formed call;
- ``"required"``: exactly one call to any of the tools;
- ``{"type": "function", "function": {"name": N}}``: exactly one call to N.

Templates that know tools (their source mentions ``tools``) get ``tools=`` and the messages as
they are; for the others, a system message describes the tools, earlier assistant calls are
written back in the wire format and ``role: "tool"`` results become ``<tool_response>`` turns.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from ...errors import InvalidRequestError
from .grammar import JSON_DEFAULTS, json_schema_grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolSpec:
    """Validated tools and choice of one request."""

    functions: list[dict[str, Any]]  # [{"name", "description", "parameters"}]
    choice: Any  # "none" | "auto" | "required" | function name (str wrapped in dict)

    @property
    def forced_name(self) -> Optional[str]:
        return self.choice["function"]["name"] if isinstance(self.choice, dict) else None

    @property
    def active(self) -> bool:
        return bool(self.functions) and self.choice != "none"


def _dump(obj: Any) -> Any:
    return obj.model_dump(exclude_none=True) if hasattr(obj, "model_dump") else obj


def parse_tools(tools: Any, tool_choice: Any = None) -> Optional[ToolSpec]:
    """Validate OpenAI ``tools``/``tool_choice``; None when no tools are given."""
    tools = _dump(tools)
    tool_choice = _dump(tool_choice)
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice needs a non-empty 'tools' list.", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise InvalidRequestError("'tools' must be a list of function tools.", param="tools")
    functions = []
    for i, tool in enumerate(_dump(t) for t in tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
            raise InvalidRequestError(f"{where} must be {{'type': 'function', 'function': {{...}}}}.", param=where)
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise InvalidRequestError(f"{where}.function.name must be a non-empty string of at most 64 characters.",
                                      param=f"{where}.function.name")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        json_schema_grammar(params, f"{where}.function.parameters")  # refuses unsupported features by name
        functions.append({"name": name, "description": fn.get("description", ""), "parameters": params})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise InvalidRequestError("Tool names must be unique.", param="tools")
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise InvalidRequestError(f"tool_choice names function {name!r}, which is not in 'tools'.", param="tool_choice")
        choice = {"type": "function", "function": {"name": name}}
    elif choice not in ("none", "auto", "required"):
        raise InvalidRequestError("tool_choice must be 'none', 'auto', 'required' or "
                                  "{'type': 'function', 'function': {'name': ...}}.", param="tool_choice")
    return ToolSpec(functions, choice)


# -- grammar -------------------------------------------------------------------------------------
def call_schema(spec: ToolSpec) -> dict[str, Any]:
    chosen = [f for f in spec.functions if spec.forced_name in (None, f["name"])]
    variants = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                 "required": ["name", "arguments"], "additionalProperties": False} for f in chosen]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {**schema, "x-guidance": JSON_DEFAULTS}


def tool_grammar(spec: ToolSpec) -> Optional[str]:
    """The llguidance grammar for this choice, or None when output is free text."""
    if not spec.active:
        return None
    import llguidance

    call = f'call: "{OPEN}" body "{CLOSE}"\nbody: %json {json.dumps(call_schema(spec))}\n'
    if spec.choice == "auto":
        return llguidance.LLMatcher.grammar_from_lark("start: call | text\n" + call + "text: /[^<](.|\\n)*/\n")
    return llguidance.LLMatcher.grammar_from_lark("start: call\n" + call)


# -- prompt rendering ------------------------------------------------------------------------------
def template_supports_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template


def openai_tools(spec: ToolSpec) -> list[dict[str, Any]]:
    return [{"type": "function", "function": f} for f in spec.functions]


def system_text(spec: ToolSpec) -> str:
    lines = [json.dumps(f, ensure_ascii=False) for f in spec.functions]
    if spec.forced_name:
        how = f"You must call {spec.forced_name}."
    else:
        how = "You must call one of them." if spec.choice == "required" else "If a tool helps, call it; otherwise answer normally."
    return ("You can call these tools:\n<tools>\n" + "\n".join(lines) + "\n</tools>\n" + how +
            f' To call a tool, reply with only {OPEN}{{"name": <tool name>, "arguments": <arguments object>}}{CLOSE}.')


def render_messages(messages: list[dict[str, Any]], spec: Optional[ToolSpec], native: bool) -> list[dict[str, Any]]:
    """Messages a template without tool support can render: tools described in the system
    message, assistant ``tool_calls`` in the wire format, ``tool`` results as user turns."""
    if native:
        return messages
    out: list[dict[str, Any]] = []
    for msg in messages:
        role, content = msg["role"], msg.get("content") or ""
        if role == "assistant" and msg.get("tool_calls"):
            calls = []
            for call in msg["tool_calls"]:
                call = _dump(call)
                fn = call.get("function", {})
                args = fn.get("arguments", "{}")
                args = json.loads(args) if isinstance(args, str) and args.strip() else (args or {})
                calls.append(OPEN + json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False) + CLOSE)
            out.append({"role": "assistant", "content": (content + "\n" if content else "") + "\n".join(calls)})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({k: v for k, v in msg.items() if k != "tool_calls"})
    if spec is not None and spec.active:
        text = system_text(spec)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


# -- parsing the answer ------------------------------------------------------------------------------
def parse_calls(text: str) -> Optional[list[dict[str, Any]]]:
    """OpenAI-shaped ``tool_calls`` from an answer in the wire format, or None for plain text."""
    start = text.find(OPEN)
    if start < 0 or text[:start].strip():
        return None
    calls = []
    while start >= 0:
        end = text.find(CLOSE, start)
        if end < 0:
            return None
        try:
            body = json.loads(text[start + len(OPEN) : end])
        except ValueError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return None
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": body["name"], "arguments": json.dumps(body.get("arguments", {}), ensure_ascii=False)}})
        start = text.find(OPEN, end)
    return calls
