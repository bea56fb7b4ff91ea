"""Prompt prefixes whose keys/values the rows of a decode step read from one copy.

When 16 chats share a 300-token system prompt, a decode step's attention reads that prompt's
keys and values 16 times (every slot holds its own copy) and, for a bfloat16 cache attended in
float32, casts it 16 times. A row that found at least ``KV_ALIGN`` tokens of its prompt in the
prefix cache instead attends over those first ``length`` positions (its prefix cache hit, cut to
whole key blocks) from a ``SharedPrefix``: one tensor that every running row with the same
prefix reads, cast once a step (``_attend_shared`` in ``runner.py``). The slot still holds the
row's whole context, so every other forward (prefill, verify steps, compaction, export to the
prefix cache) is unchanged.

Where a row splits is its own: the length of its prefix cache hit when it was admitted, the same
whether it runs alone or in a batch. Rows share a ``SharedPrefix`` only when its keys and values
are bit for bit the ones their own slot holds (a prefix evicted and computed again may differ in
the last bits), so sharing never changes a row's result.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from .kv_cache import KV_ALIGN


class SharedPrefix:
    """The first ``length`` positions of a prompt's KV, ``[layers, 2, kv_heads, length, head_dim]``."""

    __slots__ = ("key", "kv", "length", "__weakref__")

    def __init__(self, key: bytes, kv: torch.Tensor) -> None:
        self.key, self.kv, self.length = key, kv, kv.shape[3]

    def layer(self, i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of layer ``i`` as ``[kv_heads, length, head_dim]`` in ``dtype``."""
        return self.kv[i, 0].to(dtype), self.kv[i, 1].to(dtype)


class SharedPrefixes:
    """The prefixes running rows read, one object per distinct prefix; an entry lives as long as
    a row holds it (weak references), so nothing needs releasing."""

    def __init__(self) -> None:
        self._live: "weakref.WeakValueDictionary[bytes, SharedPrefix]" = weakref.WeakValueDictionary()
        self.made = 0  # copies made so far

    def __len__(self) -> int:
        return len(self._live)

    @staticmethod
    def length(cached: int) -> int:
        """Where a row whose prompt found ``cached`` tokens in the prefix cache splits its
        attention: whole key blocks of the hit (0 = it reads everything from its slot)."""
        return cached // KV_ALIGN * KV_ALIGN

    def get(self, key: bytes, kv: torch.Tensor) -> SharedPrefix:
        """The shared copy of prefix ``key`` whose KV is ``kv`` (``[layers, 2, kv_heads, n, head_dim]``),
        made from ``kv`` unless a live one holds exactly these values."""
        live: Optional[SharedPrefix] = self._live.get(key)
        if live is not None and live.kv.shape == kv.shape and torch.equal(live.kv, kv):
            return live
        shared = SharedPrefix(key, kv.contiguous())
        self.made += 1
        if live is None:
            self._live[key] = shared
        return shared
