"""A Hugging Face folder with a sequence-classification head: text classification (sentiment
and the like) and, when its labels include "entailment", zero-shot classification the way
transformers' NLI pipeline does it.

Scores follow ``transformers.pipeline``: softmax over the labels (sigmoid when the model has one
label or is multi-label). Zero-shot pairs the text with one hypothesis per label, truncating only
the text; with one label or ``multi_label`` each label's score is the softmax of its
(contradiction, entailment) logits, otherwise the softmax of the entailment logits over the labels.
Forward passes are micro-batched on the executor like embeddings."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional

from ..errors import InvalidModelError, InvalidRequestError
from .base import TaskModel, quiet_loading, softmax, sigmoid, then
from .batching import MicroBatcher
from .kinds import entailment_id
from .zero_shot import DEFAULT_TEMPLATE, ranked


class SequenceClassifier(TaskModel):
    """``AutoModelForSequenceClassification`` behind a micro-batcher."""

    def __init__(self, folder: Path, name: str, device: str = "cpu", max_batch: int = 32, window: float = 0.004) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.folder, self.name, self.device = Path(folder), name, device
        quiet_loading()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
            self.module = AutoModelForSequenceClassification.from_pretrained(self.folder, dtype=torch.float32).to(device).eval()
        except Exception as exc:
            raise InvalidModelError(f"could not load the classifier in {self.folder}: {exc}") from exc
        config = self.module.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self.entailment_id = entailment_id(config.to_dict())
        self.multi_label_head = config.problem_type == "multi_label_classification" or config.num_labels == 1
        self.task = "zero-shot-classification" if self.entailment_id >= 0 else "classification"
        self.capabilities = frozenset({"classify", "zero-shot"} if self.entailment_id >= 0 else {"classify"})
        self.max_length = min(int(self.tokenizer.model_max_length or 512), int(getattr(config, "max_position_embeddings", 512) or 512))
        self.batcher = MicroBatcher(self._forward, max_batch=max_batch, window=window, name=f"{name} classifier")
        # (text, hypothesis) pairs batch apart from plain texts: one forward takes one kind of input
        self.pair_batcher = MicroBatcher(self._forward, max_batch=max_batch, window=window, name=f"{name} zero-shot")

    # -- text classification --------------------------------------------------------------------------
    def scores_future(self, texts: list[str], function_to_apply: Optional[str] = None) -> Future:
        """A future of ``[{"label", "score"}, ...]`` (every label, best first) per text."""
        how = function_to_apply or ("sigmoid" if self.multi_label_head else "softmax")
        if how not in ("softmax", "sigmoid", "none"):
            raise InvalidRequestError(f"function_to_apply must be softmax, sigmoid or none, got {how!r}.", param="function_to_apply")

        def finish(rows: list) -> list[list[dict]]:
            import numpy as np

            logits = np.stack(rows)
            probs = softmax(logits) if how == "softmax" else sigmoid(logits) if how == "sigmoid" else logits
            return [[{"label": n, "score": s} for n, s in zip(*ranked(self.labels, row))] for row in probs]

        return then(self.batcher.submit(texts), finish)

    # -- zero-shot (NLI) -------------------------------------------------------------------------------
    def zero_shot_future(self, texts: list[str], labels: list[str], multi_label: bool = False,
                         hypothesis_template: str = DEFAULT_TEMPLATE) -> Future:
        """A future of one ``{"sequence", "labels", "scores"}`` per text."""
        if self.entailment_id < 0:
            raise InvalidModelError(
                f"'{self.name}' has no 'entailment' label (labels: {', '.join(self.labels)}): zero-shot classification "
                "needs an NLI model (labels entailment/neutral/contradiction) or a sentence encoder such as 'minilm'.")
        pairs = [(text, hypothesis_template.format(label)) for text in texts for label in labels]
        entail = self.entailment_id
        contra = -1 if entail == 0 else 0

        def finish(rows: list) -> list[dict]:
            import numpy as np

            logits = np.stack(rows).reshape(len(texts), len(labels), -1)
            if multi_label or len(labels) == 1:
                scores = softmax(logits[..., [contra, entail]])[..., 1]
            else:
                scores = softmax(logits[..., entail], axis=-1)
            out = []
            for text, row in zip(texts, scores):
                names, values = ranked(labels, row)
                out.append({"sequence": text, "labels": names, "scores": values})
            return out

        return then(self.pair_batcher.submit(pairs), finish)

    def batchers(self) -> list[Any]:
        return [self.batcher, self.pair_batcher]

    def close(self) -> None:
        self.batcher.close()
        self.pair_batcher.close()

    # -- the executor thread ----------------------------------------------------------------------------
    def _forward(self, items: list[Any]) -> list[Any]:
        import torch

        if isinstance(items[0], tuple):  # (premise, hypothesis): truncate the premise only
            enc = self.tokenizer([a for a, _ in items], [b for _, b in items], padding=True, truncation="only_first",
                                 max_length=self.max_length, return_tensors="pt")
        else:
            enc = self.tokenizer(items, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode():
            logits = self.module(**enc).logits.float().cpu().numpy()
        return list(logits)
