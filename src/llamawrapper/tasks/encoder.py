"""Sentence embeddings from an encoder folder (BERT and relatives): tokenizer + ``AutoModel``,
the pooling its sentence-transformers config names (mean by default; CLS, max or
mean-sqrt-len when configured), L2-normalized, computed in micro-batches on the executor.

Texts are tokenized on the caller's thread when they are submitted (one fast-tokenizer call per
request), so the batcher orders a request's texts by token count, not characters: on the
benchmark's 320 texts that pads 4,960 tokens instead of 5,856 (sentence-transformers sorts by
characters), and the executor thread only pads and runs the model.

The encoder also classifies by label similarity (``zero_shot.py``): that is how the default
``minilm`` answers sentiment and zero-shot requests."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional

from ..errors import InvalidModelError
from .base import TaskModel, quiet_loading, as_texts, then
from .batching import MicroBatcher
from .kinds import read_json

log = logging.getLogger("llamawrapper.tasks")

POOLING_MODES = ("cls", "max", "mean_sqrt_len", "mean")
_POOLING_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
                 "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens", "mean": "pooling_mode_mean_tokens"}


def pooling_config(folder: Path) -> tuple[str, Optional[int]]:
    """(pooling mode, max sequence length) from a sentence-transformers folder; ("mean", None) otherwise."""
    mode, max_len = "mean", None
    modules = folder / "modules.json"
    if modules.is_file():
        for module in read_json(modules):
            if str(module.get("type", "")).endswith("Pooling"):
                cfg_path = folder / module.get("path", "") / "config.json"
                if cfg_path.is_file():
                    cfg = read_json(cfg_path)
                    mode = next((m for m in POOLING_MODES if cfg.get(_POOLING_KEYS[m])), mode)
    sbert = folder / "sentence_bert_config.json"
    if sbert.is_file():
        max_len = read_json(sbert).get("max_seq_length")
    return mode, max_len


class Encoder(TaskModel):
    """An encoder that embeds texts (``embed``) and, with ``zero_shot.py``, scores labels."""

    task = "embedding"
    capabilities = frozenset({"embed", "classify", "zero-shot"})

    def __init__(self, folder: Path, name: str, device: str = "cpu", max_batch: int = 32, window: float = 0.004,
                 pooling: Optional[str] = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.folder, self.name, self.device = Path(folder), name, device
        mode, max_len = pooling_config(self.folder)
        self.pooling = pooling or mode
        if self.pooling not in POOLING_MODES:
            raise InvalidModelError(f"Unknown pooling {self.pooling!r}; choose one of {', '.join(POOLING_MODES)}.")
        quiet_loading()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
            self.module = AutoModel.from_pretrained(self.folder, dtype=torch.float32).to(device).eval()
        except Exception as exc:
            raise InvalidModelError(f"could not load the encoder in {self.folder}: {exc}") from exc
        limit = getattr(self.module.config, "max_position_embeddings", None) or 512
        self.max_length = min(int(max_len or self.tokenizer.model_max_length or limit), int(limit))
        self.dimensions = int(self.module.config.hidden_size)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.batcher = MicroBatcher(self._forward, max_batch=max_batch, window=window, name=f"{name} embeddings", size=len)
        self._label_cache: dict[str, Any] = {}

    # -- the public calls --------------------------------------------------------------------------
    def embed_future(self, texts: list[str]) -> Future:
        """A future of ``(embeddings [n, d] float32, token counts [n])`` for ``texts``."""
        import numpy as np

        def assemble(rows: list) -> tuple:
            return np.stack([r[0] for r in rows]), [r[1] for r in rows]

        return then(self.batcher.submit(self.token_ids(texts)), assemble)

    def embed(self, inputs: Any) -> Any:
        """Normalized embeddings: one vector for a string, an ``[n, d]`` array for a list."""
        texts, single = as_texts(inputs)
        vectors, _ = self.embed_future(texts).result()
        return vectors[0] if single else vectors

    def with_labels_future(self, texts: list[str], hypotheses: list[str]) -> Future:
        """A future of ``(text vectors [n, d], hypothesis vectors [k, d], token counts)``; hypothesis
        vectors are cached (the same labels come back request after request) and embedded in the
        same batch as the texts otherwise."""
        import numpy as np

        known = {h: self._label_cache[h] for h in hypotheses if h in self._label_cache}
        missing = [h for h in dict.fromkeys(hypotheses) if h not in known]

        def split(rows: list) -> tuple:
            fresh = {h: r[0] for h, r in zip(missing, rows[len(texts):])}
            if len(self._label_cache) > 4096:
                self._label_cache.clear()
            self._label_cache.update(fresh)
            labels = np.stack([{**known, **fresh}[h] for h in hypotheses])
            return np.stack([r[0] for r in rows[:len(texts)]]), labels, [r[1] for r in rows[:len(texts)]]

        return then(self.batcher.submit(self.token_ids(list(texts) + missing)), split)

    def scores_future(self, texts: list[str], function_to_apply: Optional[str] = None) -> Future:
        """Sentiment by prototype similarity (``zero_shot.sentiment_future``)."""
        from .zero_shot import sentiment_future

        return sentiment_future(self, texts)

    def zero_shot_future(self, texts: list[str], labels: list[str], multi_label: bool = False,
                         hypothesis_template: Optional[str] = None) -> Future:
        """Zero-shot by hypothesis similarity (``zero_shot.zero_shot_future``)."""
        from .zero_shot import DEFAULT_TEMPLATE, zero_shot_future

        return zero_shot_future(self, texts, labels, multi_label, hypothesis_template or DEFAULT_TEMPLATE)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, truncated to ``max_length`` (special tokens included)."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]

    def count_tokens(self, texts: list[str]) -> int:
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        return sum(len(ids) for ids in enc["input_ids"])

    def batchers(self) -> list[Any]:
        return [self.batcher]

    def close(self) -> None:
        self.batcher.close()

    # -- the executor thread ------------------------------------------------------------------------
    def _forward(self, ids: list[list[int]]) -> list[tuple[Any, int]]:
        """Embed token-id rows: padded to the longest (on the tokenizer's padding side), one forward."""
        import torch

        longest = max(len(row) for row in ids)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        padded, mask = [], []
        for row in ids:
            fill = longest - len(row)
            padded.append([self.pad_id] * fill + row if left else row + [self.pad_id] * fill)
            mask.append([0] * fill + [1] * len(row) if left else [1] * len(row) + [0] * fill)
        input_ids = torch.tensor(padded, dtype=torch.long, device=self.device)
        attention_mask = torch.tensor(mask, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            hidden = self.module(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [n, seq, d]
            pooled = pool(hidden, attention_mask, self.pooling)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        vectors = pooled.float().cpu().numpy()
        return [(vectors[i], len(row)) for i, row in enumerate(ids)]


def pool(hidden: Any, mask: Any, mode: str) -> Any:
    """Pool token states ``[n, seq, d]`` into sentence vectors ``[n, d]`` over the unmasked tokens."""
    import torch

    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    summed = (hidden * m).sum(dim=1)
    counts = m.sum(dim=1).clamp(min=1e-9)
    return summed / (counts.sqrt() if mode == "mean_sqrt_len" else counts)
