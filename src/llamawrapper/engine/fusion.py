"""Fused projections: one matmul for a layer's q/k/v, one for its gate/up (issue 14).

At batch 1 a decode step is ~200 small ops per layer; three projections that read the same input
cost three kernel launches and three trips through Python. ``fuse_linears`` builds one module
whose weight is the row-wise concatenation of its parts and re-points every part's weight at
its rows of that tensor, so the model's own modules (used by ``model(...)``, evaluation, and the
unfused path) keep working and no weight is stored twice.

Supported parts: plain ``nn.Linear`` (any float dtype), ``Int8Linear`` and ``Int4Linear``
(packed weights are concatenated as they are: rows of ``_weight_int8pack_mm`` are independent;
``_weight_int4pack_mm_for_cpu`` packs output channels in blocks whose width depends on the CPU,
so an int4 fusion is checked once, bit for bit, against its parts and refused if it differs).
Anything else — a LoRA-wrapped projection, mixed types — is not fused: the caller keeps the
unfused path for that layer.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import nn

from ..models.quantization import Int4Linear, Int8Linear

log = logging.getLogger("llamawrapper.engine")


def _same(parts: Sequence[nn.Module], attr: str) -> bool:
    return len({getattr(p, attr) for p in parts}) == 1


def _has_bias(parts: Sequence[nn.Module]) -> Optional[bool]:
    biases = [getattr(p, "bias", None) is not None for p in parts]
    return biases[0] if len(set(biases)) == 1 else None


def fuse_linears(parts: Sequence[nn.Module]) -> Optional[nn.Module]:
    """One module computing ``cat([p(x) for p in parts], -1)``, or None when the parts cannot
    be fused. On success every part's weight becomes a view into the fused weight."""
    kind = type(parts[0])
    if any(type(p) is not kind for p in parts) or not _same(parts, "in_features"):
        return None
    bias = _has_bias(parts)
    if bias is None:
        return None
    with torch.no_grad():
        if kind is nn.Linear:
            if not _same([p.weight for p in parts], "dtype"):
                return None
            w = torch.cat([p.weight for p in parts])
            fused = nn.Linear(w.shape[1], w.shape[0], bias=bias, device="meta", dtype=w.dtype)
            fused.weight = nn.Parameter(w, requires_grad=False)
            if bias:
                fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
            _repoint(parts, fused, ("weight", "bias"), param=True)
            return fused
        if kind is Int8Linear:
            fused = Int8Linear(parts[0].in_features, sum(p.out_features for p in parts), bias)
            fused.weight = torch.cat([p.weight for p in parts])
            fused.scales = torch.cat([p.scales for p in parts])
            if bias:
                fused.bias = torch.cat([p.bias for p in parts])
            if not _agrees(parts, fused):
                return None
            _repoint(parts, fused, ("weight", "scales", "bias"))
            return fused
        if kind is Int4Linear:
            if not _same(parts, "group_size"):
                return None
            fused = Int4Linear(parts[0].in_features, sum(p.out_features for p in parts), bias, parts[0].group_size)
            fused.weight = torch.cat([p.weight for p in parts])
            fused.scales_and_zeros = torch.cat([p.scales_and_zeros for p in parts], dim=1)
            if bias:
                fused.bias = torch.cat([p.bias for p in parts])
            if not _agrees(parts, fused):
                return None
            _repoint(parts, fused, ("weight", "bias"))  # scales_and_zeros: a column slice, kept as is
            return fused
    return None


def _agrees(parts: Sequence[nn.Module], fused: nn.Module) -> bool:
    """The fused kernel gives, bit for bit, what the parts give (packed layouts are CPU-specific)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, parts[0].in_features, generator=g)
    same = torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    if not same:
        log.info("not fusing %s projections: the packed layout does not concatenate on this CPU", type(fused).__name__)
    return same


def _repoint(parts: Sequence[nn.Module], fused: nn.Module, names: tuple[str, ...], param: bool = False) -> None:
    """Make each part's tensors views of the fused module's rows (one copy of the weights)."""
    start = 0
    for p in parts:
        n = p.out_features
        for name in names:
            t = getattr(fused, name, None)
            if t is None:
                continue
            view = t[start : start + n]
            setattr(p, name, nn.Parameter(view, requires_grad=False) if param else view)
        start += n
