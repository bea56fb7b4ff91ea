"""KV storage for running sequences.

``SlotCache`` holds the decoding batch: one preallocated tensor per layer shaped
``[slots, kv_heads, capacity, head_dim]``; running sequences occupy slots ``0..n-1`` so a decode
step reads a view, never a copy. Capacity grows by doubling, only when a sequence needs it.
``SequenceKV`` is one sequence's private buffer while its prompt is prefilled in chunks; it is
moved into a slot when prefill ends. ``PackWriter`` lets one forward prefill chunks of several
sequences, each written to and read from its own ``SequenceKV``.

A slot also records its prompt prefix's *origin*: the serial numbers of the prefix-cache blocks
its first positions hold, bit for bit (``PrefixCache``). Rows whose origins begin alike hold the
same keys and values there, so a decode step may read those positions from one of them for all
(``sharing``): the decode-attention kernel then reads a shared system prompt from memory once, not
once per row, and each row's result is what its own copy gives.

A slot cache's capacity is always a multiple of ``KV_ALIGN`` positions, so a decode step may read
up to the next multiple of it (``_DecodeWriter.widened``): the batch-invariant attention needs
every row's keys in whole blocks of that size.
"""

from __future__ import annotations

import copy
import functools
from typing import Optional

import torch

KV_ALIGN = 64  # positions; slot-cache capacities are multiples of it


def _aligned(n: int) -> int:
    return -(-n // KV_ALIGN) * KV_ALIGN


def _grow(t: torch.Tensor, dim: int, new_size: int) -> torch.Tensor:
    """``t`` in a larger buffer along ``dim``; the new part is not zeroed (a ``SequenceKV``'s)."""
    shape = list(t.shape)
    shape[dim] = new_size
    out = torch.empty(shape, dtype=t.dtype, device=t.device)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


class SequenceKV:
    """One sequence's keys and values: ``[layers, 2, kv_heads, length, head_dim]`` (grows)."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, capacity: int = 64) -> None:
        # not zeroed: every reader stops at the positions written so far (chunks are written in
        # order, each before it is read; ``PackWriter`` and ``SlotCache.put`` copy up to the length)
        self.data = torch.empty(n_layers, 2, n_kv_heads, capacity, head_dim, dtype=dtype)
        self.length = 0  # tokens whose KV is valid

    def reserve(self, length: int) -> None:
        cap = self.data.shape[3]
        if length > cap:
            self.data = _grow(self.data, 3, max(length, 2 * cap))

    def load_prefix(self, blocks: list[torch.Tensor]) -> None:
        """Copy cached prefix KV, blocks of ``[layers, 2, kv_heads, n_i, head_dim]`` in order, to the start."""
        n = sum(b.shape[3] for b in blocks)
        self.reserve(n)
        torch.cat(blocks, dim=3, out=self.data[:, :, :, :n])  # straight into place, no copy in between
        self.length = n

    def chunk(self, start: int, count: int) -> "_ChunkWriter":
        self.reserve(start + count)
        return _ChunkWriter(self, start, count)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class _ChunkWriter:
    """KV view for prefilling positions ``start..start+count`` of one sequence (batch of 1)."""

    def __init__(self, seq: SequenceKV, start: int, count: int) -> None:
        self.seq, self.start, self.end = seq, start, start + count

    @functools.cached_property
    def token_seqs(self) -> torch.Tensor:
        """Each token's sequence among ``buffers``' (all 0), for ``prefill_attention``."""
        return torch.zeros(self.end - self.start, dtype=torch.long)

    def buffers(self, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The sequence's keys and values of one layer, ``[kv_heads, capacity, head_dim]``, for a
        kernel that writes and reads them in place (``prefill_attention``)."""
        d = self.seq.data[layer]
        return [d[0]], [d[1]]

    def write_read(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        d = self.seq.data[layer]
        d[0, :, self.start : self.end] = k[0]
        d[1, :, self.start : self.end] = v[0]
        return d[0, :, : self.end].unsqueeze(0), d[1, :, : self.end].unsqueeze(0)


class PackWriter:
    """KV view for prefilling chunks of several sequences in one forward: row ``i`` writes
    positions ``starts[i]..starts[i] + counts[i]`` of its own ``SequenceKV`` and reads all of
    its positions so far; rows are padded with zeros to the longest (the mask hides the padding).
    The padded keys/values are one buffer per forward, refilled layer by layer (each layer's
    attention has read it before the next layer writes)."""

    def __init__(self, seqs: list[SequenceKV], starts: list[int], counts: list[int]) -> None:
        for seq, a, c in zip(seqs, starts, counts):
            seq.reserve(a + c)
        self.seqs, self.starts, self.counts = seqs, starts, counts
        self.length = max(a + c for a, c in zip(starts, counts))
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    @functools.cached_property
    def token_seqs(self) -> torch.Tensor:
        """The packed tokens' sequences, in the order of the real positions (``_ChunkWriter.token_seqs``)."""
        return torch.repeat_interleave(torch.arange(len(self.seqs)), torch.tensor(self.counts))

    def buffers(self, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [s.data[layer, 0] for s in self.seqs], [s.data[layer, 1] for s in self.seqs]

    def write_read(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        B, heads, _, D = k.shape
        if self._buffers is None:  # zeros once: the padding past each row's length is never written
            self._buffers = (k.new_zeros(B, heads, self.length, D), v.new_zeros(B, heads, self.length, D))
        keys, values = self._buffers
        for i, (seq, a, c) in enumerate(zip(self.seqs, self.starts, self.counts)):
            d = seq.data[layer]
            d[0, :, a : a + c] = k[i, :, :c]
            d[1, :, a : a + c] = v[i, :, :c]
            keys[i, :, : a + c] = d[0, :, : a + c]
            values[i, :, : a + c] = d[1, :, : a + c]
        return keys, values


class SlotCache:
    """KV of the decoding batch: slot ``i`` holds running sequence ``i``."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, max_slots: int, capacity: int = 256,
                 block: int = 16) -> None:
        self.n_layers, self.n_kv_heads, self.head_dim, self.dtype = n_layers, n_kv_heads, head_dim, dtype
        self.max_slots = max_slots
        self.block = block  # positions per origin entry (the prefix cache's block size)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.origins: dict[int, tuple[int, ...]] = {}  # slot -> its prefix's block serials
        self._sharing: tuple[int, Optional[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._alloc(0, capacity)

    def _alloc(self, slots: int, capacity: int) -> None:
        shape = (max(slots, 1), self.n_kv_heads, _aligned(capacity), self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.n_layers)]
        self.origins, self._sharing = {}, None

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.n_layers * self.k[0].numel() * self.k[0].element_size()

    def ensure(self, slots: int, length: int) -> None:
        """Make room for ``slots`` sequences of up to ``length`` positions."""
        if slots <= self.slots and length <= self.capacity:
            return
        new_slots = self.slots if slots <= self.slots else min(self.max_slots, max(slots, 2 * self.slots))
        new_cap = self.capacity if length <= self.capacity else _aligned(max(length, 2 * self.capacity))
        for store in (self.k, self.v):
            for i, t in enumerate(store):  # one new tensor each, whichever dimensions grow
                grown = t.new_zeros(new_slots, t.shape[1], new_cap, t.shape[3])
                grown[: t.shape[0], :, : t.shape[2]] = t
                store[i] = grown

    def reset(self, capacity: int = 256) -> None:
        """Drop all storage (when idle) so memory does not stay at its high-water mark."""
        self._alloc(0, capacity)

    def put(self, slot: int, seq: SequenceKV, origin: tuple[int, ...] = ()) -> None:
        """Copy ``seq`` into ``slot``; ``origin``: the serials of the prefix-cache blocks its first
        positions hold, bit for bit (empty: share nothing)."""
        n = seq.length
        self.ensure(slot + 1, n + 1)
        for layer in range(self.n_layers):
            self.k[layer][slot, :, :n] = seq.data[layer, 0, :, :n]
            self.v[layer][slot, :, :n] = seq.data[layer, 1, :, :n]
        self.origins[slot] = tuple(origin)[: n // self.block]
        self._sharing = None

    def move(self, src: int, dst: int, length: int) -> None:
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :length] = t[src, :, :length]
        self.origins[dst] = self.origins.get(src, ())[: length // self.block]
        self._sharing = None

    def sharing(self, batch: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """For a decode step of slots ``0..batch-1``: ``(src, shared)`` [batch] int64, where row b's
        first ``shared[b]`` positions equal those of row ``src[b]`` (the first row whose origin
        starts with the same block; ``shared`` counts their common blocks), or None when no two rows
        share a block. Kept until a slot's content changes (``put``, ``move``, a reallocation)."""
        if self._sharing is not None and self._sharing[0] == batch:
            return self._sharing[1]
        first: dict[int, int] = {}
        src, shared = list(range(batch)), [0] * batch
        for b in range(batch):
            mine = self.origins.get(b, ())
            if not mine:
                continue
            r = first.setdefault(mine[0], b)
            theirs = self.origins[r]
            n = 0
            while r != b and n < min(len(mine), len(theirs)) and mine[n] == theirs[n]:
                n += 1
            src[b], shared[b] = r, n * self.block
        result = (torch.tensor(src), torch.tensor(shared)) if any(shared) else None
        self._sharing = (batch, result)
        return result

    def export(self, slot: int, start: int, end: int) -> torch.Tensor:
        """KV of positions ``start..end`` of a slot as ``[layers, 2, kv_heads, n, head_dim]``."""
        return torch.stack(
            [torch.stack((self.k[i][slot, :, start:end], self.v[i][slot, :, start:end])) for i in range(self.n_layers)]
        )

    def decode_view(self, batch: int, positions: torch.Tensor, length: int, share: bool = True) -> "_DecodeWriter":
        """The view of a decode step of slots ``0..batch-1`` (with ``share``, the rows' ``sharing``)."""
        return _DecodeWriter(self, batch, positions, length, self.sharing(batch) if share else None)

    def span_view(self, positions: torch.Tensor, length: int) -> "_SpanWriter":
        """KV view for a step that feeds T tokens per slot (positions ``[B, T]``): a speculative
        verify step."""
        return _SpanWriter(self, positions, length)


class _DecodeWriter:
    """KV view for one decode step of slots ``0..batch-1``, each writing at its own position."""

    def __init__(self, cache: SlotCache, batch: int, positions: torch.Tensor, length: int,
                 sharing: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> None:
        self.cache, self.batch, self.length = cache, batch, length
        self.rows = torch.arange(batch)
        self.positions = positions
        self.sharing = sharing  # (src, shared): positions a row may read from another row (SlotCache.sharing)
        self._flat: torch.Tensor | None = None

    @property
    def flat(self) -> torch.Tensor:
        """Where row b, head h writes in a layer's cache seen as [slots * heads * capacity,
        head_dim]: one index_copy_ per tensor and layer instead of an advanced-index assignment
        (made at the first eager write; the compiled step writes at ``rows``/``positions``)."""
        if self._flat is None:
            heads, cap = self.cache.n_kv_heads, self.cache.capacity
            self._flat = (((self.rows * heads).unsqueeze(1) + torch.arange(heads)) * cap + self.positions.view(self.batch, 1)).view(-1)
        return self._flat

    def write_read(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        kc = self.cache.k[layer]
        vc = self.cache.v[layer]
        flat = self.flat
        D = kc.shape[-1]
        kc.view(-1, D).index_copy_(0, flat, k.reshape(-1, D))
        vc.view(-1, D).index_copy_(0, flat, v.reshape(-1, D))
        return kc[: self.batch, :, : self.length], vc[: self.batch, :, : self.length]

    def widened(self) -> "_DecodeWriter":
        """The same writes, reading up to the next multiple of ``KV_ALIGN`` (never past the
        cache's capacity, itself such a multiple): positions past a row's own are masked."""
        view = copy.copy(self)
        view.length = min(_aligned(self.length), self.cache.capacity)
        return view


class _SpanWriter:
    """KV view for slots ``0..B-1`` each writing T consecutive positions (``positions`` [B, T]).
    Positions past a sequence's accepted length hold draft keys/values until they are
    overwritten: the mask never lets a query read beyond its own position."""

    def __init__(self, cache: SlotCache, positions: torch.Tensor, length: int) -> None:
        B, T = positions.shape
        self.cache, self.batch, self.length = cache, B, length
        self.rows = torch.arange(B).unsqueeze(1).expand(B, T)
        self.positions = positions

    def write_read(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        kc = self.cache.k[layer]
        vc = self.cache.v[layer]
        kc[self.rows, :, self.positions] = k.transpose(1, 2)  # [B, T, kv_heads, D]
        vc[self.rows, :, self.positions] = v.transpose(1, 2)
        return kc[: self.batch, :, : self.length], vc[: self.batch, :, : self.length]
