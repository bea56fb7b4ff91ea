"""The project's C++ kernels (``engine/kernels.py``, issue 14): built here by the project's
set-up; decode attention within float rounding of float32 SDPA, every row bit for bit what it is
alone, used by every decode step of an engine; prefill attention bit for bit what a decode step at
a token's position gets, whatever the chunk; the norms, the int4 unpacking and the int8 head; and torch's code
when they cannot be built."""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
import torch.nn.functional as F

from llamawrapper import SamplingParams
from llamawrapper.engine import Engine, EngineConfig, LlamaRunner, kernels
from llamawrapper.engine.kv_cache import SlotCache
from runner_helpers import prefill_logits
from llamawrapper.engine.runner import _attend


def counting(runner: LlamaRunner, name: str) -> list[int]:
    """Swap the runner's kernel module for one that records, per call of ``name``, the first
    argument's length; returns that record."""
    calls: list[int] = []
    module = runner.kernel

    class Counting:
        def __getattr__(self, attr):
            return getattr(module, attr)

    def counted(*a):
        calls.append(a[0].shape[0])
        return getattr(module, name)(*a)
    setattr(Counting, name, staticmethod(counted))
    runner.kernel = Counting()
    return calls


def attention_blocks(runner: LlamaRunner, monkeypatch, record) -> None:
    """Call ``record(rows, sharing)`` for each attention block a decode step of ``runner`` runs (RoPE,
    cache write and attention of one layer): the Python loop's calls of ``rope_write_attention``,
    or those the layer loop (``DecodeLayers``, one call a step) makes in the kernel, one per layer."""
    real = kernels.rope_write_attention
    monkeypatch.setattr(kernels, "rope_write_attention", lambda *a: record(a[1].shape[0], a[-1]) or real(*a))
    loop = runner.layer_loop
    if loop is not None:
        def recorded(h, cos, sin, k, v, positions, src=None, shared=None):
            for _ in range(runner.n_layers):
                record(h.shape[0], None if src is None else (src, shared))
            return loop(h, cos, sin, k, v, positions, src, shared)
        runner.layer_loop = recorded


@pytest.fixture(scope="module")
def kernel():
    module = kernels.load()
    assert module is not None, "the kernel did not build (make's set-up installs g++)"
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 2, 16), (8, 8, 128), (6, 1, 48), (14, 2, 64), (10, 2, 128)])
def test_kernel_is_float32_attention_and_each_row_alone(kernel, dtype, heads, kv_heads, head_dim):
    """Over views of a real slot cache (rows of lengths 1 to 700 in batches of 1 to 16) and a
    query strided as the fused projection leaves it: within float rounding of SDPA in float32,
    and every row bit for bit what it is alone in a one-row step. The head counts take the
    kernel's groups of query heads (with AVX-512: up to 4 at head_dim 64, 2 at 128) whole and in
    parts (7 query heads a KV head: 4 + 3; 5 at 128: 2 + 2 + 1)."""
    if not kernel.supports(head_dim):
        pytest.skip(f"head_dim {head_dim} is not one this CPU's build of the kernel takes (vector width {kernel.width()})")
    gen = torch.Generator().manual_seed(head_dim)
    cache = SlotCache(1, kv_heads, head_dim, dtype, 16)
    cache.ensure(16, 700)
    for t in (cache.k[0], cache.v[0]):
        t.copy_(torch.randn(t.shape, generator=gen).to(dtype))
    k_all, v_all = cache.k[0], cache.v[0]
    for trial, B in enumerate((1, 2, 5, 16)):
        lengths = torch.randint(1, (30, 700)[trial % 2], (B,), generator=gen)
        lengths[0] = 1  # a row that sees only its own key
        L = int(lengths.max())
        q = torch.randn(B, 1, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)[:, :, :heads].transpose(1, 2)
        out = kernels.decode_attention(kernel, q, k_all[:B, :, :L], v_all[:B, :, :L], lengths)
        assert out.shape == (B, heads, 1, head_dim) and out.dtype == dtype
        mask = (torch.arange(L) < lengths.unsqueeze(1)).view(B, 1, 1, L)
        ref = _attend(q.float(), k_all[:B, :, :L].float(), v_all[:B, :, :L].float(), mask, False)
        assert (out.float() - ref).abs().max() < (2e-6 if dtype == torch.float32 else 1e-2)
        for i in range(B):  # alone: its own slot, its own length, the view cut at it
            n = int(lengths[i])
            alone = kernels.decode_attention(kernel, q[i : i + 1], k_all[i : i + 1, :, :n], v_all[i : i + 1, :, :n],
                                                      lengths[i : i + 1])
            assert torch.equal(alone, out[i : i + 1])


@pytest.mark.parametrize("act,cache", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                       (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 2, 16)])
def test_rope_write_attention_is_the_step_by_step_path_bit_for_bit(kernel, act, cache, heads, kv_heads, head_dim):
    """The one-call decode block (RoPE, cache write, attention) against the runner's ops one by
    one (``_rotate``, the write at each row's position, the kernel): the same output and the same
    cache, bit for bit, in float32 and bfloat16 activations, with a cache of their dtype or float32."""
    from llamawrapper.engine.runner import _rotate

    if not kernel.supports(head_dim):
        pytest.skip(f"head_dim {head_dim} is not one this CPU's build of the kernel takes (vector width {kernel.width()})")
    gen = torch.Generator().manual_seed(heads)
    B, R = 6, heads + 2 * kv_heads
    caches = []
    for _ in range(2):
        c = SlotCache(1, kv_heads, head_dim, cache, 8)
        c.ensure(8, 300)
        caches.append(c)
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        a.copy_(torch.randn(a.shape, generator=gen).to(cache))
        b.copy_(a)
    positions = torch.tensor([0, 5, 63, 64, 200, 17])
    y = (torch.randn(B, 1, R * head_dim, generator=gen) * 2).to(act)
    angle = positions.view(B, 1, 1).float() * torch.rand(1, 1, head_dim, generator=gen) * 0.3
    cos, sin = angle.cos().to(act), angle.sin().to(act)  # [B, 1, D], as the rotary embedding gives them
    out = kernels.rope_write_attention(kernel, y, cos[:, 0].contiguous(), sin[:, 0].contiguous(),
                                                caches[0].k[0], caches[0].v[0], positions, heads)
    yv = y.view(B, 1, R, head_dim)
    qk = _rotate(yv[:, :, : heads + kv_heads], cos.unsqueeze(2), sin.unsqueeze(2))
    q, k, v = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2), yv[:, :, heads + kv_heads :].transpose(1, 2)
    rows = torch.arange(B)
    caches[1].k[0][rows, :, positions] = k[:, :, 0].to(cache)
    caches[1].v[0][rows, :, positions] = v[:, :, 0].to(cache)
    ref = kernels.decode_attention(kernel, q, caches[1].k[0], caches[1].v[0], positions + 1)
    assert out.dtype == act and torch.equal(out, ref.transpose(1, 2).reshape(B, 1, heads * head_dim))
    assert torch.equal(caches[0].k[0], caches[1].k[0]) and torch.equal(caches[0].v[0], caches[1].v[0])


@pytest.mark.parametrize("act,cache", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                       (torch.bfloat16, torch.float32)])
def test_a_prefill_token_gets_what_a_decode_step_at_its_position_gets(kernel, act, cache):
    """``prefill_attention`` over two prompts' chunks packed in one call (one after a cached prefix):
    every token's output, and every key and value it writes, are bit for bit what the decode block
    (``rope_write_attention``) gives that token alone at its position over the same cache; each
    prompt's chunk alone gives the same bits; and the result is torch's causal float32 attention
    within rounding."""
    from llamawrapper.engine.runner import _rotate

    heads, kv_heads, D = 9, 3, 64
    gen = torch.Generator().manual_seed(5)
    R, cap = heads + 2 * kv_heads, 128
    starts, counts = [40, 0], [23, 9]  # the first prompt's 40 positions are a cached prefix
    N = sum(counts)
    seqs = torch.repeat_interleave(torch.arange(2), torch.tensor(counts))
    positions = torch.cat([torch.arange(a, a + c) for a, c in zip(starts, counts)])
    y = (torch.randn(1, N, R * D, generator=gen) * 2).to(act)
    angle = positions.view(N, 1).float() * torch.rand(1, D, generator=gen) * 0.3
    cos, sin = angle.cos().to(act), angle.sin().to(act)
    prefix = [torch.randn(kv_heads, cap, D, generator=gen).to(cache) for _ in range(2)]

    def buffers():  # [KVH, cap, D] per prompt; past each prompt's written positions: garbage, never read
        ks = [prefix[0].clone(), torch.full((kv_heads, cap, D), float("nan")).to(cache)]
        vs = [prefix[1].clone(), torch.full((kv_heads, cap, D), float("nan")).to(cache)]
        return ks, vs

    ks, vs = buffers()
    out = kernels.prefill_attention(kernel, y, cos, sin, ks, vs, seqs, positions, heads)
    assert out.shape == (1, N, heads * D) and out.dtype == act and not out.isnan().any()
    # each token alone, as a decode row at its position of a slot cache holding its prompt so far
    for n in range(N):
        s, p = int(seqs[n]), int(positions[n])
        k_slot, v_slot = ks[s].clone().unsqueeze(0), vs[s].clone().unsqueeze(0)
        one = kernels.rope_write_attention(kernel, y[:, n].contiguous(), cos[n : n + 1], sin[n : n + 1], k_slot, v_slot,
                                                    positions[n : n + 1], heads)
        assert torch.equal(one[0, 0], out[0, n]), n
        assert torch.equal(k_slot[0, :, p], ks[s][:, p]) and torch.equal(v_slot[0, :, p], vs[s][:, p])
    # each prompt's chunk alone: the same bits
    for s in range(2):
        ks1, vs1 = buffers()
        rows = seqs == s
        alone = kernels.prefill_attention(kernel, y[:, rows].contiguous(), cos[rows], sin[rows], [ks1[s]], [vs1[s]],
                                                   torch.zeros(int(rows.sum()), dtype=torch.long), positions[rows], heads)
        assert torch.equal(alone[0], out[0, rows])
        end = starts[s] + counts[s]
        assert torch.equal(ks1[s][:, :end], ks[s][:, :end]) and torch.equal(vs1[s][:, :end], vs[s][:, :end])
    # torch's float32 attention, causal over each prompt
    yv = y.view(1, N, R, D)
    qk = _rotate(yv[:, :, : heads + kv_heads], cos.view(1, N, 1, D), sin.view(1, N, 1, D))
    q = qk[0, :, :heads].transpose(0, 1).float()  # [H, N, D]
    for s in range(2):
        rows = (seqs == s).nonzero().view(-1)
        end = starts[s] + counts[s]
        mask = torch.arange(end).view(1, -1) <= positions[rows].view(-1, 1)
        want = F.scaled_dot_product_attention(q[:, rows].unsqueeze(0), ks[s][:, :end].float().unsqueeze(0),
                                              vs[s][:, :end].float().unsqueeze(0), attn_mask=mask, enable_gqa=True)
        got = out[0, rows].view(-1, heads, D).transpose(0, 1).float()
        tol = 1e-5 if act == torch.float32 else 2 ** -7
        assert (got - want[0]).abs().max() <= tol * want.abs().max() + 1e-6


@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_prefill_chunks_go_through_the_kernel_with_the_same_text(tiny_llm, mode):
    """Every prefill forward (a lone prompt, a prompt after a cached prefix, prompts packed together)
    calls ``prefill_attention`` once a layer; the answers equal a runner's with torch's attention
    within rounding, and each request's answer is the same alone and in a batch (for int8, whose
    GEMMs compute each row alone, to the last bit of every logprob)."""
    from llamawrapper.models.quantization import quantize_model

    model, tok = tiny_llm.loaded.model, tiny_llm.tokenizer
    if mode == "int8":
        model = quantize_model(copy.deepcopy(model), "int8")
    runner = LlamaRunner(model)
    assert runner.kernel_prefill
    calls = counting(runner, "prefill_attention")
    gen = torch.Generator().manual_seed(4)
    system = torch.randint(10, 40000, (48,), generator=gen).tolist()
    prompts = [system + torch.randint(10, 40000, (int(n),), generator=gen).tolist() for n in (5, 19, 2)]
    p = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=True)
    eng = Engine(runner, tok, [tok.eos_token_id], EngineConfig(max_batch_size=4))
    plain = Engine(LlamaRunner(model, kernel_prefill=False), tok, [tok.eos_token_id], EngineConfig(max_batch_size=4))
    try:
        alone = [eng.submit(x, p).result() for x in prompts]
        # the first prompt whole (53 tokens); the others after the system prompt's 48 cached positions
        assert calls == [n for n in (53, 19, 2) for _ in range(runner.n_layers)]
        eng.prefix_cache.clear()
        calls.clear()
        batch = [h.result() for h in [eng.submit(x, p) for x in prompts]]
        assert calls and all(n > 0 for n in calls)  # packed prompts' tokens through the kernel
        without = [plain.submit(x, p).result() for x in prompts]
    finally:
        eng.shutdown()
        plain.shutdown()
    assert [(r.text, r.token_ids) for r in alone] == [(r.text, r.token_ids) for r in batch]
    if mode == "int8":
        assert [[x.logprob for x in r.logprobs] for r in alone] == [[x.logprob for x in r.logprobs] for r in batch]
    for a, b in zip(alone, without):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 1e-3


def test_a_prompt_position_gets_the_same_bits_however_the_prompt_is_chunked(tiny_llm):
    """With the prefill kernel a prompt token's attention depends only on its own query and its
    prompt's keys up to it: an int8 model (whose GEMMs compute each row alone) gives every position
    the same logits, bit for bit, prefilled whole, in chunks of 7, or after a cached prefix of 16
    (torch's SDPA may change the last bits with how many queries its forward holds: seen with w8a8
    over HTTP in session 8, docs/BENCHMARKS.md)."""
    from llamawrapper.engine.kv_cache import SequenceKV
    from llamawrapper.models.quantization import quantize_model

    model = quantize_model(copy.deepcopy(tiny_llm.loaded.model), "int8")
    ids = torch.randint(10, 40000, (40,), generator=torch.Generator().manual_seed(6)).tolist()

    def logits(runner, chunks):
        kv = SequenceKV(runner.n_layers, runner.n_kv_heads, runner.head_dim, runner.kv_dtype, capacity=len(ids))
        out, start = [], 0
        for c in chunks:
            pos = torch.arange(start, start + c).view(1, c)
            mask = (torch.arange(start + c).view(1, -1) <= pos.view(c, 1)).view(1, 1, c, start + c)
            out.append(runner.forward(torch.tensor([ids[start : start + c]]), pos, kv.chunk(start, c), mask, every=True)[0])
            start += c
            kv.length = start
        return torch.cat(out)

    runner = LlamaRunner(model)
    assert runner.kernel_prefill
    whole = logits(runner, [40])
    assert torch.equal(logits(runner, [7] * 5 + [5]), whole)
    assert torch.equal(logits(runner, [16, 24])[16:], whole[16:])


def test_prefill_attention_refuses_what_it_cannot_read(kernel):
    heads, kvh, D = 4, 2, 16
    y, cs = torch.randn(3, heads + 2 * kvh, D), torch.randn(3, D)
    k = [torch.randn(kvh, 8, D)]
    seqs = torch.zeros(3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="position is out of range"):
        kernel.prefill_attention(y, cs, cs, k, k, seqs, torch.tensor([6, 7, 8]), heads)
    with pytest.raises(RuntimeError, match="sequence is out of range"):
        kernel.prefill_attention(y, cs, cs, k, k, torch.tensor([0, 1, 0]), torch.tensor([0, 1, 2]), heads)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 alike"):
        kernel.prefill_attention(y, cs, cs, k, [k[0].bfloat16()], seqs, torch.tensor([0, 1, 2]), heads)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        kernel.prefill_attention(y, cs[:2], cs[:2], k, k, seqs, torch.tensor([0, 1, 2]), heads)
    with pytest.raises(RuntimeError, match="one key and one value buffer"):
        kernel.prefill_attention(y, cs, cs, k, [], seqs, torch.tensor([0, 1, 2]), heads)


def test_kernel_refuses_what_it_cannot_read(kernel):
    q = torch.randn(2, 4, 16)
    k = torch.randn(2, 2, 8, 16)
    with pytest.raises(RuntimeError, match="length is out of range"):
        kernel.decode_attention(q, k, k, torch.tensor([3, 9]))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernel.decode_attention(q, k.half(), k.half(), torch.tensor([3, 4]))
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel.decode_attention(q, torch.randn(2, 2, 16, 8).transpose(2, 3), k, torch.tensor([3, 4]))
    y, cs = torch.randn(2, 8, 16), torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="position is out of range"):  # the cache holds 8 positions
        kernel.rope_write_attention(y, cs, cs, k, k, torch.tensor([3, 8]), 4)
    with pytest.raises(RuntimeError, match="shapes do not match"):  # 4 query heads + 2 x 2 KV heads is 8 rows of y
        kernel.rope_write_attention(y, cs, cs, k, k, torch.tensor([3, 4]), 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_reads_its_shared_prefix_from_another_row_with_the_same_result(kernel, dtype):
    """Rows whose first positions hold the same values as another row's read them from that row
    (``src``/``shared``): bit for bit what their own copies give, through ``decode_attention`` and
    ``rope_write_attention``. Values that differ there change the result: the kernel reads the source."""
    gen = torch.Generator().manual_seed(7)
    B, H, KVH, D, P = 5, 9, 3, 64, 37  # a shared length that is no multiple of the kernel's blocks
    k = torch.randn(B, KVH, 128, D, generator=gen).to(dtype)
    v = torch.randn(B, KVH, 128, D, generator=gen).to(dtype)
    k[:, :, :P], v[:, :, :P] = k[1:2, :, :P], v[1:2, :, :P]  # every row holds row 1's prefix
    lengths = torch.tensor([50, 40, 90, 38, 120])
    src, shared = torch.tensor([1, 1, 1, 3, 1]), torch.tensor([P, 0, P, 0, P])
    q = torch.randn(B, H, D, generator=gen)
    own = kernel.decode_attention(q, k, v, lengths)
    assert torch.equal(kernel.decode_attention(q, k, v, lengths, src, shared), own)
    y, cs = torch.randn(B, H + 2 * KVH, D, generator=gen), torch.randn(B, D, generator=gen)
    outs = [kernel.rope_write_attention(y, cs, cs, k.clone(), v.clone(), lengths - 1, H, *sh)
            for sh in ((None, None), (src, shared))]
    assert torch.equal(outs[0], outs[1])
    k2 = k.clone()
    k2[1, :, :P] += 0.5  # the source row no longer holds the others' values
    changed = kernel.decode_attention(q, k2, v, lengths, src, shared)
    assert torch.equal(changed[1], kernel.decode_attention(q, k2, v, lengths)[1])
    assert not torch.equal(changed[0], own[0]) and torch.equal(changed[3], own[3])


def test_kernel_refuses_a_source_row_that_cannot_hold_the_shared_positions(kernel):
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 32, 16)
    lengths = torch.tensor([10, 20, 5])
    with pytest.raises(RuntimeError, match="source row does not hold"):  # row 2 holds 5 positions
        kernel.decode_attention(q, k, k, lengths, torch.tensor([2, 0, 0]), torch.tensor([8, 0, 0]))
    with pytest.raises(RuntimeError, match="shares more positions than it reads"):
        kernel.decode_attention(q, k, k, lengths, torch.tensor([1, 1, 1]), torch.tensor([11, 0, 0]))
    with pytest.raises(RuntimeError, match="go together"):
        kernel.decode_attention(q, k, k, lengths, torch.tensor([1, 1, 1]), None)
    y, cs = torch.randn(3, 8, 16), torch.randn(3, 16)
    with pytest.raises(RuntimeError, match="source row does not hold"):  # row 1 writes its position 9 in this call
        kernel.rope_write_attention(y, cs, cs, k, k, torch.tensor([12, 9, 4]), 4, torch.tensor([1, 1, 1]), torch.tensor([10, 0, 0]))


def test_slot_cache_shares_the_blocks_rows_got_from_the_same_prefix_cache_blocks():
    cache = SlotCache(1, 1, 16, torch.float32, 8, block=16)
    from llamawrapper.engine.kv_cache import SequenceKV

    seq = SequenceKV(1, 1, 16, torch.float32, capacity=80)
    seq.length = 80
    for slot, origin in enumerate([(7, 8, 9), (), (7, 8, 4, 5), (3,), (7, 8, 9, 10, 11, 12)]):
        cache.put(slot, seq, origin)
    src, shared = cache.sharing(5)
    assert src.tolist() == [0, 1, 0, 3, 0] and shared.tolist() == [0, 0, 32, 0, 48]
    assert cache.origins[4] == (7, 8, 9, 10, 11)  # cut to the 80 positions the slot holds
    cache.move(4, 0, 40)  # a row moved with fewer positions keeps the blocks it holds
    assert cache.sharing(5)[1].tolist() == [0, 0, 32, 0, 32]
    assert cache.sharing(2) is None and cache.decode_view(5, torch.zeros(5, dtype=torch.long), 8, share=False).sharing is None


@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_rows_sharing_a_system_prompt_read_it_once_and_answer_as_alone(tiny_llm, monkeypatch, mode):
    """Requests with a common 70-token system prompt, submitted together: the first computes it,
    the others read it from the prefix cache, and their decode steps read those positions from
    the first's slot. Each request's text, ids and log-probabilities are bit for bit what the same
    batch gets with sharing off, and (int8, whose GEMMs compute each row on its own) what it gets
    alone after the first request filled the cache."""
    from llamawrapper.models import quantization as quant

    model, tok = tiny_llm.loaded.model, tiny_llm.tokenizer
    if mode == "int8":
        model = quant.quantize_model(copy.deepcopy(model), "int8").eval()
    gen = torch.Generator().manual_seed(12)
    system = torch.randint(10, 40000, (70,), generator=gen).tolist()
    prompts = [system + torch.randint(10, 40000, (int(n),), generator=gen).tolist() for n in (3, 11, 25, 6)]
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=2)
    seen = []
    runner = LlamaRunner(model)
    assert runner.kernel is not None
    attention_blocks(runner, monkeypatch, lambda rows, sharing: seen.append(sharing))
    eng = Engine(runner, tok, [tok.eos_token_id], EngineConfig(max_batch_size=8))

    def answer(r):
        return r.text, r.token_ids, [(x.logprob, [(t.token, t.logprob) for t in x.top_logprobs]) for x in r.logprobs]
    try:
        eng.executor.call(eng.prefix_cache.clear).result()
        alone = [answer(eng.submit(x, p).result()) for x in prompts]
        assert not any(s is not None for s in seen)  # one row at a time: nothing to share
        runs = {}
        for share in (True, False):
            eng.share_prefix = share
            eng.executor.call(eng.prefix_cache.clear).result()
            seen.clear()
            runs[share] = [answer(h.result()) for h in [eng.submit(x, p) for x in prompts]]
            if share:
                shared = [s for s in seen if s is not None]
                assert shared and max(s[1].tolist() for s in shared) == [0, 64, 64, 64]  # 4 whole blocks of 16
            else:
                assert all(s is None for s in seen)
    finally:
        eng.shutdown()
    assert runs[True] == runs[False]
    if mode == "int8":
        assert runs[True] == alone


def test_every_decode_step_goes_through_the_kernel_with_batch_invariant_text(tiny_llm, monkeypatch):
    """An engine on a float32 runner: each decode step calls the kernel (RoPE, cache write and
    attention in one call) once per layer; a request's greedy text is the same alone and inside a batch; each step's logits are
    within float rounding of torch's attention (the same engine with ``kernel=False``)."""
    model, tok = tiny_llm.loaded.model, tiny_llm.tokenizer
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(10, 40000, (int(n),), generator=gen).tolist() for n in (4, 21, 60, 9, 33)]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    calls = []
    runner = LlamaRunner(model)
    assert runner.kernel is not None
    attention_blocks(runner, monkeypatch, lambda rows, sharing: calls.append(rows))
    eng = Engine(runner, tok, [tok.eos_token_id], EngineConfig(max_batch_size=8))
    try:
        alone = [(r.text, r.token_ids) for r in (eng.submit(p, greedy).result() for p in prompts)]
        steps = eng.stats.decode_steps
        assert len(calls) == runner.n_layers * steps and steps == len(prompts) * 9  # the first token comes from prefill
        batch = [(r.text, r.token_ids) for r in (h.result() for h in [eng.submit(p, greedy) for p in prompts])]
    finally:
        eng.shutdown()
    assert alone == batch and all(len(ids) == 10 for _, ids in alone)
    assert max(calls) == len(prompts)  # the batch ran as one step of five rows
    # one decode step of five rows against torch's attention
    torch_runner = LlamaRunner(model, kernel=False)
    assert torch_runner.kernel is None
    logits = []
    for r in (runner, torch_runner):
        cache = SlotCache(r.n_layers, r.n_kv_heads, r.head_dim, r.kv_dtype, 8)
        cache.ensure(5, 64)
        g = torch.Generator().manual_seed(3)
        for store in (cache.k, cache.v):
            for t in store:
                t.copy_(torch.randn(t.shape, generator=g))
        positions = torch.tensor([3, 20, 59, 8, 32])
        mask = (torch.arange(60) <= positions.unsqueeze(1)).view(5, 1, 1, 60)
        logits.append(r.forward(torch.tensor([[p[-1]] for p in prompts]), positions.unsqueeze(1),
                                cache.decode_view(5, positions, 60), mask))
    assert (logits[0] - logits[1]).abs().max() < 1e-4 * logits[1].abs().max()


def test_a_kernel_that_cannot_be_built_leaves_torchs_attention(tiny_llm, tmp_path, monkeypatch, caplog):
    """A kernel that cannot be built (no compiler, a failed build; here: its source is missing)
    is said once in the log, and the runner decodes with torch's attention."""
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_failed", None)
    monkeypatch.setattr(kernels, "SOURCES", [tmp_path / "missing.cpp"])
    monkeypatch.setenv("LLAMAWRAPPER_HOME", str(tmp_path / "home"))
    with caplog.at_level(logging.WARNING, logger="llamawrapper.engine"):
        runner = LlamaRunner(tiny_llm.loaded.model)
        LlamaRunner(tiny_llm.loaded.model)
    assert runner.kernel is None
    assert sum("C++ kernels could not be built" in r.getMessage() for r in caplog.records) == 1
    tok = tiny_llm.tokenizer
    eng = Engine(runner, tok, [tok.eos_token_id], EngineConfig(max_batch_size=4))
    try:
        res = eng.submit([5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)).result()
    finally:
        eng.shutdown()
    assert res.usage.completion_tokens == 6 and res.text


@pytest.mark.slow
def test_smollm2_answers_the_same_with_and_without_the_kernel(smollm2):
    """The real model, float32: sixteen chats decoded together give the same text through the
    kernel (the default) as through torch's attention."""
    from llamawrapper import LlamaWrapper
    from test_real_model import QUESTIONS

    assert smollm2.engine.runner.kernel is not None
    plain = LlamaWrapper.load("smollm2", engine={"attention_kernel": False}, progress=False)
    try:
        assert plain.engine.runner.kernel is None
        texts = []
        for llm in (smollm2, plain):
            handles = [llm.submit(llm.chat_prompt_ids([{"role": "user", "content": q}]),
                                  SamplingParams(max_tokens=40, temperature=0)) for q in QUESTIONS]
            texts.append([h.result().text for h in handles])
    finally:
        plain.close()
    assert texts[0] == texts[1] and all(texts[0])


def test_a_build_killed_half_way_does_not_stop_the_next_load(kernel, tmp_path):
    """torch's build lock is a plain file, left behind when a build is killed (Ctrl-C during the
    first ``make run``): the next process still loads the kernel, at once, instead of waiting on it."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    built = Path(kernel.__file__).parent
    ext = tmp_path / "ext"
    shutil.copytree(built, ext / built.name)
    (ext / built.name / "lock").write_text("")  # what a killed build leaves
    code = "from llamawrapper.engine import kernels as a; m = a.load(); print('loaded', m is not None)"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "loaded True" in out.stdout, out.stderr[-2000:]
    assert not (ext / built.name / "lock").exists()


def test_int4_weights_unpack_to_their_bfloat16_values(kernel):
    """The unpacker reads torch's packed int4 layout here: every weight is (q - 8) * scale + zero
    rounded to bfloat16, transposed ([in, out]); a GEMM over it is within bfloat16 rounding of
    torch's int4 kernel and gives each row what it gives that row alone."""
    from llamawrapper.models.quantization import quantize_int4_groups

    if kernels.capability() != "AVX512":
        pytest.skip("int4 prefill unpacks torch's AVX-512 int4 layout only")
    assert kernels.int4_prefill_matmul() is not None  # the layout check passed
    unpack = torch.ops.llamawrapper.int4_weight_bf16
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(192, 128, generator=gen) * 0.05
    q, sz = quantize_int4_groups(w, 32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scale, zero = sz.float().unbind(2)  # [K/32, N] each
    want = ((q.float() - 8).t() * scale.repeat_interleave(32, 0) + zero.repeat_interleave(32, 0)).bfloat16()
    got = unpack(packed, sz, 32)
    assert got.shape == (128, 192) and got.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() <= want.float().abs().max() * 2 ** -8  # one bfloat16 step at most
    x = torch.randn(40, 128, generator=gen).bfloat16()
    y, ref = torch.mm(x, got), torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
    assert (y.float() - ref.float()).abs().max() < 0.02 * ref.float().abs().max()
    assert torch.equal(torch.mm(x[3:4], got), y[3:4])
    with pytest.raises(RuntimeError, match="not a multiple of 64"):
        unpack(packed[:100], sz[:, :100].contiguous(), 32)


def test_int4_prefill_runs_on_unpacked_weights_and_decode_on_the_int4_kernel(tiny_llm, monkeypatch):
    """Without the project's int4 kernel (``int4_kernel=False``), an int4 runner prefills through the unpacked bfloat16 weights (every projection of every
    layer, once per forward) and decodes through torch's int4 kernel; its prefill logits are within
    bfloat16 rounding of torch's int4 kernel's, and its greedy text alone is its text in a batch."""
    from llamawrapper.models import quantization as quant

    if kernels.capability() != "AVX512":
        assert LlamaRunner(quant.quantize_model(copy.deepcopy(tiny_llm.loaded.model), "int4").eval()).int4_prefill is None
        pytest.skip("int4 prefill unpacks torch's AVX-512 int4 layout only")
    model = quant.quantize_model(copy.deepcopy(tiny_llm.loaded.model), "int4").eval()
    tok = tiny_llm.tokenizer
    calls = []
    real = kernels.int4_prefill_matmul()
    assert real is not None
    monkeypatch.setattr(kernels, "int4_prefill_matmul", lambda: lambda *a: calls.append(a[0].shape[0]) or real(*a))
    runner = LlamaRunner(model, int4_kernel=False)  # (with it, the int4 kernel takes every forward)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(10, 40000, (int(n),), generator=gen).tolist() for n in (30, 7, 52)]
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    eng = Engine(runner, tok, [tok.eos_token_id], EngineConfig(max_batch_size=4))
    try:
        alone = [eng.submit(x, p).result().token_ids for x in prompts]
        # qkv, o, gate/up, down of each layer, in each prompt's one prefill forward; none in the 15 decode steps
        assert len(calls) == len(prompts) * runner.n_layers * 4
        eng.executor.call(eng.prefix_cache.clear).result()
        batch = [h.result().token_ids for h in [eng.submit(x, p) for x in prompts]]
    finally:
        eng.shutdown()
    assert alone == batch
    logits = []
    for r in (runner, LlamaRunner(model, int4_prefill_bf16=False, int4_kernel=False)):
        ids = torch.tensor([prompts[0]])
        from llamawrapper.engine.kv_cache import SequenceKV

        seq = SequenceKV(r.n_layers, r.n_kv_heads, r.head_dim, r.kv_dtype, capacity=64)
        mask = torch.ones(1, 1, 30, 30, dtype=torch.bool).tril()
        logits.append(r.forward(ids, torch.arange(30).unsqueeze(0), seq.chunk(0, 30), mask))
    assert not torch.equal(logits[0], logits[1])  # two different kernels ...
    assert (logits[0] - logits[1]).abs().max() < 0.05 * logits[1].abs().max()  # ... within bfloat16 rounding


def test_int8_rows_mm_is_the_int8_matmul_each_row_what_it_is_alone(kernel):
    """``int8_rows_mm`` over ``int8_weight_blocks``: (x . w_n) * scale_n rounded to bfloat16, within
    one bfloat16 step of a float64 reference and of torch's int8 kernel, for 1 to 9 rows (the
    kernel's groups of 4 and every tail); every row bit for bit what it is alone; the layout's
    limits refused by name."""
    mm = kernels.int8_rows_mm()
    if mm is None:
        assert kernels.capability() != "AVX512" or not torch.cpu._is_avx512_bf16_supported()
        pytest.skip("the int8 kernel needs AVX512-BF16")
    gen = torch.Generator().manual_seed(8)
    w = torch.randint(-127, 128, (192, 96), generator=gen, dtype=torch.int8)
    scales = (torch.rand(192, generator=gen) / 50 + 1e-3).bfloat16()
    blocks = torch.ops.llamawrapper.int8_weight_blocks(w)
    assert blocks.shape == (3, 48, 64, 2) and torch.equal(blocks[1, 5], w[64:128, 10:12])
    for M in [*range(1, 10), 16, 33, 70, 130]:  # (more than 4 rows: each block converted once for all; 70, 130: two, three tasks of rows)
        x = torch.randn(M, 96, generator=gen).bfloat16()
        got = mm(x, blocks, scales)
        assert got.shape == (M, 192) and got.dtype == torch.bfloat16
        want = (x.double() @ w.double().t()) * scales.double()
        step = want.abs() * 2 ** -8 + 1e-30  # one bfloat16 step of each output
        assert ((got.double() - want).abs() <= step).all()
        ref = torch.ops.aten._weight_int8pack_mm(x, w, scales)
        assert ((got.double() - ref.double()).abs() <= 2 * step).all()
        for i in range(M):
            assert torch.equal(mm(x[i : i + 1].contiguous(), blocks, scales), got[i : i + 1])
    with pytest.raises(RuntimeError, match="not a multiple of 64"):
        torch.ops.llamawrapper.int8_weight_blocks(w[:100])
    with pytest.raises(RuntimeError, match="in_features 95 is odd"):
        torch.ops.llamawrapper.int8_weight_blocks(w[:, :95])
    with pytest.raises(RuntimeError, match="x has 95 features"):
        mm(torch.randn(2, 95).bfloat16(), blocks, scales)
    with pytest.raises(RuntimeError, match="x must be"):
        mm(torch.randn(2, 96), blocks, scales)


def test_f32_rows_mm_is_the_f32_matmul_each_row_what_it_is_alone(kernel):
    """``f32_rows_mm`` over ``f32_weight_blocks``: x . w in float32, within float32 rounding of a
    float64 reference and of ``F.linear``, for 1 to 9 rows (the groups of 4 and every tail), 70 and
    130 (two and three tasks of rows); every row bit for bit what it is alone; rows with leading dimensions,
    contiguous or not; ``packed_f32`` takes plain float32 Linears in blocks of 64 only; the limits
    refused by name."""
    from llamawrapper.engine.packed import PackedF32Linear, packed_f32

    mm = kernels.f32_rows_mm()
    if mm is None:
        assert kernels.capability() != "AVX512"
        pytest.skip("the float32 kernel needs AVX-512")
    gen = torch.Generator().manual_seed(14)
    w = torch.randn(192, 96, generator=gen)
    blocks = torch.ops.llamawrapper.f32_weight_blocks(w)
    assert blocks.shape == (3, 96, 64) and torch.equal(blocks[2, 7], w[128:192, 7])
    for M in [*range(1, 10), 16, 33, 70, 130]:
        x = torch.randn(M, 96, generator=gen)
        got = mm(x, blocks)
        assert got.shape == (M, 192) and got.dtype == torch.float32
        want = x.double() @ w.double().t()
        assert ((got.double() - want).abs() <= 1e-5 * want.abs().max()).all()
        assert ((got - torch.nn.functional.linear(x, w)).abs() <= 1e-5 * want.abs().max()).all()
        for i in {0, M // 2, M - 1}:
            assert torch.equal(mm(x[i : i + 1].contiguous(), blocks), got[i : i + 1])
    x = torch.randn(3, 2, 96, generator=gen)
    assert torch.equal(mm(x, blocks), mm(x.reshape(6, 96), blocks).view(3, 2, 192))
    assert torch.equal(mm(x.transpose(0, 1), blocks), mm(x, blocks).transpose(0, 1))
    lin = torch.nn.Linear(96, 128, bias=True)
    ours = packed_f32(lin)
    assert isinstance(ours, PackedF32Linear) and packed_f32(lin) is ours
    assert ours(x).shape == (3, 2, 128) and (ours(x) - lin(x)).abs().max() <= 1e-5 * lin(x).abs().max()
    assert type(packed_f32(torch.nn.Linear(96, 100))) is torch.nn.Linear  # not in blocks of 64: its own
    assert type(packed_f32(torch.nn.Linear(96, 128).bfloat16())) is torch.nn.Linear  # bfloat16: not this kernel's
    with pytest.raises(RuntimeError, match="not a multiple of 64"):
        torch.ops.llamawrapper.f32_weight_blocks(w[:100])
    with pytest.raises(RuntimeError, match="x has 94 features"):
        mm(torch.randn(2, 94), blocks)
    with pytest.raises(RuntimeError, match="x must be"):
        mm(torch.randn(2, 96).bfloat16(), blocks)


def test_bf16_rows_mm_is_the_bf16_matmul_each_row_what_it_is_alone(kernel):
    """``bf16_rows_mm`` over ``bf16_weight_blocks``: x . w in float32, rounded to bfloat16, within one
    bfloat16 step of a float64 reference and of torch's bfloat16 linear, for 1 to 9 rows, 70 and 130;
    every row bit for bit what it is alone; ``PackedBf16Linear`` (with a bias, on [B, T, in]) is its
    ``nn.Linear``; the layout's limits refused by name."""
    from llamawrapper.engine.packed import PackedBf16Linear, packed_bf16

    mm = kernels.bf16_rows_mm()
    if mm is None:
        assert kernels.capability() != "AVX512" or not torch.cpu._is_avx512_bf16_supported()
        pytest.skip("the bfloat16 kernel needs AVX512-BF16")
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(192, 96, generator=gen).bfloat16()
    blocks = torch.ops.llamawrapper.bf16_weight_blocks(w)
    assert blocks.shape == (3, 48, 64, 2) and torch.equal(blocks[2, 7], w[128:192, 14:16])
    for M in [*range(1, 10), 16, 33, 70, 130]:
        x = torch.randn(M, 96, generator=gen).bfloat16()
        got = mm(x, blocks)
        assert got.shape == (M, 192) and got.dtype == torch.bfloat16
        want = x.double() @ w.double().t()
        step = want.abs() * 2 ** -8 + 1e-6 * want.abs().max()
        assert ((got.double() - want).abs() <= step).all()
        ref = torch.nn.functional.linear(x, w)
        assert ((got.double() - ref.double()).abs() <= 2 * step).all()
        for i in {0, M // 2, M - 1}:
            assert torch.equal(mm(x[i : i + 1].contiguous(), blocks), got[i : i + 1])
    # rows with leading dimensions ([B, T, K], a decode step's [B, 1, K]), contiguous or not
    x = torch.randn(3, 2, 96, generator=gen).bfloat16()
    assert torch.equal(mm(x, blocks), mm(x.reshape(6, 96), blocks).view(3, 2, 192))
    assert torch.equal(mm(x.transpose(0, 1), blocks), mm(x, blocks).transpose(0, 1))
    lin = torch.nn.Linear(96, 128, bias=True).bfloat16()
    x = torch.randn(2, 3, 96, generator=gen).bfloat16()
    ours = packed_bf16(lin)
    assert isinstance(ours, PackedBf16Linear) and packed_bf16(lin) is ours
    assert ours(x).shape == (2, 3, 128) and (ours(x).float() - lin(x).float()).abs().max() <= 2 ** -7 * lin(x).float().abs().max()
    assert type(packed_bf16(torch.nn.Linear(96, 100).bfloat16())) is torch.nn.Linear  # not in blocks of 64: its own
    assert type(packed_bf16(torch.nn.Linear(96, 128))) is torch.nn.Linear  # float32: its own (oneDNN's)
    with pytest.raises(RuntimeError, match="not a multiple of 64"):
        torch.ops.llamawrapper.bf16_weight_blocks(w[:100])
    with pytest.raises(RuntimeError, match="x has 94 features"):
        mm(torch.randn(2, 94).bfloat16(), blocks)
    with pytest.raises(RuntimeError, match="x must be"):
        mm(torch.randn(2, 96), blocks)


def _alone_then_together(runner: LlamaRunner, tok, prompts: list[list[int]], module, monkeypatch) -> tuple[list, list, list, list]:
    """Greedy token ids of ``prompts`` (6 new each) alone, then submitted together, through an engine
    on ``runner``; and the rows of each call of ``module``'s kernel (``mm``) in each of the two."""
    rows: list[int] = []
    real = module.mm
    counting = lambda x, *a: rows.append(x.numel() // x.shape[-1]) or real(x, *a)  # noqa: E731
    monkeypatch.setattr(module, "mm", counting)
    monkeypatch.setattr(module, "_call", (counting, *module._call[1:]))  # (the eager path's bound call)
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    eng = Engine(runner, tok, [tok.eos_token_id], EngineConfig(max_batch_size=4))
    try:
        alone = [eng.submit(x, p).result().token_ids for x in prompts]
        rows_alone, rows[:] = list(rows), []
        eng.executor.call(eng.prefix_cache.clear).result()
        together = [h.result().token_ids for h in [eng.submit(x, p) for x in prompts]]
    finally:
        eng.shutdown()
    return alone, together, rows_alone, rows


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_float_weights_run_through_the_kernel_in_every_forward(tiny_llm, monkeypatch, dtype):
    """A bfloat16 (float32) model's projections and head go through ``bf16_rows_mm``
    (``f32_rows_mm``) in prefill and decode forwards alike; its prefill logits are within
    bfloat16 (float32) rounding of oneDNN's (the setting off), and its greedy text is the same
    alone and in a batch (each row's projections are what they are alone)."""
    from llamawrapper.engine.packed import PackedBf16Linear, PackedF32Linear, PackedLinear

    kernel, cls, off, tol = {"bfloat16": (kernels.bf16_rows_mm(), PackedBf16Linear, "bf16_kernel", 2 ** -6),
                             "float32": (kernels.f32_rows_mm(), PackedF32Linear, "f32_kernel", 1e-4)}[dtype]
    model = copy.deepcopy(tiny_llm.loaded.model).to(getattr(torch, dtype)).eval()
    if kernel is None:
        assert not isinstance(LlamaRunner(model).lm_head, cls)
        pytest.skip(f"the {dtype} kernel does not run on this CPU")
    runner, plain = LlamaRunner(model), LlamaRunner(model, **{off: False})
    projections = [getattr(f, n) for f in runner.fused for n in f.PROJECTIONS if getattr(f, n) is not None]
    assert all(isinstance(m, cls) for m in projections if m.out_features % 64 == 0)
    assert sum(isinstance(m, cls) for m in projections) >= 3 * runner.n_layers
    assert isinstance(runner.lm_head, cls) and isinstance(plain.lm_head, PackedLinear)
    gen = torch.Generator().manual_seed(13)
    prompts = [torch.randint(10, 40000, (int(n),), generator=gen).tolist() for n in (19, 8, 33)]
    alone, together, rows_alone, rows = _alone_then_together(runner, tiny_llm.tokenizer, prompts, runner.lm_head, monkeypatch)
    assert rows_alone == [1] * len(prompts) * 6  # each prompt's last token, then 5 decode steps
    assert max(rows) > 1 and alone == together
    ours, theirs = prefill_logits(runner, prompts[0]), prefill_logits(plain, prompts[0])
    assert (ours - theirs).abs().max() <= tol * theirs.abs().max()


def test_int8_weights_run_through_the_kernel_in_every_forward(tiny_llm, monkeypatch):
    """An int4 model's int8 head, and an int8 model's head and projections, go through
    ``int8_rows_mm`` in prefill and decode forwards alike; greedy text alone is the text in a
    batch, and prefill logits are within bfloat16 rounding of torch's int8 kernel's
    (``int8_kernel=False``)."""
    from llamawrapper.engine.packed import PackedInt4Linear, PackedInt8Linear
    from llamawrapper.models import quantization as quant

    if kernels.int8_rows_mm() is None:
        pytest.skip("the int8 kernel needs AVX512-BF16")
    tok = tiny_llm.tokenizer
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(10, 40000, (int(n),), generator=gen).tolist() for n in (21, 5, 40)]
    for mode in ("int4", "int8"):
        model = quant.quantize_model(copy.deepcopy(tiny_llm.loaded.model), mode).eval()
        runner = LlamaRunner(model)
        assert isinstance(runner.lm_head, PackedInt8Linear) and runner.packed_bytes >= model.lm_head.weight.numel()
        projections = [getattr(f, n) for f in runner.fused for n in f.PROJECTIONS if getattr(f, n) is not None]
        kinds = {type(m) for m in projections}
        int4 = {quant.Int4Linear} if kernels.int4_rows_mm() is None else {PackedInt4Linear, quant.Int4Linear}
        assert kinds == ({PackedInt8Linear} if mode == "int8" else int4), kinds  # (test_int4_weights_run_...)
        plain = LlamaRunner(model, int8_kernel=False)
        assert type(plain.lm_head) is quant.Int8Linear and not any(isinstance(getattr(f, "o"), PackedInt8Linear) for f in plain.fused)
        assert LlamaRunner(model).lm_head is runner.lm_head  # one copy per module, shared by runners ...
        with torch.no_grad():
            model.lm_head.weight.add_(0)
        assert LlamaRunner(model).lm_head is not runner.lm_head  # ... laid out again when the weight changes in place
        alone, together, rows_alone, rows = _alone_then_together(runner, tok, prompts, runner.lm_head, monkeypatch)
        assert rows_alone == [1] * len(prompts) * 6  # each prompt's last token, then 5 decode steps
        assert max(rows) > 1 and alone == together  # (the batch's decode steps went through it together)
        ours, theirs = prefill_logits(runner, prompts[0]), prefill_logits(plain, prompts[0])
        assert (ours - theirs).abs().max() <= 2 ** -7 * theirs.abs().max()


def _int4_weights(N: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-32 int4 values [N, K] and their scales and zeros [K / 32, N, 2] bfloat16, of random weights."""
    from llamawrapper.models.quantization import quantize_int4_groups

    return quantize_int4_groups(torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05, 32)


def test_int4_rows_mm_is_the_int4_matmul_each_row_what_it_is_alone(kernel):
    """``int4_rows_mm`` over ``int4_weight_pairs``: x . ((q - 8) * scale + zero) per group, rounded
    to bfloat16, within one bfloat16 step of a float64 reference (and two of torch's int4 kernel)
    for 1 to 9 rows (the kernel's groups of 4 and every tail) and for 70 (two tasks of rows); every
    row bit for bit what it is alone; ``PackedInt4Linear`` is its ``Int4Linear``, read out of
    torch's packed layout; the layout's limits refused by name."""
    from llamawrapper.engine.packed import PackedInt4Linear
    from llamawrapper.models.quantization import Int4Linear

    mm = kernels.int4_rows_mm()
    if mm is None:
        assert kernels.capability() != "AVX512" or not torch.cpu._is_avx512_bf16_supported()
        pytest.skip("the int4 kernel needs AVX512-BF16")
    q, sz = _int4_weights(192, 128, 5)
    blocks = torch.ops.llamawrapper.int4_weight_pairs(q)
    assert blocks.shape == (3, 64, 64) and blocks.dtype == torch.uint8
    # block 1, inputs 10 and 11: byte 2i + t holds channel 64 + i (low nibble) and 80 + i (high) at input 10 + t
    line = blocks[1, 5]
    assert torch.equal((line[:32] & 15).view(16, 2), q[64:80, 10:12].to(torch.uint8))
    assert torch.equal((line[:32] >> 4).view(16, 2), q[80:96, 10:12].to(torch.uint8))
    assert torch.equal((line[32:] >> 4).view(16, 2), q[112:128, 10:12].to(torch.uint8))
    scales = sz.bfloat16().view(4, 3, 64, 2).permute(1, 0, 3, 2).contiguous()
    scale, zero = sz.double().unbind(2)
    w = (q.double() - 8) * scale.t().repeat_interleave(32, 1) + zero.t().repeat_interleave(32, 1)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    gen = torch.Generator().manual_seed(7)
    for M in [*range(1, 10), 16, 33, 70, 130]:
        x = torch.randn(M, 128, generator=gen).bfloat16()
        got = mm(x, blocks, scales, 32)
        assert got.shape == (M, 192) and got.dtype == torch.bfloat16
        want = x.double() @ w.t()
        step = want.abs() * 2 ** -8 + 1e-6 * want.abs().max()  # one bfloat16 step (and float32 sums near 0)
        assert ((got.double() - want).abs() <= step).all()
        ref = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
        assert ((got.double() - ref.double()).abs() <= 2 * step).all()
        for i in {0, M // 2, M - 1}:
            assert torch.equal(mm(x[i : i + 1].contiguous(), blocks, scales, 32), got[i : i + 1])
    x = torch.randn(3, 2, 128, generator=gen).bfloat16()  # rows with leading dimensions, contiguous or not
    assert torch.equal(mm(x, blocks, scales, 32), mm(x.reshape(6, 128), blocks, scales, 32).view(3, 2, 192))
    assert torch.equal(mm(x.transpose(0, 1), blocks, scales, 32), mm(x, blocks, scales, 32).transpose(0, 1))
    linear = torch.nn.Linear(128, 192, bias=True)
    int4 = Int4Linear.from_linear(linear)
    x = torch.randn(2, 3, 128, generator=gen).bfloat16()
    ours, theirs = PackedInt4Linear(int4, mm)(x), int4(x)
    assert ours.shape == (2, 3, 192) and (ours.float() - theirs.float()).abs().max() <= 2 ** -7 * theirs.float().abs().max()
    with pytest.raises(RuntimeError, match="not a multiple of 64"):
        torch.ops.llamawrapper.int4_weight_pairs(q[:100])
    with pytest.raises(RuntimeError, match="x has 126 features"):
        mm(torch.randn(2, 126).bfloat16(), blocks, scales, 32)
    with pytest.raises(RuntimeError, match="x must be"):
        mm(torch.randn(2, 128), blocks, scales, 32)
    with pytest.raises(RuntimeError, match="bad group size"):
        mm(torch.randn(2, 128).bfloat16(), blocks, scales, 31)
    with pytest.raises(RuntimeError, match="scales_and_zeros must be"):
        mm(torch.randn(2, 128).bfloat16(), blocks, scales.float(), 32)


def test_int4_weights_run_through_the_kernel_in_every_forward(tiny_llm, monkeypatch):
    """An int4 model's projections go through ``int4_rows_mm`` in prefill and decode forwards alike
    (no unpacked prefill weights); greedy text alone is the text in a batch; prefill logits are
    within bfloat16 rounding of torch's int4 kernel's (``int4_kernel=False``); one copy per module,
    laid out again when the weight changes in place."""
    from llamawrapper.engine.packed import PackedInt4Linear
    from llamawrapper.models import quantization as quant

    model = quant.quantize_model(copy.deepcopy(tiny_llm.loaded.model), "int4").eval()
    if kernels.int4_rows_mm() is None:
        assert not any(isinstance(getattr(f, "o"), PackedInt4Linear) for f in LlamaRunner(model).fused)
        pytest.skip("the int4 kernel needs AVX512-BF16")
    tok = tiny_llm.tokenizer
    runner = LlamaRunner(model)
    # every projection whose output channels fill the kernel's blocks of 64 (the tiny model's k and v
    # have 32 each, so its q/k/v stay apart: torch's packing refuses to fuse them), in prefill forwards too
    for fused in (runner.fused, runner.prefill_fused):
        projections = [getattr(f, n) for f in fused for n in f.PROJECTIONS if getattr(f, n) is not None]
        assert all(isinstance(m, PackedInt4Linear) for m in projections if m.out_features % 64 == 0)
        assert all(type(m) is quant.Int4Linear for m in projections if m.out_features % 64)
        assert sum(isinstance(m, PackedInt4Linear) for m in projections) == 4 * runner.n_layers  # q, gate/up, o, down
    plain = LlamaRunner(model, int4_kernel=False)
    assert not any(isinstance(getattr(f, "o"), PackedInt4Linear) for f in plain.fused)
    # the copies' bytes count in the model's memory: the nibbles, and the bfloat16 scales and zeros laid out for them
    copies = [m for m in set(projections) if m.out_features % 64 == 0]
    assert runner.packed_bytes - plain.packed_bytes == sum(m.packed.numel() + 2 * m.scales_and_zeros.numel() for m in copies)
    assert LlamaRunner(model).fused[0].o is runner.fused[0].o  # one copy per module, shared by runners ...
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0)
    assert LlamaRunner(model).fused[0].down is not runner.fused[0].down  # ... laid out again when its weight changes
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(10, 40000, (int(n),), generator=gen).tolist() for n in (23, 6, 44)]
    alone, together, rows_alone, rows = _alone_then_together(runner, tok, prompts, runner.fused[-1].down, monkeypatch)
    assert sorted(rows_alone) == sorted([23, 6, 44] + [1] * 15)  # each prompt's prefill, then 5 decode steps each
    assert max(rows) > 1 and alone == together
    ours, theirs = prefill_logits(runner, prompts[0]), prefill_logits(plain, prompts[0])
    assert (ours - theirs).abs().max() <= 2 ** -6 * theirs.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_is_the_residual_add_and_transformers_rms_norm(kernel, dtype):
    """``add_rms_norm``: h += delta (rounded as torch's add rounds it, in place) and the RMS norm of
    each row within float rounding of transformers' LlamaRMSNorm, each row what it is alone."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(9)
    norm = LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(576, generator=gen) + 0.5)
    norm = norm.to(dtype)
    h = (torch.randn(16, 1, 576, generator=gen) * 3).to(dtype)
    delta = torch.randn(16, 1, 576, generator=gen).to(dtype)
    want_h = h + delta
    with torch.no_grad():
        want = norm(want_h)
    got_h = h.clone()
    got = kernel.add_rms_norm(got_h, delta, norm.weight, norm.variance_epsilon)
    assert torch.equal(got_h, want_h)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    one = h[5:6].clone()
    assert torch.equal(kernel.add_rms_norm(one, delta[5:6].clone(), norm.weight, norm.variance_epsilon), got[5:6])
    plain = want_h.clone()
    assert torch.equal(kernel.add_rms_norm(plain, None, norm.weight, norm.variance_epsilon), got)  # no delta: the norm alone
    assert torch.equal(plain, want_h)
    with pytest.raises(RuntimeError, match="weight must be"):
        kernel.add_rms_norm(h.clone(), None, norm.weight[:100], 1e-5)
    with pytest.raises(RuntimeError, match="delta must be"):
        kernel.add_rms_norm(h.clone(), delta.float() if dtype != torch.float32 else delta.bfloat16(), norm.weight, 1e-5)


def test_every_forward_adds_and_norms_in_the_kernel(tiny_llm, monkeypatch):
    """Every forward calls ``add_rms_norm`` twice a layer (prefill chunks and decode steps alike);
    the text is the same alone and in a batch, and within rounding of a runner without it."""
    model, tok = tiny_llm.loaded.model, tiny_llm.tokenizer
    runner = LlamaRunner(model)
    assert runner.kernel_norm
    calls = counting(runner, "add_rms_norm")
    loop = runner.layer_loop
    if loop is not None:  # a decode step's norms, two a layer, made in the layer loop's one call
        runner.layer_loop = lambda h, *a: calls.extend([h.shape[0]] * 2 * runner.n_layers) or loop(h, *a)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 40000, (int(n),), generator=gen).tolist() for n in (12, 40, 7)]
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=True)
    eng = Engine(runner, tok, [tok.eos_token_id], EngineConfig(max_batch_size=4))
    plain = Engine(LlamaRunner(model, kernel_norm=False), tok, [tok.eos_token_id], EngineConfig(max_batch_size=4))
    try:
        alone = [eng.submit(x, p).result() for x in prompts]
        assert len(calls) == len(prompts) * (1 + 5) * 2 * runner.n_layers  # one prefill forward and 5 decode steps each
        batch = [h.result() for h in [eng.submit(x, p) for x in prompts]]
        without = [plain.submit(x, p).result() for x in prompts]
    finally:
        eng.shutdown()
        plain.shutdown()
    # (float32 GEMMs round a row differently in a batch, so the text, not every bit of the logprobs)
    assert [(r.text, r.token_ids) for r in alone] == [(r.text, r.token_ids) for r in batch]
    for a, b in zip(alone, without):
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 1e-3


def test_norms_of_another_formula_keep_their_own_forward(tiny_llm):
    """The kernel takes over a model's norms if it computes what they compute, asked of the modules
    themselves: Llama's formula under another class name goes to the kernel; a norm of Gemma's
    formula (``x / rms(x) * (1 + weight)``), with the same attributes as Llama's, keeps its own
    forward, and the runner's logits are that forward's."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class OnePlusWeightNorm(LlamaRMSNorm):
        def forward(self, x):
            x32 = x.float()
            return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight.float())).to(x.dtype)

    class RenamedRMSNorm(LlamaRMSNorm):  # Llama's formula under another name (as other families name it)
        pass

    def with_norms(cls):
        model = copy.deepcopy(tiny_llm.loaded.model)
        for layer in model.model.layers:
            for name in ("input_layernorm", "post_attention_layernorm"):
                old = getattr(layer, name)
                new = cls(old.weight.shape[0], eps=old.variance_epsilon)
                new.weight = old.weight
                setattr(layer, name, new)
        return model

    assert LlamaRunner(with_norms(RenamedRMSNorm)).kernel_norm  # what it computes, not what it is called
    model = with_norms(OnePlusWeightNorm)
    runner, plain = LlamaRunner(model), LlamaRunner(model, kernel_norm=False)
    assert runner.kernel is not None and not runner.kernel_norm
    ids = torch.randint(10, 40000, (9,), generator=torch.Generator().manual_seed(4)).tolist()
    assert torch.equal(prefill_logits(runner, ids), prefill_logits(plain, ids))


def _wide_llama(mode: str) -> torch.nn.Module:
    """A random-weight Llama whose every projection fills the matmul kernels' blocks of 64 output
    channels (the tiny test model's k and v have 32), as ``mode``: fp32, bf16, int8 or int4; or
    ``qwen2``, a float32 Qwen2 (q/k/v projections with biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from llamawrapper.models import quantization as quant

    torch.manual_seed(5)
    shape = dict(vocab_size=320, hidden_size=128, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    if mode == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape)).eval()
        with torch.no_grad():  # (biases start at zero)
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_()
        return model
    model = LlamaForCausalLM(LlamaConfig(**shape)).eval()
    if mode == "bf16":
        return model.to(torch.bfloat16)
    return model if mode == "fp32" else quant.quantize_model(model, mode).eval()


@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8", "int4", "qwen2"])
def test_a_decode_steps_layers_in_one_kernel_call_are_the_python_loop_bit_for_bit(kernel, mode):
    """With every projection on the matmul kernels, an eager decode step runs its layer loop in one
    call (``DecodeLayers``): ragged rows, two of them reading a shared prefix from a third, give the
    logits and write the cache that the Python loop (``kernel_layers`` off) gives and writes, bit for
    bit, step after step."""
    from llamawrapper.engine.kv_cache import SequenceKV

    mm = {"fp32": kernels.f32_rows_mm, "bf16": kernels.bf16_rows_mm, "int8": kernels.int8_rows_mm, "int4": kernels.int4_rows_mm,
          "qwen2": kernels.f32_rows_mm}
    model = _wide_llama(mode)
    runner = LlamaRunner(model)
    if mm[mode]() is None:
        assert runner.layer_loop is None
        pytest.skip(f"the {mode} matmul kernel does not run on this CPU")
    assert runner.layer_loop is not None
    if mode == "qwen2":
        assert runner.fused[0].qkv.bias is not None and bool(runner.fused[0].qkv.bias.any())
    calls: list[int] = []
    loop = runner.layer_loop
    runner.layer_loop = lambda h, *a: calls.append(h.shape[0]) or loop(h, *a)
    gen = torch.Generator().manual_seed(8)
    caches = []
    for _ in range(2):  # one cache for each path, the same contents: 5 rows, rows 2 and 4 sharing row 0's first blocks
        cache = SlotCache(runner.n_layers, runner.n_kv_heads, runner.head_dim, runner.kv_dtype, 8, block=16)
        caches.append(cache)
    for slot, (n, origin) in enumerate([(40, (1, 2)), (9, ()), (37, (1, 2)), (20, (5,)), (50, (1, 2, 3))]):
        seq = SequenceKV(runner.n_layers, runner.n_kv_heads, runner.head_dim, runner.kv_dtype, capacity=n)
        seq.data.copy_(torch.randn(seq.data.shape, generator=gen).to(seq.data.dtype))
        seq.length = n
        for cache in caches:
            cache.put(slot, seq, origin)
    for cache in caches:
        cache.ensure(5, 80)
    for cache in caches:  # the shared positions hold the same values in every row that shares them
        for t in cache.k + cache.v:
            t[2, :, :32] = t[0, :, :32]
            t[4, :, :32] = t[0, :, :32]
    assert caches[0].sharing(5) is not None
    positions = torch.tensor([40, 9, 37, 20, 50])
    tokens = torch.randint(0, 320, (5, 1), generator=gen)
    for step in range(3):
        length = int(positions.max()) + 1
        mask = (torch.arange(length).unsqueeze(0) <= positions.unsqueeze(1)).view(5, 1, 1, length)
        out = []
        for cache, on in zip(caches, (True, False)):
            runner.kernel_layers = on
            out.append(runner.forward(tokens, positions.unsqueeze(1), cache.decode_view(5, positions, length), mask))
        assert torch.equal(out[0], out[1]), f"step {step}: the logits differ"
        assert all(torch.equal(a, b) for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v))
        tokens, positions = out[0].argmax(-1, keepdim=True), positions + 1
    assert calls == [5, 5, 5]  # every step of the first path went through the one call, none of the second's


def test_the_layer_loop_is_left_to_python_where_a_layer_is_not_all_kernels(tiny_llm):
    """A model whose q/k/v cannot fuse into the kernels' blocks (the tiny model's int4: torch's int4
    kernel for them), or whose projections keep torch's kernels (``f32_kernel=False``: oneDNN's),
    has no layer loop: its decode steps run the Python loop."""
    from llamawrapper.models import quantization as quant

    int4 = quant.quantize_model(copy.deepcopy(tiny_llm.loaded.model), "int4").eval()
    assert LlamaRunner(int4).kernel_block and LlamaRunner(int4).layer_loop is None
    wide = _wide_llama("fp32")
    if kernels.f32_rows_mm() is not None:
        assert LlamaRunner(wide).layer_loop is not None
    assert LlamaRunner(wide, f32_kernel=False).layer_loop is None
