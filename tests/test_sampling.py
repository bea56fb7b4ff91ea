"""OpenAI sampling parameters in the library: validation, the batched sampler's rules on small
tensors, and on the real model: logit_bias forces and bans tokens, penalties reduce repeats,
seeded choices differ and reproduce, logprobs agree with the chosen tokens and with a forward
pass of the transformers model."""

from __future__ import annotations

import math

import pytest
import torch

from types import SimpleNamespace

from llamawrapper.engine.sampling import Sampler, apply_logit_bias, apply_openai_penalties, make_generator, sample_rows
from llamawrapper.errors import InvalidRequestError
from llamawrapper.types import SamplingParams

CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]
REPEATS = "Emoji: 😀 😃 😄 😁 😆"  # smollm2 answers this by repeating one emoji


# -- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, param", [
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"1.5": 1}}, "logit_bias"),
    ({"logit_bias": {"-3": 1}}, "logit_bias"),
    ({"logit_bias": {"12": 100.5}}, "logit_bias"),
    ({"logit_bias": {"12": "high"}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
])
def test_bad_values_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param and param in str(err.value)


def test_logit_bias_keys_become_token_ids():
    assert SamplingParams(logit_bias={"12": 5, 7: -100}).logit_bias == {12: 5.0, 7: -100.0}


def test_choices_get_their_own_reproducible_seeds():
    p = SamplingParams(temperature=1.0, seed=42)
    seeds = [p.for_choice(k).seed for k in range(4)]
    assert seeds[0] == 42 and len(set(seeds)) == 4
    assert seeds == [SamplingParams(temperature=1.0, seed=42).for_choice(k).seed for k in range(4)]
    assert SamplingParams(temperature=1.0).for_choice(3).seed is None  # unseeded choices are random anyway


# -- the sampler's rules ---------------------------------------------------------------------------
def test_openai_penalties_follow_the_formula():
    logits = torch.zeros(2, 6)
    out = apply_openai_penalties(logits, [[1, 1, 1, 4], []], torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.25]))
    assert out[0].tolist() == pytest.approx([0, -(3 * 0.25 + 0.5), 0, 0, -(0.25 + 0.5), 0])
    assert out[1].tolist() == [0.0] * 6


def test_logit_bias_adds_per_row():
    out = apply_logit_bias(torch.zeros(2, 4), [{1: 5.0, 3: -2.0}, {0: 1.5}])
    assert out.tolist() == [[0, 5, 0, -2], [1.5, 0, 0, 0]]


def test_greedy_rows_with_a_logit_bias_pick_what_a_biased_copy_picks():
    """A decode step hands the sampler the batch's plain argmax; a greedy row whose only change is
    its logit_bias then skips the biased copy of the logits. Its token must be the biased copy's
    argmax in every case: the argmax itself banned, a bias that ties the top (the lower id wins
    either way), -inf-like bans of other tokens, beside rows with penalties and sampled rows."""
    g = torch.Generator().manual_seed(0)
    V = 12
    logits = torch.randint(-3, 4, (10, V), generator=g).float()  # small integers: many ties
    logits[0, 5] = logits[0].max() + 1  # row 0: its argmax 5 is banned, so the runner-up decides
    logits[1, 7] = 3.0  # rows 1, 2: a bias lifts token 2 / 9 to exactly the top (3 + 1 = 4)
    logits[1, 2] = logits[2, 9] = 3.0
    logits[1, 4] = logits[2, 4] = 4.0
    biases = [{5: -100.0, 1: -100.0}, {2: 1.0}, {9: 1.0}, {0: -100.0, 11: 2.5}, {3: 100.0}, {6: -0.5, 7: 0.5},
              {4: 1.0}, {8: -100.0}, {1: 2.0}, {}]
    params = [SamplingParams(temperature=0, logit_bias=b or None) for b in biases]
    params[7] = SamplingParams(temperature=0, logit_bias=biases[7], presence_penalty=0.5)  # the full path
    params[8] = SamplingParams(temperature=0.8, seed=3, logit_bias=biases[8])  # sampled
    def reqs():
        return [SimpleNamespace(params=p, logits_processor=None, output_ids=[3, 3], prompt_ids=[1],
                                generator=make_generator(p.seed)) for p in params]
    sampler = Sampler.__new__(Sampler)  # select() needs no tokenizer
    plain = logits.argmax(dim=-1).tolist()
    raw = logits.clone()
    fast = sampler.select(logits, reqs(), plain, on_error=lambda r, e: pytest.fail(repr(e)))
    full = sampler.select(logits, reqs(), None, on_error=lambda r, e: pytest.fail(repr(e)))
    assert torch.equal(logits, raw)  # the raw logits (log-probabilities come from them) are untouched
    assert fast == full
    biased = apply_logit_bias(logits.clone(), biases)
    assert fast[:8] == biased[:8].argmax(dim=-1).tolist()
    assert fast[0] != 5 and fast[1] == 2 and fast[2] == 4 and fast[4] == 3  # the lower id wins a tie


def test_sample_rows_masks_and_draws_from_the_distribution():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(4000, 1)
    ones, zeros = torch.ones(4000), torch.zeros(4000, dtype=torch.long)
    drawn = sample_rows(logits, ones, zeros, ones, torch.rand(4000))
    freq = torch.bincount(drawn, minlength=4).float() / 4000
    assert freq.tolist() == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.03)
    top2 = sample_rows(logits, ones, torch.full((4000,), 2), ones, torch.rand(4000))
    assert set(top2.tolist()) == {0, 1}
    nucleus = sample_rows(logits, ones, zeros, torch.full((4000,), 0.7), torch.rand(4000))
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 alone does not reach 0.7; 0.5 + 0.3 does
    cold = sample_rows(logits[:50], torch.full((50,), 0.01), zeros[:50], ones[:50], torch.rand(50))
    assert set(cold.tolist()) == {0}


# -- the real model ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_logit_bias_forces_and_bans_tokens(smollm2):
    forced = smollm2.tokenize(" Paris")[0]
    for temperature in (0, 1):
        r = smollm2.chat(CHAT, max_tokens=5, temperature=temperature, seed=1, logit_bias={str(forced): 100})
        assert r.token_ids == [forced] * 5
    base = smollm2.chat(CHAT, max_tokens=3, temperature=0)
    banned = smollm2.chat(CHAT, max_tokens=3, temperature=0, logit_bias={base.token_ids[0]: -100})
    assert banned.token_ids[0] != base.token_ids[0]
    with pytest.raises(InvalidRequestError) as err:
        smollm2.chat(CHAT, max_tokens=3, logit_bias={smollm2.engine.runner.vocab_size: 1})
    assert err.value.param == "logit_bias"


def test_ignore_eos_goes_on_to_max_tokens(smollm2):
    ask = [{"role": "user", "content": "Reply with one word: yes or no. Is water wet?"}]
    short = smollm2.chat(ask, max_tokens=40, temperature=0)
    assert short.finish_reason == "stop" and short.usage.completion_tokens < 40
    long = smollm2.chat(ask, max_tokens=40, temperature=0, ignore_eos=True)
    assert long.finish_reason == "length" and long.usage.completion_tokens == 40
    assert long.text.startswith(short.text) and len(long.text) > len(short.text)


def _repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


@pytest.mark.slow
def test_penalties_reduce_repeats(smollm2):
    base = smollm2.generate(REPEATS, max_tokens=24, temperature=0).token_ids
    assert _repeats(base) >= 8, "the unpenalized answer must repeat itself for this test to mean anything"
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        ids = smollm2.generate(REPEATS, max_tokens=24, temperature=0, **kw).token_ids
        assert _repeats(ids) < _repeats(base) / 2, kw
    negative = smollm2.generate(REPEATS, max_tokens=24, temperature=0, presence_penalty=-2.0).token_ids
    assert _repeats(negative) >= _repeats(base)


@pytest.mark.slow
def test_seeded_choices_differ_and_reproduce(smollm2):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=123)
    prompt = smollm2.chat_prompt_ids(CHAT)

    def choices() -> list[list[int]]:
        handles = [smollm2.submit(prompt, params.for_choice(k)) for k in range(3)]
        return [h.result().token_ids for h in handles]

    first = choices()
    assert len({tuple(c) for c in first}) == 3
    assert choices() == first


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0, 1])
def test_logprobs_agree_with_the_tokens_and_a_forward_pass(smollm2, temperature):
    r = smollm2.chat(CHAT, max_tokens=12, temperature=temperature, seed=3, logprobs=True, top_logprobs=5)
    assert [t.token_id for t in r.logprobs] == r.token_ids[: len(r.logprobs)]
    assert len(r.logprobs) == len(r.token_ids) - (r.token_ids[-1] in smollm2.engine.eos_token_ids)
    assert b"".join(bytes(t.bytes) for t in r.logprobs).decode() == r.text
    for t in r.logprobs:
        tops = [a.logprob for a in t.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert sum(math.exp(v) for v in tops) <= 1.0 + 1e-5
        assert t.logprob <= tops[0] + 1e-6
        if temperature == 0:
            assert t.top_logprobs[0].token_id == t.token_id
    # a forward pass of the transformers model over prompt + answer gives the same numbers
    prompt = smollm2.chat_prompt_ids(CHAT)
    ids = torch.tensor([prompt + r.token_ids])
    with torch.inference_mode():
        lp = torch.log_softmax(smollm2.loaded.model(input_ids=ids).logits[0].float(), dim=-1)
    for k, t in enumerate(r.logprobs):
        row = lp[len(prompt) - 1 + k]
        assert t.logprob == pytest.approx(float(row[t.token_id]), abs=2e-3)
        ref = row.topk(5)
        assert [a.logprob for a in t.top_logprobs] == pytest.approx(ref.values.tolist(), abs=2e-3)


@pytest.mark.slow
def test_streamed_logprobs_equal_the_result(smollm2):
    r = smollm2.chat(CHAT, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    events = list(smollm2.stream(CHAT, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2))
    streamed = [t for e in events for t in (e.logprobs or [])]
    assert [(t.token_id, t.logprob) for t in streamed] == [(t.token_id, t.logprob) for t in r.logprobs]
    assert all(len(e.logprobs) == len(e.token_ids) for e in events[:-1])
    assert smollm2.chat(CHAT, max_tokens=3, temperature=0).logprobs is None


def test_python_choices_and_max_completion_tokens(tiny_llm):
    first = tiny_llm.choices("hello", n=3, max_tokens=6, temperature=1.0, seed=9)
    assert len({tuple(r.token_ids) for r in first}) == 3
    assert [r.token_ids for r in tiny_llm.choices("hello", n=3, max_tokens=6, temperature=1.0, seed=9)] == [r.token_ids for r in first]
    assert tiny_llm.chat("hello", max_tokens=6, temperature=1.0, seed=9).token_ids == first[0].token_ids
    assert tiny_llm.chat("hello", max_completion_tokens=2, temperature=0).usage.completion_tokens == 2
    for kwargs, param in (({"n": 2}, "n"), ({"max_tokens": 3, "max_completion_tokens": 2}, "max_completion_tokens")):
        with pytest.raises(InvalidRequestError) as err:
            tiny_llm.chat("hello", **kwargs)
        assert err.value.param == param
    with pytest.raises(InvalidRequestError) as err:
        tiny_llm.choices("hello", n=0)
    assert err.value.param == "n"


@pytest.mark.slow
def test_prompt_logprobs_match_a_forward_pass(smollm2):
    prompt = "The capital of France is Paris, and"
    r = smollm2.generate(prompt, max_tokens=2, temperature=0, prompt_logprobs=3)
    ids = smollm2.tokenize(prompt, add_special_tokens=True)
    assert r.prompt_logprobs[0] is None and [t.token_id for t in r.prompt_logprobs[1:]] == ids[1:]
    with torch.inference_mode():
        lp = torch.log_softmax(smollm2.loaded.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    for p, t in enumerate(r.prompt_logprobs[1:]):
        assert t.logprob == pytest.approx(float(lp[p, ids[p + 1]]), abs=2e-3)
        assert [a.token_id for a in t.top_logprobs] == lp[p].topk(3).indices.tolist()
    assert smollm2.generate(prompt, max_tokens=2, temperature=0).prompt_logprobs is None


def test_rows_of_one_batch_keep_their_own_parameters(tiny_llm):
    """Requests with different parameters decoded together answer as they do alone."""
    prompt = tiny_llm.chat_prompt_ids("hello")
    kinds = [SamplingParams(max_tokens=8, temperature=0),
             SamplingParams(max_tokens=8, temperature=0, logit_bias={17: 5.0}, frequency_penalty=1.5),
             SamplingParams(max_tokens=8, temperature=1.0, seed=5, top_k=20),
             SamplingParams(max_tokens=8, temperature=0.7, seed=6, top_p=0.8, presence_penalty=-1.0, logprobs=True, top_logprobs=2)]
    alone = [tiny_llm.submit(prompt, p).result() for p in kinds]
    together = [h.result() for h in [tiny_llm.submit(prompt, p) for p in kinds]]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert len({tuple(r.token_ids) for r in alone}) >= 3
    assert [t.token_id for t in together[3].logprobs] == together[3].token_ids[: len(together[3].logprobs)]


def test_prompt_logprobs_of_a_one_token_prompt(tiny_llm):
    r = tiny_llm.generate([5], max_tokens=1, temperature=0, prompt_logprobs=1)
    assert r.prompt_logprobs == [None]
