"""LoRA adapters served on one shared base model, chosen per request, mixed in one batch.

Adapter folders are read with ``peft`` (``LoraConfig`` and ``load_peft_weights``: the same files
``PeftModel.save_pretrained`` writes). Each targeted ``Linear`` of the base model is wrapped once
by ``MultiLoraLinear``, which holds every adapter's A/B pair and adds ``B(A(x)) * scaling`` only to
the rows of the batch whose request asked for that adapter. The engine tells the runner, before
each forward, the namespace of every row; a request's adapter is carried in that namespace
(``adapter:NAME``), which also keeps its prefix-cache entries apart from other adapters'.

Over HTTP an adapter is picked with the model name ``base:adapter`` (``split_model_name``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import InvalidModelError, InvalidRequestError

log = logging.getLogger("llamawrapper.adapters")

NAMESPACE_PREFIX = "adapter:"
_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*$")


def namespace_for(adapter: Optional[str]) -> str:
    """The engine namespace of requests for ``adapter`` ('' for the base model)."""
    return f"{NAMESPACE_PREFIX}{adapter}" if adapter else ""


def adapter_of(namespace: str) -> Optional[str]:
    if namespace.startswith(NAMESPACE_PREFIX):
        return namespace[len(NAMESPACE_PREFIX):].split("|", 1)[0]
    return None


def split_model_name(name: str) -> tuple[str, Optional[str]]:
    """``"smollm2:sql"`` → ``("smollm2", "sql")``; a name without an adapter part → ``(name, None)``."""
    base, sep, adapter = name.rpartition(":")
    if sep and base and _NAME.match(adapter) and not re.match(r"^[A-Za-z]$", base):
        return base, adapter
    return name, None


class RowAdapters:
    """Which adapter each row of the next forward uses; shared by all wrapped modules."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}  # adapter name -> 1-based index (0 = base model)
        self.groups: list[tuple[int, Optional[torch.Tensor]]] = []  # (adapter idx, rows or None = all)

    def bind(self, namespaces: list[str]) -> None:
        ids = [self.index.get(adapter_of(ns) or "", 0) for ns in namespaces]
        if not any(ids):
            self.groups = []
        elif len(set(ids)) == 1:
            self.groups = [(ids[0], None)]
        else:
            self.groups = [(a, torch.tensor([i for i, x in enumerate(ids) if x == a])) for a in sorted(set(ids)) if a]


class MultiLoraLinear(nn.Module):
    """``base(x)`` plus, for each adapter in the batch, ``B(A(x)) * scaling`` on its rows."""

    def __init__(self, base: nn.Module, rows: RowAdapters) -> None:
        super().__init__()
        self.base = base
        self.rows = rows
        self.lora: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def add(self, idx: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        self.lora[idx] = (a, b, scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for idx, rows in self.rows.groups:
            pair = self.lora.get(idx)
            if pair is None:
                continue
            a, b, s = pair
            if rows is None:
                y = y + (x.to(a.dtype) @ a.T @ b.T * s).to(y.dtype)
            else:
                delta = (x[rows].to(a.dtype) @ a.T @ b.T * s).to(y.dtype)
                y = y.index_add(0, rows, delta)
        return y


def _scaling(config: Any, module_path: str, r: int) -> float:
    alpha = config.lora_alpha
    for pattern, value in (getattr(config, "alpha_pattern", None) or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module_path):
            alpha = value
    return alpha / (r ** 0.5) if getattr(config, "use_rslora", False) else alpha / r


def _read(path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    if not (path / "adapter_config.json").is_file():
        raise InvalidModelError(f"{path} is not a LoRA adapter folder (no adapter_config.json).")
    try:
        config = LoraConfig.from_pretrained(str(path))
        weights = load_peft_weights(str(path), device="cpu")
    except Exception as exc:
        raise InvalidModelError(f"could not read the adapter in {path}: {exc}") from exc
    if getattr(config, "use_dora", False):
        raise InvalidModelError(f"adapter {path}: DoRA adapters are not supported.")
    if getattr(config, "modules_to_save", None):
        raise InvalidModelError(f"adapter {path}: modules_to_save (full-weight modules) are not supported.")
    if getattr(config, "bias", "none") != "none":
        raise InvalidModelError(f"adapter {path}: trained biases (bias={config.bias!r}) are not supported.")
    return config, weights


def attach(model: nn.Module, adapters: dict[str, str], dtype: torch.dtype) -> RowAdapters:
    """Read ``adapters`` (name → folder) and wrap ``model``'s targeted Linears; return the row
    router the runner binds before each forward."""
    if not isinstance(adapters, dict):
        raise InvalidRequestError("adapters must be a mapping of name -> adapter folder.", param="adapters")
    rows = RowAdapters()
    modules = dict(model.named_modules())
    for idx, (name, folder) in enumerate(adapters.items(), start=1):
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError(f"Invalid adapter name {name!r}: use letters, digits, '_', '-', '.'.", param="adapters")
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise InvalidRequestError(f"Adapter '{name}': {path} is not a folder.", param="adapters")
        config, weights = _read(path)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in weights.items():
            m = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[\w\-]+)?\.weight$", key)
            if not m:
                raise InvalidModelError(f"adapter '{name}': unsupported weight {key!r} (only LoRA on Linear layers).")
            pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
        for module_path, ab in pairs.items():
            target = modules.get(module_path)
            if target is None:
                if re.search(r"layers\.(\d+)\.", module_path):  # a layer cut away by num_hidden_layers
                    continue
                raise InvalidModelError(f"adapter '{name}' targets '{module_path}', which the model does not have.")
            if "A" not in ab or "B" not in ab:
                raise InvalidModelError(f"adapter '{name}': '{module_path}' lacks lora_A or lora_B.")
            if not isinstance(target, MultiLoraLinear):
                parent_path, _, attr = module_path.rpartition(".")
                wrapper = MultiLoraLinear(target, rows)
                setattr(modules[parent_path] if parent_path else model, attr, wrapper)
                modules[module_path] = target = wrapper
            a, b = ab["A"], ab["B"]
            target.add(idx, a.to(dtype), b.to(dtype), _scaling(config, module_path, a.shape[0]))
        rows.index[name] = idx
        log.info("adapter '%s' loaded from %s (%d modules)", name, path, len(pairs))
    return rows
