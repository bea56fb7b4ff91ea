"""Endings on the real model: the text of a request is exactly the decoding of the tokens it
generated (less a stop string and what follows it, less an incomplete last character), for
answers ended by max_tokens, by a stop string and by EOS, streamed and not, through the Python
API and over HTTP."""

from __future__ import annotations

import httpx
import pytest

from server_helpers import ServerProcess

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]
SHORT = [{"role": "user", "content": "Reply with just the word yes."}]
PROMPT = "The history of the city of Paris"
EMOJI = "Emoji: 😀 😃 😄 😁 😆"


def decode(llm, ids: list[int]) -> str:
    return llm.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def streamed(events) -> tuple[str, list[int], str]:
    events = list(events)
    assert all(e.finish_reason is None for e in events[:-1])
    return "".join(e.text for e in events), [t for e in events for t in e.token_ids], events[-1].finish_reason


def cut_inside_a_character(llm) -> tuple[int, list[int]]:
    """A max_tokens that ends the greedy answer to EMOJI inside a multi-byte character."""
    ids = llm.generate(EMOJI, max_tokens=12, temperature=0).token_ids
    cuts = [k for k in range(2, len(ids)) if decode(llm, ids[:k]).endswith("\ufffd")]
    assert cuts, "the model must answer with characters split across tokens for this test to mean anything"
    return cuts[0], ids


# -- Python API ------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_length_ending_keeps_the_last_token(smollm2, stream):
    for call in ("chat", "generate"):
        arg = CHAT if call == "chat" else PROMPT
        if stream:
            text, ids, reason = streamed(getattr(smollm2, "stream" if call == "chat" else "stream_generate")(arg, max_tokens=7, temperature=0))
        else:
            r = getattr(smollm2, call)(arg, max_tokens=7, temperature=0)
            text, ids, reason = r.text, r.token_ids, r.finish_reason
        assert reason == "length" and len(ids) == 7
        assert text == decode(smollm2, ids)
        assert text != decode(smollm2, ids[:-1])  # the last token's text is there


@pytest.mark.parametrize("stream", [False, True])
def test_cut_inside_a_character_drops_its_bytes(smollm2, stream):
    k, longer = cut_inside_a_character(smollm2)
    if stream:
        events = list(smollm2.stream_generate(EMOJI, max_tokens=k, temperature=0))
        text, ids, reason = streamed(events)
        assert all("\ufffd" not in e.text for e in events)
    else:
        r = smollm2.generate(EMOJI, max_tokens=k, temperature=0)
        text, ids, reason = r.text, r.token_ids, r.finish_reason
    assert reason == "length" and ids == longer[:k]
    assert "\ufffd" not in text
    assert text == decode(smollm2, ids).rstrip("\ufffd")
    assert decode(smollm2, longer).startswith(text)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_ending_is_the_decoding_up_to_the_stop_string(smollm2, stream):
    base = smollm2.chat(CHAT, max_tokens=40, temperature=0)
    words = decode(smollm2, base.token_ids).split()
    stop = " " + words[len(words) // 2]
    if stream:
        text, ids, reason = streamed(smollm2.stream(CHAT, max_tokens=40, temperature=0, stop=[stop]))
    else:
        r = smollm2.chat(CHAT, max_tokens=40, temperature=0, stop=[stop])
        text, ids, reason = r.text, r.token_ids, r.finish_reason
    full = decode(smollm2, ids)
    assert reason == "stop" and stop in full
    assert text == full[: full.index(stop)]
    assert text == base.text[: base.text.index(stop)]


@pytest.mark.parametrize("stream", [False, True])
def test_eos_ending_is_the_whole_decoding(smollm2, stream):
    if stream:
        text, ids, reason = streamed(smollm2.stream(SHORT, max_tokens=64, temperature=0))
    else:
        r = smollm2.chat(SHORT, max_tokens=64, temperature=0)
        text, ids, reason = r.text, r.token_ids, r.finish_reason
    assert reason == "stop" and ids[-1] in smollm2.engine.eos_token_ids and len(ids) < 64
    assert text and text == decode(smollm2, ids)


# -- over HTTP ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_folder):
    srv = ServerProcess(["smollm2"], log_path=tmp_path_factory.mktemp("endings") / "server.log")
    try:
        yield srv.wait_ready()
    finally:
        srv.terminate()


def sse_chunks(client: httpx.Client, path: str, body: dict) -> list[dict]:
    import json

    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def http_text(server, kind: str, body: dict, stream: bool) -> tuple[str, str]:
    """(text, finish_reason) of one chat or completion over HTTP."""
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    body = {"model": "smollm2", "temperature": 0, **body}
    with server.client() as client:
        if not stream:
            r = client.post(path, json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            return (choice["message"]["content"] if kind == "chat" else choice["text"]), choice["finish_reason"]
        chunks = sse_chunks(client, path, body)
    pieces = [c["choices"][0]["delta"].get("content") or "" if kind == "chat" else c["choices"][0]["text"]
              for c in chunks if c["choices"]]
    assert all("\ufffd" not in p for p in pieces)
    return "".join(pieces), [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]


@pytest.mark.parametrize("stream", [False, True])
def test_http_length_and_eos_endings(server, smollm2, stream):
    for kind, body, api in (("chat", {"messages": CHAT, "max_tokens": 7}, lambda: smollm2.chat(CHAT, max_tokens=7, temperature=0)),
                            ("completion", {"prompt": PROMPT, "max_tokens": 7}, lambda: smollm2.generate(PROMPT, max_tokens=7, temperature=0)),
                            ("chat", {"messages": SHORT, "max_tokens": 64}, lambda: smollm2.chat(SHORT, max_tokens=64, temperature=0))):
        ids = api().token_ids
        text, reason = http_text(server, kind, body, stream)
        assert reason == ("length" if len(ids) == body["max_tokens"] else "stop")
        assert text == decode(smollm2, ids)


@pytest.mark.parametrize("stream", [False, True])
def test_http_cut_inside_a_character(server, smollm2, stream):
    k, longer = cut_inside_a_character(smollm2)
    text, reason = http_text(server, "completion", {"prompt": EMOJI, "max_tokens": k}, stream)
    assert reason == "length" and "\ufffd" not in text
    assert text == decode(smollm2, longer[:k]).rstrip("\ufffd")


@pytest.mark.parametrize("stream", [False, True])
def test_http_stop_ending(server, smollm2, stream):
    base = smollm2.chat(CHAT, max_tokens=40, temperature=0)
    full = decode(smollm2, base.token_ids)
    stop = " " + full.split()[len(full.split()) // 2]
    text, reason = http_text(server, "chat", {"messages": CHAT, "max_tokens": 40, "stop": [stop]}, stream)
    assert reason == "stop" and text == full[: full.index(stop)]
