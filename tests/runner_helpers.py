"""Helpers for tests that call a ``LlamaRunner`` directly."""

from __future__ import annotations

import torch

from llamawrapper.engine import LlamaRunner
from llamawrapper.engine.kv_cache import SequenceKV


def prefill_logits(runner: LlamaRunner, ids: list[int]) -> torch.Tensor:
    """The logits of every position of ``ids``, prefilled in one forward from an empty cache."""
    n = len(ids)
    kv = SequenceKV(runner.n_layers, runner.n_kv_heads, runner.head_dim, runner.dtype, capacity=n)
    mask = torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n)
    runner.bind_rows([""])
    return runner.forward(torch.tensor([ids]), torch.arange(n)[None], kv.chunk(0, n), mask, every=True)
