"""What a model folder is, read from its files without loading weights:

    examples      classifier.json written by ``ExamplesClassifier.save`` (embeddings + logistic regression)
    diffusers     model_index.json (a diffusers pipeline)
    nli           a sequence-classification head whose labels include "entailment"
    classifier    any other sequence-classification head
    chat          a causal LM (``LlamaWrapper`` serves it)
    encoder       a sentence-transformers folder or a plain encoder (BERT, RoBERTa, MPNet, ...)

and where a source (alias, folder, hub id) lives on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import InvalidModelError
from ..models import registry

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "deberta", "deberta-v2", "electra",
                 "albert", "camembert", "modernbert", "nomic_bert", "e5", "xlm"}


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
