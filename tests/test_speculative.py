"""Prompt-lookup speculative decoding (issue 14): drafts from the request's own tokens, verified
in one forward. Greedy answers are the same text with and without it — alone, inside a batch of
mixed requests, cut by max_tokens, ended by a stop string, streamed — and the lever really
engages (drafts proposed and accepted, some rejected) so these comparisons exercise it."""

from __future__ import annotations

import pytest
import torch

from llamawrapper import InvalidRequestError, SamplingParams
from llamawrapper.engine import Engine, EngineConfig
from llamawrapper.engine.speculative import PromptLookup, speculable


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


@pytest.fixture
def engines(tiny_llm):
    """``make(k)``: an engine on the tiny model's runner with ``prompt_lookup=k`` (0 = off)."""
    made = []

    def make(k: int, packed: bool = True, **cfg) -> Engine:
        tok = tiny_llm.tokenizer
        eng = Engine(tiny_llm.engine.runner, tok, [tok.eos_token_id], EngineConfig(prompt_lookup=k, **cfg))
        eng.verify_packed = packed
        made.append(eng)
        return eng

    yield make
    for e in made:
        e.shutdown()


def repetitive_prompts(n: int, seed: int = 1) -> list[list[int]]:
    """Prompts that repeat spans of themselves (as extraction prompts do), so drafts exist."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        span = torch.randint(10, 40000, (6 + 3 * i,), generator=gen).tolist()
        noise = torch.randint(10, 40000, (5,), generator=gen).tolist()
        out.append(span + noise + span + noise[:2] + span[: 3 + i])
    return out


def test_lookup_drafts_what_followed_the_latest_longest_match():
    lk = PromptLookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3])
    assert lk.draft(2) == [4, 5]  # the 3-gram [1 2 3] wins over the later 2-gram [2 3] (followed by 7 8)
    lk = PromptLookup([5, 1, 2, 3, 4, 6, 1, 2, 3])
    assert lk.draft(3) == [4, 6, 1]  # the 3-gram [1 2 3] occurred at 1..3
    assert lk.draft(1) == [4]
    lk = PromptLookup([7, 8, 9, 1, 2, 4, 1, 2])
    assert lk.draft(4) == [4, 1, 2]  # no 3-gram match: the 2-gram [1 2], cut by the sequence's end
    lk.extend([4])
    assert lk.draft(2) == [1, 2]  # [1 2 4] now matches as a 3-gram
    assert PromptLookup([1, 2, 3]).draft(4) == []  # nothing occurred before
    assert PromptLookup([3, 1, 3]).draft(0) == []
    lk = PromptLookup([3, 5, 3, 6, 3])
    assert lk.draft(1) == [6]  # the latest earlier occurrence of the 1-gram


def test_only_plain_argmax_requests_speculate(tiny_llm):
    class R:
        logits_processor = None

        def __init__(self, **kw):
            self.params = SamplingParams(**kw)

    assert speculable(R(temperature=0))
    for kw in ({"temperature": 0.7}, {"temperature": 0, "logprobs": True}, {"temperature": 0, "repetition_penalty": 1.2},
               {"temperature": 0, "presence_penalty": 0.5}, {"temperature": 0, "logit_bias": {5: 2.0}}):
        assert not speculable(R(**kw)), kw
    r = R(temperature=0)
    r.logits_processor = lambda ids, logits: logits
    assert not speculable(r)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_greedy_text_identical_alone_and_in_a_mixed_batch(tiny_llm, engines, packed):
    prompts = repetitive_prompts(6)
    tok = tiny_llm.tokenizer
    mixed = [greedy(40), SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
             greedy(33), greedy(25, logprobs=True, top_logprobs=2), greedy(40, repetition_penalty=1.3), greedy(17)]
    out = {}
    for k in (0, 4):
        eng = engines(k, packed, max_batch_size=8, prefill_chunk=16)
        alone = [eng.submit(p, greedy(40)).result() for p in prompts]
        batch = [h.result() for h in [eng.submit(p, sp) for p, sp in zip(prompts, mixed)]]
        out[k] = (alone, batch, eng.snapshot())
    (alone0, batch0, _), (alone4, batch4, snap) = out[0], out[4]
    assert [r.token_ids for r in alone4] == [r.token_ids for r in alone0]
    assert [r.text for r in alone4] == [r.text for r in alone0]
    assert [r.token_ids for r in batch4] == [r.token_ids for r in batch0]
    assert [r.text for r in batch4] == [r.text for r in batch0]
    lp4, lp0 = batch4[3].logprobs, batch0[3].logprobs  # not speculated; its logits come from a wider forward
    assert [e.token_id for e in lp4] == [e.token_id for e in lp0] == batch0[3].token_ids
    assert max(abs(a.logprob - b.logprob) for a, b in zip(lp4, lp0)) < 1e-4
    assert [r.usage.completion_tokens for r in batch4] == [40, 30, 33, 25, 40, 17]
    assert [r.token_ids for r in batch0][0] == alone0[0].token_ids
    for r in alone4 + batch4:
        assert r.text == tok.decode(r.token_ids, skip_special_tokens=True)
    # the lever engaged, and both of its outcomes (accepted and rejected drafts) happened
    assert snap["verify_steps"] > 0 and 0 < snap["accepted_draft_tokens"] < snap["draft_tokens"]
    assert snap["decode_steps"] < out[0][2]["decode_steps"]


@pytest.mark.parametrize("k", [1, 3, 8])
def test_max_tokens_cut_is_exact(tiny_llm, engines, k):
    tok = tiny_llm.tokenizer
    prompt = repetitive_prompts(3, seed=2)[2]
    off, on = engines(0), engines(k)
    for n in (1, 2, 3, 5, 9, 14):
        a, b = off.submit(prompt, greedy(n)).result(), on.submit(prompt, greedy(n)).result()
        assert b.token_ids == a.token_ids and len(b.token_ids) == n and b.usage.completion_tokens == n
        assert b.text == a.text == tok.decode(b.token_ids, skip_special_tokens=True).rstrip("\ufffd")
        assert b.finish_reason == "length"
    assert on.snapshot()["accepted_draft_tokens"] > 0


def test_stop_string_and_eos_end_the_answer_exactly(tiny_llm, engines):
    prompt = repetitive_prompts(4, seed=3)[3]
    off, on = engines(0), engines(6)
    full = off.submit(prompt, greedy(40)).result()
    assert len(full.text) > 20
    for stop in (full.text[7:10], full.text[-6:-2], "\n"):
        a, b = off.submit(prompt, greedy(40, stop=[stop])).result(), on.submit(prompt, greedy(40, stop=[stop])).result()
        assert (b.text, b.token_ids, b.finish_reason) == (a.text, a.token_ids, a.finish_reason)
        assert b.finish_reason == ("stop" if stop in full.text else "length") and stop not in b.text
    # EOS: make the 5th generated token the end-of-sequence token; both stop there
    eos = full.token_ids[4]
    ends = []
    for k in (0, 6):
        eng = Engine(tiny_llm.engine.runner, tiny_llm.tokenizer, [eos], EngineConfig(prompt_lookup=k))
        try:
            ends.append(eng.submit(prompt, SamplingParams(max_tokens=40, temperature=0)).result())
        finally:
            eng.shutdown()
    assert ends[0].token_ids == ends[1].token_ids == full.token_ids[: full.token_ids.index(eos) + 1]
    assert ends[0].text == ends[1].text and ends[1].finish_reason == "stop"


def test_streamed_events_concatenate_to_the_result(tiny_llm, engines):
    prompts = repetitive_prompts(5, seed=4)
    off, on = engines(0), engines(5, max_batch_size=8)
    want = [off.submit(p, greedy(36, stop=["zzzq"])).result() for p in prompts]
    handles = [on.submit(p, greedy(36, stop=["zzzq"])) for p in prompts]
    for h, w in zip(handles, want):
        events = list(h)
        assert "".join(e.text for e in events) == w.text
        assert [t for e in events for t in e.token_ids] == w.token_ids
        assert events[-1].finish_reason == "length" and events[-1].usage.completion_tokens == 36
        assert all(e.finish_reason is None for e in events[:-1])
        assert all(len(e.token_ids) == 1 for e in events)  # one event per token, as without drafts
    assert on.snapshot()["accepted_draft_tokens"] > 0


def test_adapter_rows_verify_in_the_batch_layout(tiny_llm, adapter_dirs):
    """Per-row LoRA adapters index the batch's rows, so their verify steps stay padded: the
    answers with and without an adapter are the same with and without drafts."""
    import copy

    from llamawrapper.engine import LlamaRunner
    from llamawrapper.models import adapters as adapterlib

    model, tok = copy.deepcopy(tiny_llm.loaded.model), tiny_llm.tokenizer
    rows = adapterlib.attach(model, {"sql": str(adapter_dirs["sql"])}, torch.float32)
    prompts = repetitive_prompts(3, seed=5)
    out = {}
    for k in (0, 4):
        runner = LlamaRunner(model)
        runner.row_hook = rows.bind
        eng = Engine(runner, tok, [tok.eos_token_id], EngineConfig(prompt_lookup=k, max_batch_size=8))
        try:
            hs = [eng.submit(p, greedy(24), namespace=adapterlib.namespace_for("sql") if i % 2 else "")
                  for i, p in enumerate(prompts * 2)]
            out[k] = ([h.result().token_ids for h in hs], eng.snapshot())
        finally:
            eng.shutdown()
    assert out[4][0] == out[0][0] and out[0][0][0] != out[0][0][3]  # the adapter changes the answer
    assert out[4][1]["accepted_draft_tokens"] > 0


def test_bf16_models_do_not_speculate(tiny_llm):
    """bf16 activations make a multi-token forward's argmax differ from single steps: such models
    decode as before even with the setting on."""
    import copy

    from llamawrapper.engine import LlamaRunner

    model, tok = copy.deepcopy(tiny_llm.loaded.model).to(torch.bfloat16), tiny_llm.tokenizer
    eng = Engine(LlamaRunner(model), tok, [tok.eos_token_id], EngineConfig(prompt_lookup=4))
    try:
        assert not eng.speculate
        assert len(eng.submit(repetitive_prompts(1)[0], greedy(12)).result().token_ids) == 12
        assert eng.snapshot()["verify_steps"] == 0
    finally:
        eng.shutdown()


def test_setting_env_flag_and_bad_values(tiny_llm, tiny_model_dir, monkeypatch):
    from pydantic import ValidationError

    from llamawrapper import LlamaWrapper
    from llamawrapper.config import EngineSettings
    from llamawrapper.server.command import settings_from_flags

    assert EngineSettings().prompt_lookup == 0  # off by default
    monkeypatch.setenv("LLAMAWRAPPER_PROMPT_LOOKUP", "6")
    assert EngineSettings().engine_config().prompt_lookup == 6
    monkeypatch.delenv("LLAMAWRAPPER_PROMPT_LOOKUP")
    assert settings_from_flags({"prompt_lookup": 4})[1].prompt_lookup == 4
    for bad in (-1, 33, "many"):
        with pytest.raises(ValidationError, match="prompt_lookup"):
            EngineSettings(prompt_lookup=bad)
    tok = tiny_llm.tokenizer
    for bad in (-1, 33, 2.5, True):
        with pytest.raises(InvalidRequestError) as err:
            Engine(tiny_llm.engine.runner, tok, [tok.eos_token_id], EngineConfig(prompt_lookup=bad))
        assert err.value.param == "prompt_lookup"
    monkeypatch.setenv("LLAMAWRAPPER_LOAD_PROCESS", "0")
    llm = LlamaWrapper.load(str(tiny_model_dir), engine={"prompt_lookup": 4}, progress=False)
    try:
        assert llm.engine.config.prompt_lookup == 4
        assert llm.generate("Hi", max_tokens=3, temperature=0).usage.completion_tokens == 3
    finally:
        llm.close()


EXTRACTION = (
    "Order confirmation. Customer: John Smith, 42 Oak Street, Springfield. Items: one Trekker 45 "
    "backpack in forest green, one pair of Alpine Pro hiking boots size 9, two wool socks. Order "
    "number: NW-2026-118734."
)


@pytest.mark.slow
def test_real_model_extraction_same_text_and_drafts_accepted(smollm2):
    """smollm2 copies names, addresses and numbers from the prompt: the same greedy text with
    and without drafts, and most of the answer comes from accepted drafts."""
    from llamawrapper.engine import LlamaRunner

    msgs = [{"role": "user", "content": EXTRACTION + "\n\nExtract the customer name, address, items and order "
                                        "number from the text above as a list."}]
    ids = smollm2.chat_prompt_ids(msgs)
    p = SamplingParams(max_tokens=80, temperature=0)
    want = smollm2.submit(ids, p).result()
    tok = smollm2.tokenizer
    eng = Engine(LlamaRunner(smollm2.loaded.model), tok, sorted(smollm2.engine.eos_token_ids), EngineConfig(prompt_lookup=6))
    try:
        got = eng.submit(ids, p).result()
        snap = eng.snapshot()
    finally:
        eng.shutdown()
    assert got.text == want.text and got.token_ids == want.token_ids
    assert "John Smith" in got.text and "Oak Street" in got.text, got.text  # the answer does copy the prompt
    assert snap["accepted_draft_tokens"] >= len(got.token_ids) // 4, snap
    assert snap["decode_steps"] < len(got.token_ids) - 5
