"""What a model folder is, read from its files without loading weights:

    examples      classifier.json written by ``ExamplesClassifier.save`` (embeddings + logistic regression)
    diffusers     model_index.json (a diffusers pipeline)
    nli           a sequence-classification head whose labels include "entailment"
    classifier    any other sequence-classification head
    chat          a causal LM (``LlamaWrapper`` serves it)
    encoder       a sentence-transformers folder or a plain encoder (BERT, RoBERTa, MPNet, ...)

where a source (alias, folder, hub id) lives on disk, and ``refuse_task_model``: the check the
chat loader runs so that ``LlamaWrapper.load("minilm")`` says to use ``pipeline(...)`` instead of
"architecture 'bert' is not supported"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import InvalidModelError, UnsupportedModelError
from ..models import registry

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "deberta", "deberta-v2", "electra",
                 "albert", "camembert", "modernbert", "nomic_bert", "e5", "xlm"}


# the pipeline task that runs each kind of task model, and what to call it in a message
PIPELINE_TASK = {"encoder": "feature-extraction", "classifier": "text-classification", "nli": "zero-shot-classification",
                 "examples": "text-classification", "diffusers": "text-to-image"}
_WHAT = {"feature-extraction": "a sentence encoder (embeddings)", "text-classification": "a text classifier",
         "zero-shot-classification": "an NLI (zero-shot) classifier", "text-to-image": "a text-to-image pipeline"}
_ALSO = {"feature-extraction": ' (it also runs "sentiment-analysis" and "zero-shot-classification")'}


def a_model(kind: str) -> str:
    """"a chat model", "an embedding model": a kind or task in a message."""
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind} model"


class NotAChatModelError(UnsupportedModelError):
    """A task model (encoder, classifier, diffusers pipeline) given to the chat loader;
    ``task`` is the ``pipeline`` task that runs it."""

    def __init__(self, name: str, task: str) -> None:
        super().__init__(f"'{name}' is {_WHAT.get(task, 'a task model')}, not a chat model: load it with "
                         f'llamawrapper.pipeline("{task}", model="{name}"){_ALSO.get(task, "")}, '
                         f"or serve it with `llamawrapper serve {name}`.")
        self.name, self.task = name, task

    def __reduce__(self) -> tuple:  # crosses from the loader process intact
        return type(self), (self.name, self.task)


def refuse_task_model(source: "registry.ModelSource", folder: Optional[Path] = None) -> None:
    """Raise ``NotAChatModelError`` when ``source`` is a task model: a registry alias with a
    ``task``, or a folder (``source``'s own, or ``folder`` once the loader has it) that
    ``kind_of`` says is no chat model. Anything else passes (the chat loader judges it)."""
    if source.alias is not None and source.alias.task:
        raise NotAChatModelError(source.name, source.alias.task)
    folder = folder or (source.path if source.kind == "dir" else None)
    if folder is None:
        return
    try:
        kind = kind_of(folder)
    except InvalidModelError:
        return
    if kind in PIPELINE_TASK:
        raise NotAChatModelError(source.name, PIPELINE_TASK[kind])


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"{path} is not readable JSON: {exc}") from exc


def entailment_id(config: dict) -> int:
    """The id of the label that starts with "entail" (as transformers' zero-shot pipeline finds it), or -1."""
    for label, idx in (config.get("label2id") or {}).items():
        if str(label).lower().startswith("entail"):
            return int(idx)
    for idx, label in (config.get("id2label") or {}).items():
        if str(label).lower().startswith("entail"):
            return int(idx)
    return -1


def kind_of(folder: Path) -> str:
    """One of the kinds above; ``InvalidModelError`` when the folder is none of them."""
    if (folder / "classifier.json").is_file():
        return "examples"
    if (folder / "model_index.json").is_file():
        return "diffusers"
    if not (folder / "config.json").is_file():
        raise InvalidModelError(f"{folder} is not a Hugging Face model folder (no config.json or model_index.json).")
    config = read_json(folder / "config.json")
    archs = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "nli" if entailment_id(config) >= 0 else "classifier"
    if any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in archs):
        return "chat"
    if (folder / "modules.json").is_file() or config.get("model_type") in ENCODER_TYPES:
        return "encoder"
    raise InvalidModelError(f"{folder}: a '{config.get('model_type')}' model ({', '.join(archs) or 'no architectures'}) "
                            "is not a chat, encoder, sequence-classification or diffusers model.")


def local_folder(name: str, progress: bool = False) -> Optional[Path]:
    """The folder for ``name``, or None when it is a GGUF chat model (``LlamaWrapper`` loads those).
    Hub ids are fetched (an offline machine gets a ``ModelNotFoundError`` saying so)."""
    from ..models.loading import resolve_folder

    source = registry.resolve(name)
    if source.kind == "gguf":
        return None
    if source.kind == "hub":
        return _hub_snapshot_with_subfolders(source)
    if source.kind == "dir":  # a diffusers folder has model_index.json, not config.json: kind_of decides
        return source.path
    return resolve_folder(source, progress=progress)


def _hub_snapshot_with_subfolders(source: registry.ModelSource) -> Path:
    """Like the chat loader's hub download, but diffusers pipelines keep weights in subfolders."""
    from ..models.loading import HUB_PATTERNS, hub_snapshot

    return hub_snapshot(source, HUB_PATTERNS + ["*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model"])
