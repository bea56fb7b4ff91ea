"""Classifiers from examples: scikit-learn's logistic regression fitted on sentence embeddings.

``ExamplesClassifier.fit(encoder, [(text, label), ...])`` embeds the texts with an encoder
(``minilm`` by default) and fits ``LogisticRegression``; ``save(folder)`` writes
``classifier.json`` (the encoder's source, the classes, the weights; plain JSON, no pickle) and
``pipeline("text-classification", model=folder)`` loads it back. Prediction is the regression's
own formula (softmax of ``X @ coef.T + intercept``, or the logistic of it for two classes), so a
saved classifier needs scikit-learn only to be fitted, not to run."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import Future
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import InvalidModelError, InvalidRequestError
from .base import TaskModel, sigmoid, softmax, then
from .zero_shot import ranked

FORMAT = "llamawrapper-examples-classifier"
VERSION = 1


class ExamplesClassifier(TaskModel):
    """Logistic regression over an encoder's embeddings."""

    task = "classification"
    capabilities = frozenset({"classify"})

    def __init__(self, encoder: Any, encoder_source: str, classes: list[str], coef: Any, intercept: Any,
                 name: str = "examples-classifier", info: Optional[dict] = None) -> None:
        import numpy as np

        self.encoder, self.encoder_source, self.name = encoder, encoder_source, name
        self.classes = list(classes)
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = np.asarray(intercept, dtype=np.float64)
        self.info = dict(info or {})

    @classmethod
    def fit(cls, encoder: Any, encoder_source: str, examples: Sequence[Any], C: float = 10.0,
            max_iter: int = 2000) -> "ExamplesClassifier":
        """Fit on ``examples``: ``(text, label)`` pairs (or ``{"text", "label"}`` dicts)."""
        try:
            from sklearn.linear_model import LogisticRegression
        except ImportError as exc:  # pragma: no cover - an install without the tasks extra
            raise InvalidRequestError("Classifiers from examples need scikit-learn: pip install scikit-learn.",
                                      param="examples") from exc
        texts, labels = _split_examples(examples)
        vectors, _ = encoder.embed_future(texts).result()
        model = LogisticRegression(C=C, max_iter=max_iter)
        model.fit(vectors, labels)
        info = {"n_examples": len(texts), "per_label": dict(Counter(labels)), "C": C,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        return cls(encoder, encoder_source, [str(c) for c in model.classes_], model.coef_, model.intercept_,
                   name=f"classifier-on-{encoder.name}", info=info)

    def probabilities(self, vectors: Any) -> Any:
        """Class probabilities ``[n, classes]`` for embeddings ``[n, d]`` (as ``predict_proba``)."""
        import numpy as np

        z = np.asarray(vectors, dtype=np.float64) @ self.coef.T + self.intercept
        if len(self.classes) == 2:  # binary regression: one weight row for the second class
            p = sigmoid(z[:, 0])
            return np.stack([1 - p, p], axis=1)
        return softmax(z, axis=-1)

    def scores_future(self, texts: list[str], function_to_apply: Optional[str] = None) -> Future:
        """A future of ``[{"label", "score"}, ...]`` (every class, best first) per text."""

        def finish(parts: tuple) -> list[list[dict]]:
            probs = self.probabilities(parts[0])
            return [[{"label": n, "score": s} for n, s in zip(*ranked(self.classes, row))] for row in probs]

        return then(self.encoder.embed_future(texts), finish)

    def save(self, folder: Any) -> Path:
        """Write ``classifier.json`` into ``folder`` (created if needed); returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, "version": VERSION, "encoder": self.encoder_source, "classes": self.classes,
                "coef": self.coef.tolist(), "intercept": self.intercept.tolist(), "info": self.info}
        tmp = folder / "classifier.json.tmp"
        tmp.write_text(json.dumps(data))
        tmp.replace(folder / "classifier.json")
        return folder

    @staticmethod
    def read(folder: Path) -> dict:
        """The saved fields (checked); ``InvalidModelError`` for anything else."""
        try:
            data = json.loads((Path(folder) / "classifier.json").read_text())
        except (OSError, ValueError) as exc:
            raise InvalidModelError(f"{folder}/classifier.json is not readable: {exc}") from exc
        if data.get("format") != FORMAT or not isinstance(data.get("classes"), list) or "coef" not in data:
            raise InvalidModelError(f"{folder}/classifier.json is not a classifier saved by LlamaWrapper.")
        return data

    def batchers(self) -> list[Any]:
        return self.encoder.batchers()

    def close(self) -> None:
        self.encoder.close()


def _split_examples(examples: Sequence[Any]) -> tuple[list[str], list[str]]:
    if not isinstance(examples, (list, tuple)) or not examples:
        raise InvalidRequestError("'examples' must be a non-empty list of (text, label) pairs.", param="examples")
    texts, labels = [], []
    for i, ex in enumerate(examples):
        text, label = (ex.get("text"), ex.get("label")) if isinstance(ex, dict) else (tuple(ex) + (None, None))[:2]
        if not isinstance(text, str) or label is None:
            raise InvalidRequestError(f"examples[{i}] must be a (text, label) pair with a string text.", param="examples")
        texts.append(text)
        labels.append(str(label))
    counts = Counter(labels)
    if len(counts) < 2:
        raise InvalidRequestError("'examples' need at least two different labels.", param="examples")
    if min(counts.values()) < 2:
        rare = ", ".join(k for k, v in counts.items() if v < 2)
        raise InvalidRequestError(f"Give at least two examples per label (too few for: {rare}).", param="examples")
    return texts, labels
