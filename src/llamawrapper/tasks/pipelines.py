"""``pipeline(task, model=None, **options)``: the task names users know from transformers, the
model kinds each accepts, the offline defaults, and ``load_served`` for the server's model host.

    task                                         model kinds                 default
    sentiment-analysis, text-classification      classifier, nli, examples,  minilm (prototype similarity)
                                                 encoder (+ examples=...)
    zero-shot-classification                     nli, encoder, chat          minilm (hypothesis similarity)
    feature-extraction, sentence-similarity      encoder                     minilm
    text-generation                              chat (LlamaWrapper)         smollm2
    text-to-image                                diffusers                   none installable: give a model
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any, Optional

from ..errors import InvalidModelError, InvalidRequestError
from . import kinds
from .base import TaskModel, as_labels, as_texts

DEFAULT_ENCODER = "minilm"
TASKS: dict[str, dict[str, Any]] = {
    "sentiment-analysis": {"kinds": ("classifier", "nli", "examples", "encoder"), "default": DEFAULT_ENCODER},
    "text-classification": {"kinds": ("classifier", "nli", "examples", "encoder"), "default": DEFAULT_ENCODER},
    "zero-shot-classification": {"kinds": ("nli", "encoder", "chat"), "default": DEFAULT_ENCODER},
    "feature-extraction": {"kinds": ("encoder",), "default": DEFAULT_ENCODER},
    "sentence-similarity": {"kinds": ("encoder",), "default": DEFAULT_ENCODER},
    "text-generation": {"kinds": ("chat",), "default": "smollm2"},
    "text-to-image": {"kinds": ("diffusers",), "default": None},
}
NEEDS = {  # what a task needs, said when a model does not fit
    "sentiment-analysis": "a sequence-classification head, a sentence encoder (e.g. 'minilm'), or a classifier saved from examples",
    "text-classification": "a sequence-classification head, a sentence encoder (e.g. 'minilm'), or a classifier saved from examples",
    "zero-shot-classification": "an NLI model (a sequence-classification head with an 'entailment' label), a sentence encoder (e.g. 'minilm') or a chat model",
    "feature-extraction": "a sentence encoder (a BERT-like model or a sentence-transformers folder, e.g. 'minilm')",
    "sentence-similarity": "a sentence encoder (a BERT-like model or a sentence-transformers folder, e.g. 'minilm')",
    "text-generation": "a chat model (a causal LM such as 'smollm2')",
    "text-to-image": "a diffusers pipeline (a folder or hub id with model_index.json)",
}
KIND_TASK = {"encoder": "embedding", "classifier": "classification", "nli": "zero-shot-classification",
             "examples": "classification", "diffusers": "text-to-image", "chat": "chat"}


def pipeline(task: str, model: Optional[str] = None, **options: Any) -> Any:
    """A callable for ``task`` on ``model`` (an alias, folder or hub id; None = the task's default).

    Options: ``device`` ("cpu"), ``max_batch`` and ``window`` (micro-batching), ``examples`` (fit a
    classifier on ``model``'s embeddings for text classification), and for text-generation the
    options of ``LlamaWrapper.load``."""
    if task not in TASKS:
        raise InvalidRequestError(f"Unknown task {task!r}; the tasks are: {', '.join(TASKS)}.", param="task")
    source = model or TASKS[task]["default"]
    if source is None:
        raise InvalidRequestError(f"The task '{task}' has no offline default model here; pass model=: {NEEDS[task]}.",
                                  param="model")
    if task == "text-generation":
        from ..api import LlamaWrapper
        from ..models import registry

        kinds.refuse_task_model(registry.resolve(source))  # an encoder or classifier: say which task runs it
        return LlamaWrapper.load(source, **options)
    examples = options.pop("examples", None)
    folder = kinds.local_folder(source, progress=options.get("progress", False))
    kind = "chat" if folder is None else kinds.kind_of(folder)
    if examples is not None:
        if task not in ("text-classification", "sentiment-analysis") or kind != "encoder":
            raise InvalidRequestError(f"examples= fits a classifier on a sentence encoder's embeddings for text-classification; "
                                      f"'{source}' is {kinds.a_model(kind)} and the task is {task}.", param="examples")
        from .examples import ExamplesClassifier

        options.pop("progress", None)
        encoder = load_task_model(folder, "encoder", _name(source), **options)
        return TextClassificationPipeline(ExamplesClassifier.fit(encoder, _portable(source), examples), task)
    if kind not in TASKS[task]["kinds"]:
        raise InvalidModelError(f"'{source}' is {kinds.a_model(KIND_TASK.get(kind, kind))}; the task '{task}' needs {NEEDS[task]}.")
    if kind == "chat":  # zero-shot by constrained choice over the labels
        from ..api import LlamaWrapper
        from .chat_choice import ChatChoice

        return ZeroShotPipeline(ChatChoice(LlamaWrapper.load(source, progress=options.pop("progress", False), **options)), task)
    options.pop("progress", None)
    loaded = load_task_model(folder, kind, _name(source), **options)
    if task in ("sentiment-analysis", "text-classification"):
        return TextClassificationPipeline(loaded, task)
    if task == "zero-shot-classification":
        return ZeroShotPipeline(loaded, task)
    if task == "text-to-image":
        return TextToImagePipeline(loaded, task)
    return EmbeddingPipeline(loaded, task)


def load_served(source: str, **options: Any) -> Optional[TaskModel]:
    """The task model ``source`` names (``minilm``, an encoder, classifier, NLI, examples-classifier
    or diffusers folder or hub id), loaded; None when it is a chat model (GGUF or causal LM), for
    ``LlamaWrapper.load`` to take."""
    _import_transformers()  # waits for a task load in progress
    folder = kinds.local_folder(source)
    if folder is None:
        return None
    try:
        kind = kinds.kind_of(folder)
    except InvalidModelError:
        return None  # not a task model; the chat loader says what it is
    if kind == "chat":
        return None
    return load_task_model(folder, kind, _name(source), **options)


# Loads of task models run one at a time, also when Python code calls ``pipeline`` from several
# threads (the server's host already loads one model at a time), and a chat model's load after
# ``load_served`` said None waits for a task load in progress. Model loading is not thread-safe:
# two threads first touching ``transformers.AutoModel``/``AutoConfig`` together failed with
# ImportError, and a diffusers pipeline loading beside a chat model left the chat model with meta
# tensors (both seen here before the host serialized its loads).
_load_lock = threading.RLock()


def _import_transformers() -> None:
    """Resolve transformers' lazy names once, under the load lock."""
    with _load_lock:
        import transformers

        for name in ("AutoConfig", "AutoTokenizer", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"):
            getattr(transformers, name)


def load_task_model(folder: Path, kind: str, name: str, **options: Any) -> TaskModel:
    """Load a folder of a known kind as its task model (one load at a time)."""
    with _load_lock:
        _import_transformers()
        return _load(folder, kind, name, **options)


def _load(folder: Path, kind: str, name: str, **options: Any) -> TaskModel:
    if kind == "encoder":
        from .encoder import Encoder

        return Encoder(folder, name, **options)
    if kind in ("classifier", "nli"):
        from .classifier import SequenceClassifier

        return SequenceClassifier(folder, name, **options)
    if kind == "examples":
        from .examples import ExamplesClassifier

        data = ExamplesClassifier.read(folder)
        encoder_folder = kinds.local_folder(data["encoder"])
        if encoder_folder is None or kinds.kind_of(encoder_folder) != "encoder":
            raise InvalidModelError(f"{folder}: the classifier's encoder '{data['encoder']}' is not a sentence encoder.")
        encoder = _load(encoder_folder, "encoder", _name(data["encoder"]), **options)
        return ExamplesClassifier(encoder, data["encoder"], data["classes"], data["coef"], data["intercept"],
                                  name=name, info=data.get("info"))
    if kind == "diffusers":
        from .images import TextToImage

        return TextToImage(folder, name, device=options.get("device"))
    raise InvalidModelError(f"{folder} is {kinds.a_model(kind)}, not a task model.")


def _name(source: str) -> str:
    from ..models import registry

    return registry.resolve(source).display_name


def _portable(source: str) -> str:
    """How a saved classifier names its encoder: the alias or hub id as given, a folder as an absolute path."""
    from ..models import registry

    resolved = registry.resolve(source)
    return str(resolved.path) if resolved.kind == "dir" else source


# -- the callables users hold ------------------------------------------------------------------------------
class _Pipeline:
    def __init__(self, model: TaskModel, task: str) -> None:
        self.model, self.task = model, task

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> "_Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} task={self.task!r} model={self.model.name!r}>"


_LEGACY = object()


class TextClassificationPipeline(_Pipeline):
    """``clf("text")`` → ``[{"label", "score"}]``; ``clf([...])`` → one dict per text; ``top_k=``
    gives that many labels per text (``None`` = all), as transformers does."""

    def __call__(self, inputs: Any, top_k: Any = _LEGACY, function_to_apply: Optional[str] = None) -> Any:
        texts, single = as_texts(inputs, "inputs")
        ranked = self.model.scores_future(texts, function_to_apply).result()
        if top_k is _LEGACY:
            best = [r[0] for r in ranked]
            return best if not single else best[:1]
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise InvalidRequestError(f"top_k must be a positive integer or None, got {top_k!r}.", param="top_k")
        cut = [r if top_k is None else r[:top_k] for r in ranked]
        return cut[0] if single else cut

    @property
    def labels(self) -> list[str]:
        return list(getattr(self.model, "classes", None) or getattr(self.model, "labels", None) or ["NEGATIVE", "POSITIVE"])

    def save(self, folder: Any) -> Path:
        """Save a classifier fitted from examples (load it back with ``pipeline(task, model=folder)``)."""
        if not hasattr(self.model, "save"):
            raise InvalidRequestError("Only a classifier fitted from examples can be saved this way.", param="model")
        return self.model.save(folder)


class ZeroShotPipeline(_Pipeline):
    """``zs(text, candidate_labels=[...], multi_label=False, hypothesis_template="This example is {}.")``
    → ``{"sequence", "labels", "scores"}`` (labels sorted by score); a list of texts gives a list."""

    def __call__(self, sequences: Any, candidate_labels: Any = None, hypothesis_template: str = "This example is {}.",
                 multi_label: bool = False) -> Any:
        texts, single = as_texts(sequences, "sequences")
        labels = as_labels(candidate_labels)
        if not isinstance(hypothesis_template, str) or "{}" not in hypothesis_template:
            raise InvalidRequestError("hypothesis_template must contain '{}' where the label goes.", param="hypothesis_template")
        out = self.model.zero_shot_future(texts, labels, bool(multi_label), hypothesis_template).result()
        return out[0] if single else out


class EmbeddingPipeline(_Pipeline):
    """``emb("text")`` → a normalized vector (numpy); ``emb([...])`` → an ``[n, d]`` array."""

    def __call__(self, inputs: Any) -> Any:
        return self.model.embed(inputs)

    encode = __call__

    @property
    def dimensions(self) -> int:
        return self.model.dimensions

    def similarity(self, a: Any, b: Any) -> Any:
        """Cosine similarity: a float for two texts, a matrix ``[len(a), len(b)]`` for lists."""
        va, vb = self.model.embed(a), self.model.embed(b)
        sims = va @ vb.T
        return float(sims) if sims.ndim == 0 else sims


class TextToImagePipeline(_Pipeline):
    """``gen(prompt, negative_prompt=, num_inference_steps=, guidance_scale=, width=, height=, seed=,
    num_images=1, progress=True)`` → a list of PIL images."""

    def __call__(self, prompt: str, negative_prompt: Optional[str] = None, num_inference_steps: int = 25,
                 guidance_scale: float = 7.5, width: Optional[int] = None, height: Optional[int] = None,
                 seed: Optional[int] = None, num_images: int = 1, progress: bool = True) -> list[Any]:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_inference_steps, desc="denoising", unit="step", file=sys.stderr)
        try:
            return self.model.generate(prompt, negative_prompt=negative_prompt, n=num_images,
                                       num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                       width=width, height=height, seed=seed,
                                       progress=(lambda step, total: bar.update(1)) if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
