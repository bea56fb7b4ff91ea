"""Structured output: grammars from response formats (``grammar``) and tool calling (``tools``),
enforced through the engine's per-request logits processor."""
