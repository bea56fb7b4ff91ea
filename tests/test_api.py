"""The Python API on a tiny random-weight Llama: results, streams, stops, seeds, limits, errors."""

import pytest

from llamawrapper import (
    ContextLengthExceededError,
    GenerationError,
    InvalidRequestError,
    LlamaWrapper,
    Result,
)

Q = [{"role": "user", "content": "Say something."}]


def test_chat_returns_result_with_usage(tiny_llm):
    res = tiny_llm.chat("hello", max_tokens=8, temperature=0)
    assert isinstance(res, Result)
    assert res.finish_reason in ("stop", "length")
    assert res.usage.prompt_tokens == tiny_llm.count_tokens([{"role": "user", "content": "hello"}])
    assert res.usage.completion_tokens == len(res.token_ids) <= 8


def test_max_tokens_gives_length(tiny_llm):
    res = tiny_llm.generate("The", max_tokens=5, temperature=0, stop=None)
    if res.finish_reason == "length":
        assert res.usage.completion_tokens == 5
    else:  # the random model emitted EOS early
        assert res.usage.completion_tokens <= 5


def test_stream_concatenation_equals_chat(tiny_llm):
    res = tiny_llm.chat(Q, max_tokens=24, temperature=0)
    events = list(tiny_llm.stream(Q, max_tokens=24, temperature=0))
    assert "".join(e.text for e in events) == res.text
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].finish_reason == res.finish_reason
    assert events[-1].usage.completion_tokens == res.usage.completion_tokens


def test_greedy_is_deterministic(tiny_llm):
    a = tiny_llm.chat(Q, max_tokens=16, temperature=0)
    b = tiny_llm.chat(Q, max_tokens=16, temperature=0)
    assert a.token_ids == b.token_ids


def test_seed_reproduces_a_sampled_answer(tiny_llm):
    runs = [tiny_llm.chat(Q, max_tokens=16, temperature=1.0, seed=s).token_ids for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_stop_string_is_cut_and_never_returned(tiny_llm):
    full = tiny_llm.generate("Once upon", max_tokens=30, temperature=0)
    assert len(full.text) > 10
    stop = full.text[6:10]  # a stop string from the middle of the answer
    cut = tiny_llm.generate("Once upon", max_tokens=30, temperature=0, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    streamed = "".join(e.text for e in tiny_llm.stream_generate("Once upon", max_tokens=30, temperature=0, stop=stop))
    assert streamed == cut.text


def test_stop_string_spanning_tokens(tiny_llm):
    full = tiny_llm.generate("Once upon", max_tokens=30, temperature=0)
    # text pieces of individual tokens; pick a stop that starts in one and ends in the next
    pieces = [tiny_llm.detokenize([t]) for t in full.token_ids]
    pos, i = 0, 0
    while i < len(pieces) - 1 and (len(pieces[i]) < 2 or len(pieces[i + 1]) < 1):
        pos += len(pieces[i])
        i += 1
    span = full.text[pos + len(pieces[i]) - 1 : pos + len(pieces[i]) + 1]
    assert len(span) == 2
    cut = tiny_llm.generate("Once upon", max_tokens=30, temperature=0, stop=span)
    assert span not in cut.text and cut.finish_reason == "stop"
    assert full.text.startswith(cut.text)


def test_context_limit_states_both_numbers(tiny_llm):
    long = "word " * 600
    with pytest.raises(ContextLengthExceededError) as info:
        tiny_llm.chat(long, max_tokens=10)
    err = info.value
    assert err.context_length == 512 and err.prompt_tokens > 512
    assert str(err.context_length) in str(err) and str(err.prompt_tokens) in str(err)


def test_truncation_drops_oldest_turns_keeps_system(tiny_llm):
    system = {"role": "system", "content": "You are terse."}
    turns = [{"role": r, "content": "filler " * 60} for r in ["user", "assistant"] * 5]
    msgs = [system] + turns + [{"role": "user", "content": "last question"}]
    with pytest.raises(ContextLengthExceededError):
        tiny_llm.chat(msgs, max_tokens=50)
    ids = tiny_llm.chat_prompt_ids(msgs, max_tokens=50, truncate="oldest")
    assert len(ids) + 50 <= tiny_llm.context_length
    text = tiny_llm.detokenize(ids)
    assert "You are terse." in text and "last question" in text
    res = tiny_llm.chat(msgs, max_tokens=5, truncate="oldest", temperature=0)
    assert res.usage.completion_tokens <= 5


def test_batch_returns_results_in_order(tiny_llm):
    items = ["one", [{"role": "user", "content": "two"}], "three"]
    results = tiny_llm.batch(items, max_tokens=6, temperature=0)
    singles = [tiny_llm.chat(i, max_tokens=6, temperature=0) for i in items]
    assert [r.token_ids for r in results] == [s.token_ids for s in singles]


def test_tokenize_roundtrip_and_count(tiny_llm):
    ids = tiny_llm.tokenize("Hello world")
    assert tiny_llm.detokenize(ids) == "Hello world"
    assert tiny_llm.count_tokens("Hello world") == len(ids)
    prompt = tiny_llm.apply_chat_template(Q)
    assert "Say something." in prompt
    assert tiny_llm.count_tokens(Q) == len(tiny_llm.tokenize(prompt))


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"seed": "x"}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_bad_parameters_name_the_parameter(tiny_llm, kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        tiny_llm.chat("hi", **kwargs)
    assert info.value.param == param
    assert param in str(info.value)


@pytest.mark.parametrize(
    "messages, param",
    [
        ([], "messages"),
        ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": 42}], "messages[0].content"),
        ([{"role": "user"}], "messages[0].content"),
        (["just a string in a list"], "messages[0]"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content"),
    ],
)
def test_bad_messages_name_the_problem(tiny_llm, messages, param):
    with pytest.raises(InvalidRequestError) as info:
        tiny_llm.chat(messages, max_tokens=2)
    assert info.value.param == param


def test_content_parts_are_accepted(tiny_llm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "something."}]}]
    assert tiny_llm.apply_chat_template(parts) == tiny_llm.apply_chat_template(Q)


def test_breaking_out_of_a_stream_cancels_it(tiny_llm):
    before = tiny_llm.engine.snapshot()["cancelled"]
    stream = tiny_llm.stream(Q, max_tokens=200, temperature=0, stop=None)
    next(stream)
    stream.close()
    import time

    deadline = time.time() + 5
    while time.time() < deadline and tiny_llm.engine.snapshot()["cancelled"] == before:
        time.sleep(0.01)
    snap = tiny_llm.engine.snapshot()
    assert snap["cancelled"] == before + 1


def test_context_manager_closes_engine(tiny_model_dir):
    with LlamaWrapper.load(str(tiny_model_dir), progress=False) as llm:
        assert llm.chat("x", max_tokens=2, temperature=0).usage.completion_tokens >= 1
    assert llm.engine not in llm.engine.executor._workers  # the executor no longer steps it
    with pytest.raises(GenerationError, match="shut down"):
        llm.chat("x", max_tokens=2, temperature=0)
