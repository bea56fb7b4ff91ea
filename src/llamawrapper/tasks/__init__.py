"""Task pipelines beside chat: sentiment and text classification, zero-shot classification,
sentence embeddings, classifiers fitted from examples, text-to-image.

    from llamawrapper import pipeline
    pipeline("sentiment-analysis")("I love it")          # [{'label': 'POSITIVE', 'score': 0.9...}]

Modules, one job each: ``pipelines`` (task names, defaults, ``pipeline``, ``load_served``),
``kinds`` (what a folder is), ``extract`` (the ``minilm`` zip into the cache), ``batching``
(the micro-batching executor worker), ``encoder`` (embeddings), ``zero_shot`` (label similarity),
``classifier`` (classification heads and NLI zero-shot), ``examples`` (logistic regression on
embeddings), ``images`` (diffusers). Importing this package does not import torch."""

from .kinds import NotAChatModelError, refuse_task_model
from .pipelines import TASKS, load_served, pipeline

__all__ = ["pipeline", "load_served", "TASKS", "NotAChatModelError", "refuse_task_model"]
