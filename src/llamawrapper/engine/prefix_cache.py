"""Prefix cache: KV of prompt prefixes kept across requests, in fixed-size token blocks.

A block is identified by a hash chained over every token before it (plus a namespace, such as
the adapter), so a hit on block *n* means the whole prefix up to it matches. Blocks are kept
in LRU order under a byte budget; a lookup touches the chain from its last block back to the
first, so eviction removes the deepest blocks of a chain before its root.

Every stored block has a serial number of its own (never reused): two sequences that hold blocks
of the same serials hold the same keys and values there, bit for bit, which lets a decode step
read a shared prefix from one of them (``SlotCache.sharing``). The same tokens computed again
after an eviction get a new serial, since their last bits may differ.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    hit_tokens: int = 0
    lookup_tokens: int = 0
    blocks: int = 0
    bytes: int = 0
    budget_bytes: int = 0
    evictions: int = 0
    peak_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


def _chain(parent: bytes, tokens: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b",".join(str(t).encode() for t in tokens))
    return h.digest()


class PrefixCache:
    """Block-granular, byte-bounded LRU store of prefix KV (``[layers, 2, kv_heads, block, head_dim]``)."""

    def __init__(self, budget_bytes: int, block_size: int = 16) -> None:
        self.block_size = block_size
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._serials: dict[bytes, int] = {}
        self._next = itertools.count(1)
        self.stats = PrefixCacheStats(budget_bytes=budget_bytes)

    def _hashes(self, tokens: Sequence[int], namespace: str) -> list[bytes]:
        bs = self.block_size
        parent = namespace.encode()
        out = []
        for start in range(0, len(tokens) - bs + 1, bs):
            parent = _chain(parent, tokens[start : start + bs])
            out.append(parent)
        return out

    def _found(self, tokens: Sequence[int], namespace: str) -> list[tuple[bytes, torch.Tensor]]:
        """The cached blocks of ``tokens``' longest cached block prefix, in order."""
        found = []
        for h in self._hashes(tokens, namespace):
            block = self._blocks.get(h)
            if block is None:
                break
            found.append((h, block))
        return found

    def lookup(self, tokens: Sequence[int], namespace: str = "",
               limit: int | None = None) -> tuple[list[torch.Tensor], tuple[int, ...]]:
        """The KV of the longest cached block prefix of ``tokens[:limit]`` as its blocks, in order
        (empty on a miss; the caller copies them where it wants them, once), and the serials of
        those blocks."""
        self.stats.lookups += 1
        usable = tokens if limit is None else tokens[:limit]
        self.stats.lookup_tokens += len(usable)
        found = self._found(usable, namespace)
        for h, _ in reversed(found):
            self._blocks.move_to_end(h)
        self.stats.hit_tokens += len(found) * self.block_size
        return [b for _, b in found], tuple(self._serials[h] for h, _ in found)

    def cached_tokens(self, tokens: Sequence[int], namespace: str = "", limit: int | None = None) -> int:
        """How many leading tokens of ``tokens[:limit]`` a ``lookup`` would find now (no stats, no
        change of LRU order)."""
        return len(self._found(tokens if limit is None else tokens[:limit], namespace)) * self.block_size

    def insert(self, tokens: Sequence[int], fetch: Callable[[int, int], torch.Tensor], namespace: str = "") -> list[Optional[int]]:
        """Store the full blocks of ``tokens``; ``fetch(start, end)`` returns the KV of those
        positions as ``[layers, 2, kv_heads, end - start, head_dim]`` (called for missing blocks only).
        Returns, per full block stored by this call, its serial (None for a block it did not store:
        one cached already, or one past the budget)."""
        if self.stats.budget_bytes <= 0:
            return []
        hashes = self._hashes(tokens, namespace)
        bs = self.block_size
        stored: list[Optional[int]] = [None] * len(hashes)
        for i, h in enumerate(hashes):
            if h in self._blocks:
                continue
            block = fetch(i * bs, (i + 1) * bs).clone()
            size = block.numel() * block.element_size()
            if size > self.stats.budget_bytes:
                return stored
            self._evict_until(self.stats.budget_bytes - size)
            self._blocks[h] = block
            self._serials[h] = stored[i] = next(self._next)
            self.stats.bytes += size
            self.stats.blocks += 1
        for h in reversed(hashes):
            if h in self._blocks:
                self._blocks.move_to_end(h)
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.bytes)
        return stored

    def _evict_until(self, target: int) -> None:
        while self._blocks and self.stats.bytes > target:
            h, block = self._blocks.popitem(last=False)
            del self._serials[h]
            self.stats.bytes -= block.numel() * block.element_size()
            self.stats.blocks -= 1
            self.stats.evictions += 1

    def clear(self) -> None:
        self._evict_until(0)
