"""A zipped Hugging Face folder (the ``minilm`` alias's ``model.zip``) extracted once into the
cache, the way a GGUF file is converted once: under a temporary name renamed into place, with a
``manifest.json`` that records the zip's sha256. A later call reuses the folder while the hash
matches and extracts again when the zip changed."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path, PurePosixPath

from ..errors import InvalidModelError
from ..models.loading import cached_build
from ..models.registry import ModelSource

log = logging.getLogger("llamawrapper.tasks")


def extract_zip(source: ModelSource, progress: bool = True, force: bool = False) -> Path:
    """The cache folder holding ``source``'s zip extracted (extracting it if needed)."""

    def build(tmp: Path, bar: object) -> dict:
        files = _extract(source.path, tmp)
        return {"architecture": _model_type(tmp), "files": files}

    return cached_build(source, build, "extraction", progress, force)


def _extract(zip_path: Path, out: Path) -> list[str]:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            for name in names:  # refuse members that would land outside the folder
                parts = PurePosixPath(name).parts
                if name.startswith("/") or ".." in parts:
                    raise InvalidModelError(f"{zip_path} holds an unsafe path: {name!r}.")
            out.mkdir(parents=True)
            zf.extractall(out)
    except zipfile.BadZipFile as exc:
        raise InvalidModelError(f"{zip_path} is not a readable zip file: {exc}") from exc
    if not (out / "config.json").is_file():
        raise InvalidModelError(f"{zip_path} does not hold a Hugging Face model folder (no config.json).")
    return sorted(names)


def _model_type(folder: Path) -> str:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type", "?")
    except (OSError, ValueError):
        return "?"
