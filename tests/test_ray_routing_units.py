"""The prefix-aware router's input: chained block hashes of a request's prompt, set by the
proxy's middleware on generation routes only (pure functions, no cluster)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed")

from llamawrapper.deploy.routing import BLOCK_CHARS, PREFIX_HEADER, prefix_hashes, with_prefix_header  # noqa: E402

SYSTEM = "You are a careful assistant of the Lyon desk. " * 8  # several blocks


def _chat(system: str, question: str, model: str = "smollm2") -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "system", "content": system},
                                                    {"role": "user", "content": question}]}).encode()


def test_shared_prefix_shares_exactly_the_leading_hashes():
    a, b = prefix_hashes(_chat(SYSTEM, "Where is the shop?")), prefix_hashes(_chat(SYSTEM, "When do you open?"))
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared >= len(SYSTEM) // BLOCK_CHARS  # every block of the system prompt matches...
    assert a[shared:] != b[shared:]             # ...and nothing after the questions differ
    other_desk = prefix_hashes(_chat(SYSTEM.replace("Lyon", "Nice"), "Where is the shop?"))
    assert not set(other_desk) & set(a)         # a different start shares nothing
    assert not set(prefix_hashes(_chat(SYSTEM, "Where is the shop?", model="other"))) & set(a)


def test_completions_prompt_and_bad_bodies():
    assert prefix_hashes(json.dumps({"model": "m", "prompt": "x" * (3 * BLOCK_CHARS)}).encode())
    assert prefix_hashes(b"not json") == [] and prefix_hashes(b"[1, 2]") == [] and prefix_hashes(b"{}") == []


def test_header_only_on_generation_routes_and_never_from_the_client():
    forged = [(PREFIX_HEADER, b"forged"), (b"content-type", b"application/json")]
    scope = with_prefix_header({"path": "/v1/chat/completions", "headers": forged}, _chat(SYSTEM, "Hi"))
    values = [v for k, v in scope["headers"] if k == PREFIX_HEADER]
    assert len(values) == 1 and values[0].decode().split(",") == prefix_hashes(_chat(SYSTEM, "Hi"))
    untouched = {"path": "/v1/models", "headers": forged}
    assert with_prefix_header(untouched, b"{}") is untouched
