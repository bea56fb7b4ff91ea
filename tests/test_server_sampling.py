"""Every OpenAI sampling parameter over a real server on smollm2, spoken to by the official
``openai`` client: logprobs (chat and legacy completions, streamed and not), logit_bias,
penalties, ``n`` seeded choices, max_completion_tokens, user, stream_options,
parallel_tool_calls, vLLM's ignore_eos; fields the server cannot honour and bad values are 400s naming them."""

from __future__ import annotations

import httpx
import pytest

from server_helpers import ServerProcess, openai_client

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "Write one sentence about the sea."}]
REPEATS = "Emoji: 😀 😃 😄 😁 😆"


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_folder):
    srv = ServerProcess(["smollm2"], log_path=tmp_path_factory.mktemp("sampling") / "server.log")
    try:
        yield srv.wait_ready()
    finally:
        srv.terminate()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, timeout=120)


def test_chat_logprobs_match_the_library_and_the_text(client, smollm2):
    res = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=10, temperature=0,
                                         logprobs=True, top_logprobs=3)
    choice = res.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    assert b"".join(bytes(t.bytes) for t in content).decode() == choice.message.content
    lib = smollm2.chat(MSG, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    assert [t.token for t in content] == [t.token for t in lib.logprobs]
    assert [t.logprob for t in content] == pytest.approx([t.logprob for t in lib.logprobs], abs=1e-4)
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy: the best one

    chunks = list(client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=10, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    # the second request reuses the cached prompt prefix: the same numbers up to float rounding
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)
    plain = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_legacy_shape(client):
    res = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2)
    lp = res.choices[0].logprobs
    text = res.choices[0].text
    assert "".join(lp.tokens) == text and len(lp.token_logprobs) == len(lp.tokens) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(lp.tokens))]
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and top[tok] == value and max(top.values()) == value  # greedy picks the best
        assert 2 <= len(top) <= 3
    streamed = list(client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6,
                                              temperature=0, logprobs=2, stream=True))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in streamed if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset


def test_logit_bias_forces_a_token(client, smollm2):
    forced = smollm2.tokenize(" Paris")[0]
    res = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=4, temperature=1, seed=2,
                                         logit_bias={str(forced): 100})
    assert res.choices[0].message.content == " Paris" * 4


def test_penalties_reduce_repeats(client):
    def repeats(**kw) -> int:
        res = client.completions.create(model="smollm2", prompt=REPEATS, max_tokens=24, temperature=0, logprobs=0, **kw)
        tokens = res.choices[0].logprobs.tokens
        return len(tokens) - len(set(tokens))

    base = repeats()
    assert base >= 8
    assert repeats(frequency_penalty=2.0) < base / 2
    assert repeats(presence_penalty=2.0) < base / 2


def test_n_sampled_choices_differ_and_reproduce_with_the_seed(client):
    def texts(seed):
        res = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=16, temperature=1, seed=seed, n=3)
        assert [c.index for c in res.choices] == [0, 1, 2]
        return [c.message.content for c in res.choices]

    first = texts(11)
    assert len(set(first)) == 3
    assert texts(11) == first
    assert texts(12) != first
    single = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=16, temperature=1, seed=11)
    assert single.choices[0].message.content == first[0]  # choice 0 uses the seed itself
    completions = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=12, temperature=1,
                                            seed=5, n=2)
    assert completions.choices[0].text != completions.choices[1].text


def test_ignore_eos_goes_on_to_max_tokens(client):
    """vLLM's ``ignore_eos``: an answer that ends by itself goes on to ``max_tokens``."""
    ask = dict(model="smollm2", messages=[{"role": "user", "content": "Reply with one word: yes or no. Is water wet?"}],
               max_tokens=40, temperature=0)
    short = client.chat.completions.create(**ask)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 40
    long = client.chat.completions.create(**ask, extra_body={"ignore_eos": True})
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 40
    assert long.choices[0].message.content.startswith(short.choices[0].message.content)
    assert len(long.choices[0].message.content) > len(short.choices[0].message.content)


def test_max_completion_tokens_user_parallel_tool_calls(client, server):
    res = client.chat.completions.create(model="smollm2", messages=MSG, max_completion_tokens=3, temperature=0,
                                         user="user-42", parallel_tool_calls=False)
    assert res.usage.completion_tokens == 3 and res.choices[0].finish_reason == "length"
    assert any(rec.get("end_user") == "user-42" for rec in server.log_records())


def test_stream_options_include_usage_and_needs_stream(client, server):
    chunks = list(client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=4, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json={"model": "smollm2", "messages": MSG, "max_tokens": 2,
                                                 "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
    ("/v1/chat/completions", {"store": True}, "store"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/completions", {"suffix": "the end"}, "suffix"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"logit_bias": {"abc": 5}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"10": 101}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"4900000": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"10": -100.5}}, "logit_bias"),
    ("/v1/chat/completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"frequency_penalty": -2.1}, "frequency_penalty"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/chat/completions", {"ignore_eos": "maybe"}, "ignore_eos"),
])
def test_refused_and_bad_values_are_400_naming_them(server, path, extra, param):
    body = {"model": "smollm2", "max_tokens": 2, **({"messages": MSG} if "chat" in path else {"prompt": "Hello"}), **extra}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]


def test_no_op_values_of_refused_fields_and_unknown_fields_pass(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json={"model": "smollm2", "messages": MSG, "max_tokens": 2, "modalities": ["text"],
                                                 "store": False, "service_tier": "auto", "frobnicate": 1})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_scores_the_prompt(client, smollm2, stream):
    prompt = "The capital of France is Paris"
    kw = dict(model="smollm2", prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
        text = "".join(c.text for c in chunks)
        lp = {k: [v for c in chunks if c.logprobs for v in getattr(c.logprobs, k)]
              for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    else:
        choice = client.completions.create(**kw).choices[0]
        text, lp = choice.text, vars(choice.logprobs)
    ids = smollm2.tokenize(prompt, add_special_tokens=True)
    lib = smollm2.generate(prompt, max_tokens=1, temperature=0, prompt_logprobs=1)
    assert text.startswith(prompt) and "".join(lp["tokens"]) == text
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx([t.logprob for t in lib.prompt_logprobs[1:]], abs=1e-4)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:k]) for k in range(len(lp["tokens"]))]
