"""A zipped Hugging Face folder (the ``minilm`` alias's ``model.zip``) extracted once into the
cache, the way a GGUF file is converted once: under a temporary name renamed into place, with a
``manifest.json`` that records the zip's sha256. A later call reuses the folder while the hash
matches and extracts again when the zip changed."""

from __future__ import annotations

import json
import logging
import zipfile
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from ..errors import InvalidModelError
from ..models.cachefs import atomic_folder
from ..models.loading import MANIFEST_VERSION, _progress, file_sha256, read_manifest
from ..models.registry import ModelSource, cache_dir_for

log = logging.getLogger("llamawrapper.tasks")


def extract_zip(source: ModelSource, progress: bool = True, force: bool = False) -> Path:
    """The cache folder holding ``source``'s zip extracted (extracting it if needed)."""
    from filelock import FileLock

    zip_path = source.path
    assert zip_path is not None
    dest = cache_dir_for(source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _progress(progress) as bar, FileLock(str(dest) + ".lock"):
        sha = file_sha256(zip_path, bar)
        manifest = read_manifest(dest)
        if not force and manifest and manifest.get("source_sha256") == sha and (dest / "config.json").is_file():
            return dest
        if manifest and not force:
            log.warning("cached extraction of %s does not match the zip (hash changed); extracting again", zip_path)
        with atomic_folder(dest) as tmp:
            files = _extract(zip_path, tmp)
            (tmp / "manifest.json").write_text(json.dumps({
                "manifest_version": MANIFEST_VERSION, "name": source.display_name, "source": str(zip_path),
                "source_sha256": sha, "source_size": zip_path.stat().st_size, "architecture": _model_type(tmp),
                "dtype": "float32", "files": files, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }, indent=2))
    return dest


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
