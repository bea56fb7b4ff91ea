"""The engine on a tiny random-weight Llama: batching equals one-by-one generate, admission,
queue limits, cancellation, failure isolation, prefix reuse."""

import threading
import time

import pytest
import torch

from llamawrapper import GenerationError, QueueFullError, SamplingParams
from llamawrapper.engine import Engine, EngineConfig, LlamaRunner


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


@pytest.fixture
def make_engine(tiny_llm):
    engines = []

    def make(**cfg):
        eng = Engine(tiny_llm.engine.runner, tiny_llm.tokenizer, [tiny_llm.tokenizer.eos_token_id], EngineConfig(**cfg))
        engines.append(eng)
        return eng

    yield make
    for e in engines:
        e.shutdown()


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_staggered_batch_matches_one_by_one_generate(tiny_llm, make_engine):
    eng = make_engine(max_batch_size=8, prefill_chunk=7)  # small chunks: prompts span several steps
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 40000, (int(n),), generator=gen).tolist() for n in torch.randint(3, 60, (12,), generator=gen)]
    prompts.append(prompts[0][:20] + [5, 6, 7])  # shares a prefix with another prompt
    handles = []
    for i, p in enumerate(prompts):
        handles.append(eng.submit(p, greedy(10 + i)))
        time.sleep(0.01 * (i % 3))  # arrive at different times, join a running batch
    results = [h.result() for h in handles]
    model = tiny_llm.loaded.model
    for p, r, i in zip(prompts, results, range(len(prompts))):
        assert r.token_ids == hf_greedy(model, p, 10 + i)
        assert r.usage.completion_tokens == 10 + i and r.finish_reason == "length"


def test_batch_size_limit_is_respected(make_engine):
    eng = make_engine(max_batch_size=2)
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            s = eng.snapshot()
            seen.append(s["running"] + s["prefilling"])
            time.sleep(0.001)

    t = threading.Thread(target=watch)
    t.start()
    handles = [eng.submit([100 + i, 200, 300], greedy(12)) for i in range(6)]
    for h in handles:
        assert h.result().usage.completion_tokens == 12
    stop.set()
    t.join()
    assert max(seen) <= 2


def test_full_queue_is_refused_at_once(make_engine):
    eng = make_engine(max_batch_size=1, max_queue=2)
    handles, refused = [], 0
    for i in range(8):
        try:
            handles.append(eng.submit([100 + i, 5, 6], greedy(30)))
        except QueueFullError as exc:
            refused += 1
            assert exc.retry_after > 0
    assert refused >= 4
    for h in handles:
        assert h.result().finish_reason == "length"
    assert eng.snapshot()["rejected"] == refused


def test_cancel_frees_the_slot_within_a_step(make_engine):
    eng = make_engine(max_batch_size=4)
    h = eng.submit([1, 2, 3, 4], greedy(400))
    it = iter(h)
    next(it)
    steps_at_cancel = eng.snapshot()["decode_steps"]
    h.cancel()
    events = list(it)
    assert events[-1].finish_reason == "cancelled"
    snap = eng.snapshot()
    assert snap["running"] == 0 and snap["cancelled"] == 1
    assert snap["decode_steps"] - steps_at_cancel <= 2


def test_a_failing_request_does_not_hurt_the_others(make_engine):
    eng = make_engine(max_batch_size=4)

    def explode(ids, logits):
        if len(ids) == 3:
            raise RuntimeError("boom")
        return logits

    good = [eng.submit([7, 8, 9 + i], greedy(8)) for i in range(3)]
    bad = eng.submit([7, 8, 20], greedy(8), logits_processor=explode)
    with pytest.raises(GenerationError, match="boom"):
        bad.result()
    assert [g.result().usage.completion_tokens for g in good] == [8, 8, 8]
    assert eng.submit([1, 2], greedy(3)).result().usage.completion_tokens == 3  # engine still alive


def test_shared_prefix_is_reused_and_reported(make_engine):
    eng = make_engine(prefix_cache_bytes=64 * 1024 * 1024, prefix_block_size=16)
    prefix = list(range(1000, 1100))
    first = eng.submit(prefix + [1, 2, 3], greedy(4)).result()
    second = eng.submit(prefix + [4, 5, 6], greedy(4)).result()
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens == 96  # whole 16-token blocks of the shared 100 tokens
    snap = eng.snapshot()
    assert snap["prefix_cache_hit_tokens"] >= 96 and 0 < snap["prefix_cache_hit_rate"] < 1
    assert snap["prefix_cache_bytes"] <= snap["prefix_cache_budget_bytes"]


def test_cached_prefix_gives_identical_output(tiny_llm, make_engine):
    eng = make_engine()
    prompt = list(range(2000, 2070))
    cold = eng.submit(prompt, greedy(12)).result()
    warm = eng.submit(prompt, greedy(12)).result()
    assert warm.usage.cached_tokens > 0
    assert warm.token_ids == cold.token_ids == hf_greedy(tiny_llm.loaded.model, prompt, 12)


def test_asyncio_consumers(make_engine):
    import asyncio

    eng = make_engine()

    async def main():
        handles = [eng.submit([50 + i, 60, 70], greedy(5)) for i in range(4)]
        return await asyncio.gather(*(h.aresult() for h in handles))

    results = asyncio.run(main())
    assert [r.usage.completion_tokens for r in results] == [5] * 4


def test_runner_rejects_unknown_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    from llamawrapper import UnsupportedModelError

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        LlamaRunner(model)


def test_a_request_is_in_flight_at_every_point_of_its_way(make_engine):
    """``in_flight`` (what a draining host waits on before it unloads a model) never reads 0 while a
    request is being served: not while its prefix is looked up, nor while its first token is
    chosen, nor while its prompt is stored in the prefix cache and copied into its slot (the
    request once sat in neither pool there, and a hot swap unloaded the model under it)."""
    eng = make_engine(max_batch_size=4)
    seen: dict[str, list[int]] = {}

    def watch(owner, name):
        real = getattr(owner, name)

        def wrapper(*a, **kw):
            seen.setdefault(name, []).append(eng.in_flight)
            return real(*a, **kw)
        setattr(owner, name, wrapper)

    watch(eng, "_start")
    watch(eng, "_select_and_accept")
    watch(eng.prefix_cache, "insert")
    watch(eng.slots, "put")
    for n in (1, 3):  # ended by its first token, and decoded on
        r = eng.submit(list(range(10, 50)), greedy(n)).result()
        assert r.usage.completion_tokens == n
    assert set(seen) == {"_start", "_select_and_accept", "insert", "put"}, seen
    assert all(v >= 1 for values in seen.values() for v in values), seen


def test_a_prompt_whose_blocks_fail_to_be_stored_fails_alone_and_poisons_no_cache(make_engine):
    """A request whose prompt cannot be stored in the prefix cache (after its first token went
    out) fails with a clear error; nothing of it is cached from a slot it never reached (that slot
    still holds another prompt's keys), so the same prompt asked again gets its own answer."""
    eng = make_engine(max_batch_size=4)
    prompt, other = list(range(100, 140)), list(range(300, 340))
    want = eng.submit(prompt, greedy(4)).result()
    eng.prefix_cache.clear()
    eng.submit(other, greedy(4)).result()  # slot 0 now holds the other prompt's keys and values
    eng.prefix_cache.clear()
    real = eng.prefix_cache.insert
    failed = []

    def failing(tokens, *a, **kw):  # once: the next insert of that prompt would find room
        if list(tokens) == prompt and not failed:
            failed.append(1)
            raise MemoryError("no room for the blocks")
        return real(tokens, *a, **kw)
    eng.prefix_cache.insert = failing
    with pytest.raises(GenerationError, match="no room for the blocks"):
        eng.submit(prompt, greedy(4)).result()
    eng.prefix_cache.insert = real
    again = eng.submit(prompt, greedy(4)).result()
    assert again.usage.cached_tokens == 0  # nothing of the failed request was cached
    assert again.token_ids == want.token_ids and again.text == want.text


def test_only_the_chunk_that_ends_a_prompt_computes_logits(tiny_llm, make_engine, monkeypatch):
    """Prompts prefilled in several chunks, alone and packed with others, go through the output
    head once each, at their last token; the first token each gets is ``generate``'s."""
    runner = tiny_llm.engine.runner
    head, rows = runner.lm_head, []
    monkeypatch.setattr(runner, "lm_head", lambda h: rows.append(h.reshape(-1, h.shape[-1]).shape[0]) or head(h))
    eng = make_engine(max_batch_size=8, prefill_chunk=7)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(10, 40000, (n,), generator=gen).tolist() for n in (30, 4, 17, 9, 23)]
    results = [eng.submit(prompts[0], greedy(1)).result()]  # alone: chunks of 7, 7, 7, 7, 2
    results += [h.result() for h in [eng.submit(p, greedy(1)) for p in prompts[1:]]]  # packed 7 tokens a step
    assert eng.stats.prefill_forwards >= 5 + 8  # 30 tokens in 5 chunks, then 53 at 7 a step
    assert sum(rows) == len(prompts)  # one row each; none for a chunk that does not end its prompt
    for p, r in zip(prompts, results):
        assert r.token_ids == hf_greedy(tiny_llm.loaded.model, p, 1)
