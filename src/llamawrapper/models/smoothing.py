"""Activation smoothing for ``w8a8`` (SmoothQuant, Xiao et al., 2023): per-input-channel factors
that move the activations' outliers into the weights before both are quantized to int8.

A few input channels of a Linear carry activations far larger than the rest; with one int8
scale per token they leave the other channels only a few levels. Dividing channel ``j`` of the
input by ``s_j`` and multiplying column ``j`` of the weight by it gives the same product, with
``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`` balancing the two ranges. The maxima come from
one float forward over a short built-in text (``data/calibration.txt``); Linears that read the
same input (q/k/v, gate/up) share one set of factors, so they can still run fused.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

log = logging.getLogger("llamawrapper.quantization")

SMOOTHING_ALPHA = 0.5  # SmoothQuant's default; on smollm2 0.3 scored the same perplexity and one gate answer worse


def _calibration_text() -> str:
    return (Path(__file__).resolve().parent.parent / "data" / "calibration.txt").read_text(encoding="utf-8")


def smoothing_key() -> str:
    """What smoothed weights depend on besides the model: kept in the quantized cache's manifest,
    so a new alpha or calibration text quantizes again."""
    digest = hashlib.sha256(_calibration_text().encode()).hexdigest()[:16]
    return f"alpha={SMOOTHING_ALPHA};text={digest}"


def calibration_ids(folder: Path) -> Optional[torch.Tensor]:
    """The built-in calibration text as token ids [1, n] with the model's own tokenizer, or None
    when the folder has no tokenizer (the model is then quantized without smoothing)."""
    from transformers import AutoTokenizer

    text = _calibration_text()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure: quantize unsmoothed rather than not at all
        log.warning("w8a8 without activation smoothing: no usable tokenizer in %s (%s)", folder, exc)
        return None
    return torch.tensor([tokenizer(text)["input_ids"]])


def smoothing_factors(model: nn.Module, targets: list[tuple[nn.Module, str, nn.Linear]], ids: torch.Tensor,
                      alpha: Optional[float] = None) -> dict[nn.Linear, torch.Tensor]:
    """``1 / s`` per input channel for every Linear of ``targets`` ((parent, name, linear)), from
    the activations ``model`` feeds them on ``ids``: the input is multiplied by it at run time
    and the weight divided by it before quantizing. ``alpha`` defaults to ``SMOOTHING_ALPHA``."""
    alpha = SMOOTHING_ALPHA if alpha is None else alpha
    maxima: dict[nn.Linear, torch.Tensor] = {}
    shared: dict[tuple, list[nn.Linear]] = {}
    parent_of = {id(linear): parent for parent, _, linear in targets}

    def record(linear: nn.Module, inputs: tuple, _out: torch.Tensor) -> None:
        x = inputs[0].detach()
        amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        maxima[linear] = torch.maximum(maxima[linear], amax) if linear in maxima else amax
        group = shared.setdefault((id(parent_of[id(linear)]), x.data_ptr(), tuple(x.shape)), [])
        if linear not in group:
            group.append(linear)

    hooks = [linear.register_forward_hook(record) for _, _, linear in targets]
    try:
        with torch.inference_mode():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    factors: dict[nn.Linear, torch.Tensor] = {}
    for group in shared.values():
        if any(linear in factors for linear in group):
            continue
        amax = torch.stack([maxima[linear] for linear in group]).amax(dim=0)
        wmax = torch.cat([linear.weight.detach().float().abs() for linear in group]).amax(dim=0)
        s = (amax.clamp(min=1e-5) ** alpha / wmax.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        for linear in group:
            factors[linear] = 1.0 / s
    return factors
