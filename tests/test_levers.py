"""Decode-step levers (issue 14) on the tiny random-weight Llama: every new path gives the
results of the path it replaces — fused projections bit for bit, greedy text alone and in a
batch, seeded sampling — and LoRA-wrapped layers fall back to the unfused path."""

from __future__ import annotations

import copy

import pytest
import torch

from llamawrapper import SamplingParams
from llamawrapper.engine import Engine, EngineConfig, LlamaRunner, kernels
from llamawrapper.models import quantization as quant
from runner_helpers import prefill_logits


@pytest.fixture(scope="module")
def tiny_models(tiny_llm):
    """The tiny model in fp32 and quantized copies (in memory), each with a fresh runner pair."""
    models = {"fp32": copy.deepcopy(tiny_llm.loaded.model)}
    for mode in ("int8", "int4", "w8a8"):
        models[mode] = quant.quantize_model(copy.deepcopy(tiny_llm.loaded.model), mode).eval()
    return models


@pytest.mark.parametrize("mode", ["fp32", "int8", "int4", "w8a8"])
def test_fused_projections_match_unfused_bit_for_bit(tiny_models, mode):
    model = tiny_models[mode]
    ids = torch.randint(10, 40000, (23,), generator=torch.Generator().manual_seed(3)).tolist()
    # (torch's attention and torch's int4 kernel in both: a fused layer's prefill attention otherwise
    # runs in the kernel's attention block, and an int4 model's prefill on unpacked weights, both of
    # which need the fused layout, and round differently)
    plain = LlamaRunner(model, fuse=False, kernel_prefill=False, int4_prefill_bf16=False)
    before = prefill_logits(plain, ids)
    fused = LlamaRunner(model, fuse=True, kernel_prefill=False, int4_prefill_bf16=False)
    assert all(f.gate_up is not None for f in fused.fused)
    if mode != "int4":  # int4 packs output channels in CPU-specific blocks: fused only where they line up
        assert all(f.qkv is not None for f in fused.fused)
    assert torch.equal(prefill_logits(fused, ids), before)
    assert torch.equal(prefill_logits(plain, ids), before)  # the model's own modules now read views: unchanged
    with torch.inference_mode():  # and transformers' forward on the same modules still works
        hf = model(torch.tensor([ids])).logits[0].float()
    tol = 1e-3 if mode == "fp32" else 2e-2  # bf16 models: the runner attends in float32, transformers in bf16;
    # w8a8: a float rounding apart in attention can move an activation across an int8 step
    assert (hf - before[0]).abs().max() < tol * before.abs().max()


def test_fusion_is_built_once_per_model(tiny_models):
    a, b = LlamaRunner(tiny_models["fp32"]), LlamaRunner(tiny_models["fp32"])
    assert all(x.qkv is y.qkv and x.gate_up is y.gate_up for x, y in zip(a.fused, b.fused))


def test_lora_wrapped_layers_keep_the_unfused_path(tiny_llm, adapter_dirs):
    from llamawrapper.models import adapters as adapterlib

    model, tok = copy.deepcopy(tiny_llm.loaded.model), tiny_llm.tokenizer
    rows = adapterlib.attach(model, {"sql": str(adapter_dirs["sql"])}, torch.float32)
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ids = tok("Hello there, how are you?")["input_ids"]
    out = {}
    for fuse in (True, False):
        runner = LlamaRunner(model, fuse=fuse)
        runner.row_hook = rows.bind
        if fuse:
            assert all(f.qkv is None for f in runner.fused)  # q_proj and v_proj carry the adapter
            assert all(f.gate_up is not None for f in runner.fused)  # the MLP has none: still fused
        eng = Engine(runner, tok, [tok.eos_token_id], EngineConfig(max_batch_size=4))
        try:
            hs = [eng.submit(ids, p), eng.submit(ids, p, namespace=adapterlib.namespace_for("sql"))]
            out[fuse] = [h.result().token_ids for h in hs]
        finally:
            eng.shutdown()
    assert out[True] == out[False] and out[True][0] != out[True][1]


def test_fused_engine_greedy_alone_in_batch_and_seeded_sampling(tiny_llm):
    """Fused vs unfused runner on one model: greedy ids equal alone and inside a batch, and a
    seeded sampled answer is the same through both. With torch's linears (``onednn=False``): the
    fused matmul is bit for bit the separate ones there, while oneDNN's packed kernel rounds the
    fused and separate products differently in the last bit (~2e-7 in the logits), and sampling
    from this random model's nearly flat distribution flips on that."""
    model, tok = tiny_llm.loaded.model, tiny_llm.tokenizer
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(10, 40000, (int(n),), generator=gen).tolist() for n in (5, 17, 33, 9)]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=42, ignore_eos=True)
    out = {}
    for fuse in (False, True):
        eng = Engine(LlamaRunner(model, fuse=fuse, onednn=False), tok, [tok.eos_token_id], EngineConfig(max_batch_size=8))
        try:
            alone = [eng.submit(p, greedy).result().token_ids for p in prompts]
            batch = [h.result().token_ids for h in [eng.submit(p, greedy) for p in prompts]]
            seeded = eng.submit(prompts[1], sampled).result().token_ids
        finally:
            eng.shutdown()
        assert alone == batch
        out[fuse] = (alone, seeded)
    assert out[True] == out[False]


def test_w8a8_engine_greedy_alone_in_batch_no_speculation_and_seeded(tiny_models, tiny_llm):
    """A w8a8 model (float32 activations, int8 per-token activations in every Linear): greedy ids
    are the same alone and inside a batch (its runner attends row by row), it ignores
    ``prompt_lookup`` (a verify forward's attention sums differ from one-token steps), and a
    seeded sampled answer repeats."""
    model, tok = tiny_models["w8a8"], tiny_llm.tokenizer
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(10, 40000, (int(n),), generator=gen).tolist() for n in (6, 21, 40)]
    prompts.append((prompts[0] * 5)[:28])  # repeats itself: prompt lookup finds drafts
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=12, temperature=0.9, seed=7, ignore_eos=True)
    runner = LlamaRunner(model)
    assert runner.dtype == torch.float32 and all(f.qkv is not None and f.gate_up is not None for f in runner.fused)
    assert runner.quantizes_activations and runner.attention_per_row
    # the other quantized modes' GEMMs compute each row on their own too: per-row attention by
    # default; float GEMMs do not (nothing to gain); the compiled decode step keeps it
    assert LlamaRunner(tiny_models["int8"]).attention_per_row and LlamaRunner(tiny_models["int4"]).attention_per_row
    assert not LlamaRunner(tiny_models["fp32"]).attention_per_row
    both = LlamaRunner(tiny_models["int8"], compile="eager")
    assert both.attention_per_row and both.compiled is not None
    # the tiny int4's k/v blocks do not line up with this CPU's int4 packing: unfused, not compiled
    assert LlamaRunner(tiny_models["int4"], compile="eager").compiled is None
    results = {}
    for k in (0, 4):
        eng = Engine(runner, tok, [tok.eos_token_id], EngineConfig(max_batch_size=8, prompt_lookup=k))
        try:
            assert not eng.speculate
            alone = [eng.submit(p, greedy).result().token_ids for p in prompts]
            batch = [h.result().token_ids for h in [eng.submit(p, greedy) for p in prompts]]
            seeded = [eng.submit(prompts[1], sampled).result().token_ids for _ in range(2)]
            drafted = eng.stats.draft_tokens
        finally:
            eng.shutdown()
        assert alone == batch and seeded[0] == seeded[1]
        results[k] = (alone, seeded[0], drafted)
    assert results[4] == results[0] and results[4][2] == 0


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_row_decode_attention_is_the_same_alone_and_in_any_batch(tiny_models, dtype, kernel):
    """The decode attention of a runner with ``attention_per_row`` (the C++ kernel, or torch's
    batch-invariant attention over whole key blocks), read from a real slot cache
    (strided views, lengths 1 to 1,500, batches of 2 to 16) and queries strided as the fused
    projection leaves them: every row is bit for bit what it is alone, and within float rounding
    of SDPA. (SDPA itself fails this: its rows change with the batch.)"""
    from llamawrapper.engine.kv_cache import SlotCache
    from llamawrapper.engine.runner import _attend

    model = tiny_models["w8a8" if dtype == torch.float32 else "int4"]
    runner = LlamaRunner(model, attention_per_row=True, kernel=kernel)
    assert (runner.kernel is not None) == kernel
    H, KVH, D = runner.n_heads, runner.n_kv_heads, runner.head_dim
    gen = torch.Generator().manual_seed(11)
    cache = SlotCache(1, KVH, D, dtype, 16)
    cache.ensure(16, 1500)
    assert cache.capacity % 64 == 0
    for t in (cache.k[0], cache.v[0]):
        t.copy_(torch.randn(t.shape, generator=gen).to(dtype))

    def attention(q: torch.Tensor, lengths: list[int], rows: list[int]) -> torch.Tensor:
        B, length = len(lengths), max(lengths)
        positions = torch.tensor(lengths) - 1
        mask = (torch.arange(length) <= positions.unsqueeze(1)).view(B, 1, 1, length)
        if rows != list(range(B)):  # a row alone sits in slot 0 of its own step
            for store in (cache.k, cache.v):
                store[0][0, :, :length] = store[0][rows[0], :, :length]
        kv, attend = runner._attention(cache.decode_view(B, positions, length), mask, 1)
        keys, values = kv.cache.k[0][:B, :, : kv.length], kv.cache.v[0][:B, :, : kv.length]
        return attend(q, keys, values), mask, keys[:, :, :length], values[:, :, :length]

    mismatches = compared = 0
    for trial in range(24):
        B = (2, 3, 8, 16)[trial % 4]
        lengths = torch.randint(1, (40, 300, 1500)[trial % 3], (B,), generator=gen).tolist()
        # q as the runner has it: the query heads of a fused q/k/v projection, a strided view
        q = torch.randn(B, 1, H + 2 * KVH, D, generator=gen).to(dtype)[:, :, :H].transpose(1, 2)
        saved = [t.clone() for t in (cache.k[0], cache.v[0])]
        out, mask, keys, values = attention(q, lengths, list(range(B)))
        sdpa = _attend(q, keys, values, mask, runner.attention_fp32)
        assert (out.float() - sdpa.float()).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)
        for i, n in enumerate(lengths):
            alone, *_ = attention(q[i : i + 1], [n], [i])
            compared += 1
            mismatches += not torch.equal(alone, out[i : i + 1])
            cache.k[0].copy_(saved[0]), cache.v[0].copy_(saved[1])
    assert compared > 150 and mismatches == 0


def test_w8a8_rows_do_not_depend_on_the_rows_beside_them():
    """One scale per token: a row's output is bit for bit the same alone and beside a row 1000x
    larger (a per-tensor scale would crush it), and close to the float Linear."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 80, bias=True)
    q = quant.W8A8Linear.from_linear(lin)
    x = torch.randn(5, 96)
    x[3] *= 1000
    y = q(x)
    assert all(torch.equal(y[i], q(x[i : i + 1])[0]) for i in range(5))
    ref = lin(x)
    assert ((y - ref).norm(dim=1) / ref.norm(dim=1)).max() < 0.03
    assert q(torch.zeros(2, 96)).abs().max() <= lin.bias.abs().max() + 1e-6  # an all-zero row: just the bias


def test_row_by_row_attention_of_packed_prompts_is_each_row_alone():
    """``_attend_rows`` over prompt chunks packed and padded to the longest (queries strided as the
    runner's fused projection leaves them, padding queries repeating their row's last mask) gives
    each row's real queries exactly what SDPA gives that row alone (on torch 2.13's CPU kernels,
    SDPA over the padded batch differs in most rows)."""
    from llamawrapper.engine.runner import _attend, _attend_rows, _visible_lengths

    gen = torch.Generator().manual_seed(0)
    H, KVH, D = 9, 3, 64
    for _ in range(12):
        B = int(torch.randint(2, 8, (), generator=gen))
        counts = torch.randint(1, 60, (B,), generator=gen).tolist()
        starts = torch.randint(0, 250, (B,), generator=gen).tolist()
        T, L = max(counts), max(a + c for a, c in zip(starts, counts))
        q = torch.randn(B, T, H + 2 * KVH, D, generator=gen)[:, :, :H].transpose(1, 2)
        keys, values = torch.randn(B, KVH, L, D, generator=gen), torch.randn(B, KVH, L, D, generator=gen)
        pos = torch.tensor([list(range(a, a + c)) + [a + c - 1] * (T - c) for a, c in zip(starts, counts)])
        mask = (torch.arange(L).view(1, 1, -1) <= pos.unsqueeze(2)).view(B, 1, T, L)
        rows = _attend_rows(q, keys, values, mask, False, _visible_lengths(mask), counts)
        for i, (a, c) in enumerate(zip(starts, counts)):
            n = a + c
            alone = _attend(q[i : i + 1, :, :c].contiguous(), keys[i : i + 1, :, :n].contiguous(),
                            values[i : i + 1, :, :n].contiguous(), mask[i : i + 1, :, :c, :n], False)
            assert torch.equal(rows[i : i + 1, :, :c], alone)
            assert not rows[i, :, c:].any()


def _answers(results) -> list:
    return [(r.text, r.token_ids, [(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top_logprobs])
                                   for lp in r.logprobs]) for r in results]


@pytest.mark.parametrize("mode", ["fp32", "int8", "int4", "w8a8"])
def test_packed_prefill_gives_each_request_what_it_gets_alone(tiny_models, tiny_llm, mode):
    """Requests arriving together have their prompt chunks prefilled in shared forwards; what
    each gets — text, ids and every logprob, the first of them read from the prefill's logits —
    is what it gets alone, bit for bit where the GEMMs compute rows on their own (int8, int4,
    w8a8: projections on the packed rows, attention per request) and to float32 rounding for a
    float32 model. A request sharing a long prefix with one still prefilling waits for it and
    reads it from the prefix cache instead of computing it again."""
    model, tok = tiny_models[mode], tiny_llm.tokenizer
    gen = torch.Generator().manual_seed(21)
    shared = torch.randint(10, 40000, (70,), generator=gen).tolist()
    prompts = [torch.randint(10, 40000, (int(n),), generator=gen).tolist() for n in (3, 29, 50, 12)]
    prompts += [shared + [11, 12, 13], shared + [21, 22]]  # the second waits for the first's prefix
    p = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=3)
    runner = LlamaRunner(model)
    eng = Engine(runner, tok, [tok.eos_token_id], EngineConfig(max_batch_size=8, prefill_chunk=96))
    try:
        alone = []
        for x in prompts:
            eng.executor.call(eng.prefix_cache.clear).result()
            alone.append(eng.submit(x, p).result())
        eng.executor.call(eng.prefix_cache.clear).result()
        before = eng.snapshot()
        together = [h.result() for h in [eng.submit(x, p) for x in prompts]]
        after = eng.snapshot()
    finally:
        eng.shutdown()
    forwards = after["prefill_forwards"] - before["prefill_forwards"]
    prefilled = after["prefill_tokens"] - before["prefill_tokens"]
    assert forwards < len(prompts) - 1  # packed: fewer forwards than requests
    assert prefilled <= sum(map(len, prompts)) - 64  # the shared 70 tokens computed once (64 of them in cached blocks)
    assert together[-1].usage.cached_tokens == 64
    if mode == "fp32":
        for a, b in zip(_answers(alone), _answers(together)):
            assert a[0] == b[0] and a[1] == b[1]
            assert all(abs(x[1] - y[1]) < 1e-4 for x, y in zip(a[2], b[2]))
    else:
        assert _answers(together) == _answers(alone)


def test_attention_in_float32_for_bf16_models(tiny_models, tiny_llm):
    assert not LlamaRunner(tiny_models["fp32"]).attention_fp32  # nothing to do for a float32 model
    model = tiny_models["int4"]  # bfloat16 activations
    assert LlamaRunner(model).attention_fp32 and LlamaRunner(model, attention_per_row=False).attention_fp32  # on every CPU
    assert not LlamaRunner(model, attention_fp32=False).attention_fp32
    ids = torch.randint(10, 40000, (19,), generator=torch.Generator().manual_seed(4)).tolist()
    a = prefill_logits(LlamaRunner(model, attention_fp32=True), ids)
    b = prefill_logits(LlamaRunner(model, attention_fp32=False), ids)
    assert (a - b).abs().max() < 0.05 * b.abs().max()  # bf16 rounding apart, the same attention
    tok = tiny_llm.tokenizer
    eng = Engine(LlamaRunner(model, attention_fp32=True), tok, [tok.eos_token_id], EngineConfig(max_batch_size=4))
    try:
        p = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        prompts = [ids, ids[:7], ids[3:]]
        alone = [eng.submit(x, p).result().token_ids for x in prompts]
        assert [h.result().token_ids for h in [eng.submit(x, p) for x in prompts]] == alone
    finally:
        eng.shutdown()


def test_kv_cache_dtype_is_the_models_or_float32(tiny_models, tiny_llm):
    """The KV cache is in the model's dtype unless ``kv_dtype`` asks for float32 (memory accounted
    at 4 bytes, attended in float32); anything else is refused by name. Greedy text is the same
    with either cache here (keys rounded to bf16 or not), alone and in a batch."""
    from llamawrapper.errors import InvalidRequestError

    model, tok = tiny_models["int4"], tiny_llm.tokenizer  # bfloat16 activations
    assert LlamaRunner(tiny_models["fp32"]).kv_dtype == torch.float32
    assert LlamaRunner(model).kv_dtype == torch.bfloat16
    kept = LlamaRunner(model, kv_dtype="bfloat16")
    assert kept.kv_dtype == torch.bfloat16 and kept.kv_bytes_per_token * 2 == LlamaRunner(model, kv_dtype="float32").kv_bytes_per_token
    forced = LlamaRunner(model, attention_fp32=False, kv_dtype="float32")
    assert forced.attention_fp32 and forced.kv_dtype == torch.float32  # a float32 cache is attended in float32
    for bad, m in (("float16", model), ("bfloat16", tiny_models["fp32"]), ("int8", model)):
        with pytest.raises(InvalidRequestError) as err:
            LlamaRunner(m, kv_dtype=bad)
        assert err.value.param == "kv_cache_dtype" and repr(bad) in str(err.value)
    gen = torch.Generator().manual_seed(12)
    prompts = [torch.randint(10, 40000, (int(n),), generator=gen).tolist() for n in (5, 17, 33)]
    p = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    texts = {}
    for kv in ("float32", "bfloat16"):
        eng = Engine(LlamaRunner(model, attention_fp32=True, kv_dtype=kv), tok, [tok.eos_token_id], EngineConfig(max_batch_size=4))
        try:
            alone = [eng.submit(x, p).result().text for x in prompts]
            assert eng.slots.k[0].dtype == getattr(torch, kv)
            assert [h.result().text for h in [eng.submit(x, p) for x in prompts]] == alone
            texts[kv] = alone
        finally:
            eng.shutdown()
    assert texts["float32"] == texts["bfloat16"] and all(texts["float32"])


def _waves_of_requests(eng: Engine, prompts: list[list[list[int]]], p: SamplingParams) -> list[list[str]]:
    """Each wave's prompts submitted together; their texts."""
    return [[h.result().text for h in [eng.submit(x, p) for x in wave]] for wave in prompts]


def test_compiled_decode_does_not_recompile_per_request(tiny_llm):
    """The compiled decode step (dynamo guards; the "eager" backend keeps this test fast — the
    graphs and guards are the backend's input, the same for inductor) compiles once for batch 1
    and once for larger batches, then serves prompts of other lengths, batches of other sizes and
    a grown cache without compiling again; its greedy text equals the uncompiled runner's with
    the same (batch-invariant) attention, bit for bit."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model, tok = tiny_llm.loaded.model, tiny_llm.tokenizer
    torch._dynamo.reset()
    counters.clear()
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    gen = torch.Generator().manual_seed(7)
    waves = [[11], [30, 4], [9, 52, 23]]  # prompt lengths per wave of requests
    prompts = [[torch.randint(10, 40000, (n,), generator=gen).tolist() for n in wave] for wave in waves]
    out = {}
    for compiled in (False, "eager"):
        eng = Engine(LlamaRunner(model, compile=compiled, attention_per_row=True), tok, [tok.eos_token_id],
                     EngineConfig(max_batch_size=8))
        try:
            out[compiled] = _waves_of_requests(eng, prompts, p)
            if compiled:
                frames = counters["stats"]["unique_graphs"]
                assert 1 <= frames <= 2, dict(counters["stats"])  # batch 1 is specialised by dynamo; the rest share one
                more = [torch.randint(10, 40000, (n,), generator=gen).tolist() for n in (3, 70, 25, 14, 300)]
                [h.result() for h in [eng.submit(x, p) for x in more]]
                assert eng.slots.capacity > 256  # the cache grew: another capacity, the same graph
                eng.submit(more[1], p).result()  # alone again, longer
                assert counters["stats"]["unique_graphs"] == frames
        finally:
            eng.shutdown()
    assert out["eager"] == out[False]


@pytest.mark.slow
def test_inductor_compiled_int8_decode_is_the_same_alone_and_in_a_batch(tiny_models, tiny_llm):
    """The inductor-compiled decode step of an int8 model (C++ kernels of its own for the norms,
    rotations and softmax): a request's greedy text is the same alone and in batches of other
    sizes, a seeded sampled answer repeats, the engine's steps compile nothing after the first
    two graphs, and a step's logits are within float rounding of the uncompiled runner's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from llamawrapper.engine.kv_cache import SlotCache

    model, tok = tiny_models["int8"], tiny_llm.tokenizer
    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(12)
    prompts = [torch.randint(10, 40000, (int(n),), generator=gen).tolist() for n in (5, 33, 70, 12)]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=10, temperature=0.9, seed=3, ignore_eos=True)
    runner = LlamaRunner(model, compile=True)
    assert runner.compiled is not None and runner.attention_per_row
    eng = Engine(runner, tok, [tok.eos_token_id], EngineConfig(max_batch_size=8))
    try:
        alone = [eng.submit(x, greedy).result().text for x in prompts]
        # the first compiled step warms up (no load ran it here): both graphs, with the heads
        # static (traced at the batch's own sizes instead, batch 2 and this model's 2 KV heads
        # became one symbol, and a batch of 3 compiled again)
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
        assert [h.result().text for h in [eng.submit(x, greedy) for x in prompts]] == alone
        assert [h.result().text for h in [eng.submit(x, greedy) for x in prompts[1:3]]] == alone[1:3]
        assert counters["stats"]["unique_graphs"] == 2  # batch 1, and one graph for every larger batch
        seeded = [eng.submit(prompts[2], sampled).result().text for _ in range(2)]
        assert seeded[0] == seeded[1] and all(alone)
    finally:
        eng.shutdown()
    # one step over a 3-row cache: the compiled logits against the uncompiled runner's
    plain = LlamaRunner(model)
    logits = {}
    for r in (runner, plain):
        cache = SlotCache(r.n_layers, r.n_kv_heads, r.head_dim, r.kv_dtype, 3)
        cache.ensure(3, 200)
        g = torch.Generator().manual_seed(0)
        for t in cache.k + cache.v:
            t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
        positions = torch.tensor([150, 20, 99])
        mask = (torch.arange(151) <= positions.unsqueeze(1)).view(3, 1, 1, 151)
        logits[r is runner] = r.forward(torch.tensor([[5], [900], [31]]), positions.unsqueeze(1),
                                        cache.decode_view(3, positions, 151), mask)
    # (the graph count is pinned above, for the engine's steps; this direct step on a fresh
    # 3-slot cache compiled a third graph once in a full-suite run, not understood yet)
    assert (logits[True] - logits[False]).abs().max() < 1e-2 * logits[False].abs().max()


@pytest.mark.slow
def test_compiled_int4_decode_is_one_graph_and_the_uncompiled_text(tiny_llm):
    """An int4 model whose every layer fuses (k/v blocks of 64 channels) compiles its decode step
    without graph breaks (a break inside ``Int4Linear.forward`` would let dynamo share that
    forward's continuation among the modules, whose guards it skips: the wrong weights), and its
    greedy text is the uncompiled runner's."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_llm.tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    torch.manual_seed(1)
    model = quant.quantize_model(LlamaForCausalLM(config).eval(), "int4").eval()
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 40000, (n,), generator=gen).tolist() for n in (9, 30, 4)]
    torch._dynamo.reset()
    counters.clear()
    out = {}
    for compiled in (False, "eager"):
        runner = LlamaRunner(model, compile=compiled)
        assert (runner.compiled is not None) == bool(compiled)
        eng = Engine(runner, tok, [tok.eos_token_id], EngineConfig(max_batch_size=4))
        try:
            out[compiled] = [h.result().token_ids for h in [eng.submit(x, p) for x in prompts]]
        finally:
            eng.shutdown()
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert out[False] == out["eager"]


def test_compile_decode_builds_its_graphs_at_load_not_in_a_request(smollm2_folder, monkeypatch, tmp_path):
    """``compile_decode`` compiles while the model loads, into the on-disk cache under the home:
    the first requests (one alone, then several together, short and past the first key block)
    compile nothing more. The model's head_dim is 64, as smollm2's: the warm-up's 64 keys once
    made dynamo tie the KV length to head_dim, and every longer request compiled again."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llamawrapper import LlamaWrapper

    folder = tmp_path / "head-dim-64"
    tok = AutoTokenizer.from_pretrained(smollm2_folder)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.setenv("LLAMAWRAPPER_LOAD_PROCESS", "0")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cache_dir()  # torch's first use writes its /tmp default into the variable, as in a real process
    monkeypatch.setenv("LLAMAWRAPPER_HOME", str(tmp_path / "home"))
    torch._dynamo.reset()
    counters.clear()
    llm = LlamaWrapper.load(str(folder), engine={"compile_decode": True}, progress=False)
    try:
        assert llm.engine.runner.head_dim == 64
        assert llm.engine.runner.compiled is not None and counters["stats"]["unique_graphs"] == 2
        assert any((tmp_path / "home" / "cache" / "inductor").iterdir())
        p = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
        long = "Tell me everything about lighthouses, " * 12  # ~100 tokens: a second key block
        alone = llm.generate("Hello there", max_tokens=5, temperature=0, ignore_eos=True).text
        together = [h.result().text for h in [llm.submit_prompt(x, p) for x in ("Hello there", "Why?", long)]]
        assert llm.generate(long, max_tokens=5, temperature=0, ignore_eos=True).text == together[2]
        assert together[0] == alone and all(together)
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    finally:
        llm.close()
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # set by the load, for this home


def test_a_failed_compile_stops_the_warm_up_with_a_clear_error(tiny_models):
    """When the compiler fails (the inductor without a C++ compiler raises inside dynamo's backend
    call, as this backend does), the warm-up the load runs stops with a typed error that names the
    setting and the fix, not the inductor's page of traceback."""
    import torch._dynamo
    from torch._dynamo.exc import BackendCompilerFailed

    from llamawrapper.errors import UnsupportedModelError

    def no_compiler(gm, example_inputs):  # noqa: ANN001, ANN202
        raise RuntimeError("No working C++ compiler found in torch._inductor.config.cpp.cxx")

    torch._dynamo.reset()
    runner = LlamaRunner(tiny_models["int8"], compile=no_compiler)
    with pytest.raises(UnsupportedModelError, match=r"compile_decode could not compile .*C\+\+ compiler.*g\+\+") as err:
        runner.warm_up()
    assert isinstance(err.value.__cause__, BackendCompilerFailed)
    torch._dynamo.reset()


def test_engine_settings_reach_the_runner(tiny_model_dir, monkeypatch):
    from llamawrapper import LlamaWrapper

    monkeypatch.setenv("LLAMAWRAPPER_LOAD_PROCESS", "0")  # load here: a loader process costs seconds to start
    llm = LlamaWrapper.load(str(tiny_model_dir), engine={"fuse_projections": False}, progress=False)
    try:
        assert all(f is None for f in llm.engine.runner.fused) and llm.engine.runner.compiled is None
        assert not llm.engine.runner.attention_per_row  # a float model attends over the batch at once
        assert llm.engine.runner.kernel is not None  # decode steps attend through the C++ kernel by default
        assert llm.generate("Hi", max_tokens=3, temperature=0).usage.completion_tokens == 3
    finally:
        llm.close()
    monkeypatch.setenv("LLAMAWRAPPER_ATTENTION_PER_ROW", "true")  # the environment reaches it too
    monkeypatch.setenv("LLAMAWRAPPER_KV_CACHE_DTYPE", "float32")
    monkeypatch.setenv("LLAMAWRAPPER_ATTENTION_KERNEL", "false")
    llm = LlamaWrapper.load(str(tiny_model_dir), dtype="bfloat16", progress=False)
    try:
        assert llm.engine.runner.attention_per_row and llm.engine.slots.k[0].dtype == torch.float32
        assert llm.engine.runner.kernel is None
        assert llm.generate("Hi", max_tokens=3, temperature=0).usage.completion_tokens == 3
    finally:
        llm.close()
    from llamawrapper.engine.packed import PackedInt8Linear

    kernel = kernels.int8_rows_mm() is not None  # AVX-512 CPUs
    for env in ("true", "false"):  # int8_kernel (on by default) and off
        monkeypatch.setenv("LLAMAWRAPPER_INT8_KERNEL", env)
        llm = LlamaWrapper.load(str(tiny_model_dir), quantization="int8", progress=False)
        try:
            assert isinstance(llm.engine.runner.lm_head, PackedInt8Linear) == (kernel and env == "true")
            assert llm.generate("Hi", max_tokens=3, temperature=0).usage.completion_tokens == 3
        finally:
            llm.close()
    monkeypatch.delenv("LLAMAWRAPPER_INT8_KERNEL")
    from llamawrapper.engine.packed import PackedBf16Linear, PackedF32Linear, PackedInt4Linear

    for var, kernel, load, packed in (  # int4_kernel and bf16_kernel (on by default; AVX512-BF16 CPUs),
            # f32_kernel (on by default; AVX-512 CPUs), and off
            ("LLAMAWRAPPER_INT4_KERNEL", kernels.int4_rows_mm(), {"quantization": "int4"}, PackedInt4Linear),
            ("LLAMAWRAPPER_BF16_KERNEL", kernels.bf16_rows_mm(), {"dtype": "bfloat16"}, PackedBf16Linear),
            ("LLAMAWRAPPER_F32_KERNEL", kernels.f32_rows_mm(), {}, PackedF32Linear)):
        for env in ("true", "false"):
            monkeypatch.setenv(var, env)
            llm = LlamaWrapper.load(str(tiny_model_dir), progress=False, **load)
            try:
                assert isinstance(llm.engine.runner.fused[0].o, packed) == (kernel is not None and env == "true")
                assert llm.generate("Hi", max_tokens=3, temperature=0).usage.completion_tokens == 3
            finally:
                llm.close()
        monkeypatch.delenv(var)


def test_onednn_packed_float32_projections_give_torch_linears_results(tiny_models, tiny_llm, adapter_dirs, monkeypatch):
    """A float32 runner calls oneDNN on packed copies of its plain projections (fused q/k/v and
    gate/up, o, down, the head): logits within float rounding of torch's own linears, the same
    greedy text, one packed copy per module shared by runners, a weight changed in place packed
    again; a bfloat16 runner gets bit for bit torch's results; quantized and LoRA-wrapped
    projections keep their own modules."""
    from llamawrapper.engine.packed import PackedLinear, available, packed_linear
    from llamawrapper.models import adapters as adapterlib

    if not available():
        pytest.skip("this torch has no oneDNN")
    model, tok = tiny_models["fp32"], tiny_llm.tokenizer
    ids = torch.randint(10, 40000, (37,), generator=torch.Generator().manual_seed(4)).tolist()
    # (float32 projections go through the project's own kernel by default: test_kernels)
    plain, packed = LlamaRunner(model, onednn=False), LlamaRunner(model, f32_kernel=False)
    assert not plain.onednn and packed.onednn and isinstance(packed.lm_head, PackedLinear)
    assert all(isinstance(m, PackedLinear) for f in packed.fused for m in (f.qkv, f.gate_up, f.o, f.down))
    assert all(isinstance(m, torch.nn.Linear) and not isinstance(m, PackedLinear) for f in plain.fused for m in (f.qkv, f.o))
    calls = []
    forward = PackedLinear.forward
    monkeypatch.setattr(PackedLinear, "forward", lambda self, x: calls.append(self) or forward(self, x))
    a, b = prefill_logits(plain, ids), prefill_logits(packed, ids)
    assert len(calls) == 4 * packed.n_layers + 1  # every projection of every layer, and the head
    assert (a - b).abs().max() < 1e-4 * a.abs().max()
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    texts = []
    for runner in (plain, packed):
        eng = Engine(runner, tok, [tok.eos_token_id], EngineConfig(max_batch_size=4))
        try:
            texts.append([eng.submit(p, greedy).result().text for p in (ids, ids[:9])])
        finally:
            eng.shutdown()
    assert texts[0] == texts[1] and texts[0][0]
    assert LlamaRunner(model, f32_kernel=False).fused[0].o is packed.fused[0].o  # one packed copy per module
    # the packed copies count in the model's memory, once: every projection and the head, in float32
    import types

    from llamawrapper.models.loaders import memory_bytes

    weights = sum(m.weight.numel() for layer in model.model.layers
                  for m in (*vars(layer.self_attn)["_modules"].values(), *vars(layer.mlp)["_modules"].values())
                  if type(m) is torch.nn.Linear) + model.lm_head.weight.numel()
    assert packed.packed_bytes == 4 * weights and plain.packed_bytes == 0
    runner = tiny_llm.engine.runner
    weights_only = memory_bytes(types.SimpleNamespace(loaded=tiny_llm.loaded))  # no engine: its weights alone
    assert runner.onednn and weights_only > 0 and memory_bytes(tiny_llm) == weights_only + runner.packed_bytes
    o_proj = model.model.layers[0].self_attn.o_proj
    with torch.no_grad():
        o_proj.weight.mul_(2.0)
    try:
        again = LlamaRunner(model, f32_kernel=False)
        assert again.fused[0].o is not packed.fused[0].o
        x = torch.randn(3, o_proj.in_features)
        assert torch.allclose(again.fused[0].o(x), o_proj(x), atol=1e-4)
    finally:
        with torch.no_grad():
            o_proj.weight.div_(2.0)
    for dtype in (torch.float32, torch.bfloat16):  # a projection with a bias (qwen2's q/k/v), on [B, T, in] inputs
        lin = torch.nn.Linear(96, 40, bias=True).to(dtype)
        x = torch.randn(3, 5, 96).to(dtype)
        out = packed_linear(lin)(x)
        assert isinstance(packed_linear(lin), PackedLinear) and out.shape == (3, 5, 40) and out.dtype == dtype
        assert (out.float() - lin(x).float()).abs().max() < (1e-5 if dtype == torch.float32 else 3e-2)
    assert packed_linear(torch.nn.Linear(8, 8).half()).__class__ is torch.nn.Linear  # float16: torch's own
    half = copy.deepcopy(model).to(torch.bfloat16)  # bfloat16: the same oneDNN kernel, its weights packed once
    bf = LlamaRunner(half, bf16_kernel=False)  # (by default, the project's own bfloat16 kernel: test_kernels)
    assert bf.onednn and isinstance(bf.fused[0].qkv, PackedLinear)
    assert torch.equal(prefill_logits(LlamaRunner(half, onednn=False), ids), prefill_logits(bf, ids))
    for mode in ("int8", "int4", "w8a8"):  # quantized projections: their own kernels
        r = LlamaRunner(tiny_models[mode])
        assert not any(isinstance(m, PackedLinear) for f in r.fused for m in (f.qkv, f.gate_up, f.o, f.down))
    lora = copy.deepcopy(tiny_llm.loaded.model)
    adapterlib.attach(lora, {"sql": str(adapter_dirs["sql"])}, torch.float32)
    r = LlamaRunner(lora, f32_kernel=False)
    assert r.onednn and all(f.qkv is None for f in r.fused)  # q_proj and v_proj carry the adapter: unfused
    for layer, f in zip(lora.model.layers, r.fused):  # a wrapped projection is called as it is, a plain one packed
        own = layer.self_attn.o_proj
        assert f.o is own if type(own) is not torch.nn.Linear else isinstance(f.o, PackedLinear)
