"""Fused projections: one matmul for a layer's q/k/v, one for its gate/up (issue 14).

At batch 1 a decode step is ~200 small ops per layer; three projections that read the same input
cost three kernel launches and three trips through Python. ``fuse_linears`` builds one module
whose weight is the row-wise concatenation of its parts and re-points every part's weight at
its rows of that tensor, so the model's own modules (used by ``model(...)``, evaluation, and the
unfused path) keep working and no weight is stored twice.

Supported parts: plain ``nn.Linear`` (any float dtype), ``Int8Linear``, ``W8A8Linear`` and ``Int4Linear``
(packed weights are concatenated as they are: rows of ``_weight_int8pack_mm`` are independent;
``_weight_int4pack_mm_for_cpu`` packs output channels in blocks whose width depends on the CPU,
so an int4 fusion is checked once, bit for bit, against its parts and refused if it differs).
Anything else — a LoRA-wrapped projection, mixed types, w8a8 parts smoothed differently — is not fused: the caller keeps the
unfused path for that layer.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import nn

from ..models.quantization import Int4Linear, Int8Linear, W8A8Linear

log = logging.getLogger("llamawrapper.engine")


def _cat(tensors: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.cat(tensors, dim)``, except when the tensors already are consecutive slices of one
    tensor along ``dim`` (parts fused before, e.g. by the loader process, then mapped back as
    views of one storage): then that tensor, as a view, so the weights are not copied twice."""
    first = tensors[0]
    storage = first.untyped_storage()
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    if all(t.untyped_storage().data_ptr() == storage.data_ptr() and t.dtype == first.dtype for t in tensors):
        strides, acc = [], 1
        for size in reversed(shape):
            strides.insert(0, acc)
            acc *= size
        end = (first.storage_offset() + acc) * first.element_size()
        if end <= storage.nbytes():
            whole = first.new_empty(0).set_(storage, first.storage_offset(), shape, strides)
            start, same = 0, True
            for t in tensors:
                piece = whole.narrow(dim, start, t.shape[dim])
                start += t.shape[dim]
                same = same and piece.data_ptr() == t.data_ptr() and piece.stride() == t.stride() and piece.shape == t.shape
            if same:
                return whole
    return torch.cat(list(tensors), dim)


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
            w = _cat([p.weight for p in parts])
            fused = nn.Linear(w.shape[1], w.shape[0], bias=bias, device="meta", dtype=w.dtype)
            fused.weight = nn.Parameter(w, requires_grad=False)
            if bias:
                fused.bias = nn.Parameter(_cat([p.bias for p in parts]), requires_grad=False)
            _repoint(parts, fused, ("weight", "bias"), param=True)
            return fused
        if kind in (Int8Linear, W8A8Linear):  # per-row weights and scales: rows concatenate
            if kind is W8A8Linear and not all(torch.equal(p.smooth, parts[0].smooth) for p in parts):
                return None  # one input scaled one way: parts that read the same input share smoothing
            fused = kind(parts[0].in_features, sum(p.out_features for p in parts), bias)
            if kind is W8A8Linear:
                fused.smooth = parts[0].smooth
            fused.weight = _cat([p.weight for p in parts])
            fused.scales = _cat([p.scales for p in parts])
            if bias:
                fused.bias = _cat([p.bias for p in parts])
            same = _agrees(parts, fused)
            for p in parts:  # w8a8 parts packed their weights for the check; again only if used alone
                getattr(p, "drop_packed", lambda: None)()
            if not same:
                return None
            _repoint(parts, fused, ("weight", "scales", "bias"))
            return fused
        if kind is Int4Linear:
            if not _same(parts, "group_size"):
                return None
            fused = Int4Linear(parts[0].in_features, sum(p.out_features for p in parts), bias, parts[0].group_size)
            fused.weight = _cat([p.weight for p in parts])
            fused.scales_and_zeros = _cat([p.scales_and_zeros for p in parts], dim=1)
            if bias:
                fused.bias = _cat([p.bias for p in parts])
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
