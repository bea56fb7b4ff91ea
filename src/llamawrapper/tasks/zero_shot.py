"""Classification by label similarity on a sentence encoder (how ``minilm`` does zero-shot and
sentiment without any classification head).

Zero-shot: each candidate label becomes a hypothesis (``hypothesis_template.format(label)``,
"This example is {}." by default, as in transformers); text and hypotheses are embedded in one
batch and the cosine similarities are calibrated into scores: a softmax over the labels at
temperature ``TEMPERATURE`` (single label), or a logistic curve centred on ``MULTI_LABEL_CENTER``
for each label on its own (``multi_label=True``).

Sentiment: each of POSITIVE / NEGATIVE is described by a few short prototype sentences; a
label's similarity is the mean over its prototypes, then the same softmax. The prototypes and
constants were written before the benchmark sentences (bench/data) and not fitted to them;
docs/TASKS.md gives the accuracy they reach."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from .base import softmax, sigmoid, then

DEFAULT_TEMPLATE = "This example is {}."
TEMPERATURE = 0.05  # cosine gaps of ~0.05 between labels become a factor e in probability
MULTI_LABEL_CENTER = 0.25  # a cosine of 0.25 to a hypothesis means "as likely as not"

SENTIMENT_PROTOTYPES: dict[str, list[str]] = {
    "NEGATIVE": [
        "This is bad.",
        "I am disappointed and unhappy with it.",
        "Terrible, awful, a waste of money and time.",
        "I hated it and would not recommend it.",
        "It broke, failed and did not work.",
    ],
    "POSITIVE": [
        "This is good.",
        "I am delighted and happy with it.",
        "Excellent, wonderful, worth every penny.",
        "I loved it and would recommend it.",
        "It works perfectly and exceeded my expectations.",
    ],
}


def label_scores(text_vectors: Any, label_vectors: Any, multi_label: bool) -> Any:
    """Calibrated scores ``[n, k]`` from normalized text and label vectors."""
    sims = text_vectors @ label_vectors.T
    if multi_label:
        return sigmoid((sims - MULTI_LABEL_CENTER) / TEMPERATURE)
    return softmax(sims / TEMPERATURE, axis=-1)


def ranked(labels: list[str], scores: Any) -> tuple[list[str], list[float]]:
    """Labels and scores sorted by score, highest first (stable for ties)."""
    order = sorted(range(len(labels)), key=lambda i: -float(scores[i]))
    return [labels[i] for i in order], [float(scores[i]) for i in order]


def zero_shot_future(encoder: Any, texts: list[str], labels: list[str], multi_label: bool = False,
                     hypothesis_template: str = DEFAULT_TEMPLATE) -> Future:
    """A future of one ``{"sequence", "labels", "scores"}`` per text."""
    hypotheses = [hypothesis_template.format(label) for label in labels]

    def finish(parts: tuple) -> list[dict]:
        text_vectors, label_vectors, _ = parts
        scores = label_scores(text_vectors, label_vectors, multi_label or len(labels) == 1)
        out = []
        for text, row in zip(texts, scores):
            names, values = ranked(labels, row)
            out.append({"sequence": text, "labels": names, "scores": values})
        return out

    return then(encoder.with_labels_future(texts, hypotheses), finish)


def sentiment_future(encoder: Any, texts: list[str]) -> Future:
    """A future of ``[{"label", "score"}, ...]`` (every label, best first) per text."""
    names = list(SENTIMENT_PROTOTYPES)
    prototypes = [p for name in names for p in SENTIMENT_PROTOTYPES[name]]

    def finish(parts: tuple) -> list[list[dict]]:
        import numpy as np

        text_vectors, proto_vectors, _ = parts
        sims = text_vectors @ proto_vectors.T
        start, per_label = 0, []
        for name in names:
            k = len(SENTIMENT_PROTOTYPES[name])
            per_label.append(sims[:, start:start + k].mean(axis=1))
            start += k
        scores = softmax(np.stack(per_label, axis=1) / TEMPERATURE, axis=-1)
        return [[{"label": n, "score": s} for n, s in zip(*ranked(names, row))] for row in scores]

    return then(encoder.with_labels_future(texts, prototypes), finish)
