"""Prefix cache: block matching, byte budget, LRU eviction, hit accounting."""

import torch

from llamawrapper.engine.prefix_cache import PrefixCache

LAYERS, HEADS, DIM, BS = 2, 1, 4, 4
BLOCK_BYTES = LAYERS * 2 * HEADS * BS * DIM * 4


def kv_for(tokens):
    # KV whose values encode the token id, so a restored prefix can be checked exactly
    t = torch.tensor(tokens, dtype=torch.float32).view(1, 1, 1, -1, 1)
    return t.expand(LAYERS, 2, HEADS, len(tokens), DIM).contiguous()


def kv_of(cache, tokens, namespace="", limit=None):
    """The cached prefix's KV in one tensor, or None on a miss."""
    blocks, _ = cache.lookup(tokens, namespace, limit)
    return torch.cat(blocks, dim=3) if blocks else None


def fetcher(tokens):
    kv = kv_for(tokens)
    return lambda a, b: kv[:, :, :, a:b]


def test_longest_block_prefix_is_returned_exactly():
    cache = PrefixCache(budget_bytes=10 * BLOCK_BYTES, block_size=BS)
    seq = list(range(10))
    cache.insert(seq, fetcher(seq))
    assert cache.stats.blocks == 2  # only full blocks are stored
    query = list(range(8)) + [99, 100]
    got = kv_of(cache, query)
    assert got is not None and got.shape[3] == 8
    assert torch.equal(got, kv_for(list(range(8))))
    assert kv_of(cache, [5, 6, 7, 8]) is None


def test_namespaces_do_not_share_blocks():
    cache = PrefixCache(budget_bytes=10 * BLOCK_BYTES, block_size=BS)
    seq = list(range(8))
    cache.insert(seq, fetcher(seq), namespace="adapter-a")
    assert kv_of(cache, seq, namespace="adapter-b") is None
    assert kv_of(cache, seq, namespace="adapter-a").shape[3] == 8


def test_budget_is_never_exceeded_and_lru_evicts_oldest():
    cache = PrefixCache(budget_bytes=3 * BLOCK_BYTES, block_size=BS)
    for start in range(0, 100, 10):
        seq = list(range(start, start + 8))
        cache.insert(seq, fetcher(seq))
        assert cache.stats.bytes <= cache.stats.budget_bytes
    assert cache.stats.peak_bytes <= cache.stats.budget_bytes
    assert cache.stats.evictions > 0
    assert kv_of(cache, list(range(0, 8))) is None  # oldest gone
    assert kv_of(cache, list(range(90, 98))) is not None  # newest kept


def test_lookup_limit_leaves_a_token_to_compute():
    cache = PrefixCache(budget_bytes=10 * BLOCK_BYTES, block_size=BS)
    seq = list(range(8))
    cache.insert(seq, fetcher(seq))
    got = kv_of(cache, seq, limit=len(seq) - 1)
    assert got.shape[3] == 4


def test_hit_rate_counts_tokens():
    cache = PrefixCache(budget_bytes=10 * BLOCK_BYTES, block_size=BS)
    seq = list(range(8))
    cache.insert(seq, fetcher(seq))
    kv_of(cache, seq)
    kv_of(cache, [50] * 8)
    assert cache.stats.hit_rate == 8 / 16


def test_zero_budget_stores_nothing():
    cache = PrefixCache(budget_bytes=0, block_size=BS)
    cache.insert(list(range(8)), fetcher(list(range(8))))
    assert cache.stats.blocks == 0 and kv_of(cache, list(range(8))) is None
