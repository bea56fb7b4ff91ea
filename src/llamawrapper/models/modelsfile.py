"""The models file: a TOML file that pins what a server serves, one table per name.

    [chat]
    source = "smollm2"              # alias, folder, .gguf file or hub id
    revision = "main"               # optional, hub ids
    sha256 = "6a1f..."              # optional pin: a differing source is refused
    dtype = "float32"               # optional, also quantization, [chat.overrides], [chat.adapters]
    keep_alive = 300                # optional, seconds idle before unloading
    traffic = 1.0                   # optional

``llamawrapper models lock FILE`` writes each table's ``sha256`` (tomlkit keeps the file's
comments and order); ``serve --models-file FILE`` serves it."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError
from .versions import SPEC_FIELDS, ModelSpec, source_sha256

HOST_FIELDS = ("keep_alive", "traffic")


def split_serve_spec(spec: str) -> tuple[str, ModelSpec]:
    """``serve`` arguments: ``source`` (served under the name typed) or ``name=source``."""
    name, sep, source = spec.partition("=")
    if not (sep and name and source and "/" not in name):
        name = source = spec
    return name, ModelSpec.parse({"source": source})


def _read(path: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidRequestError(f"Models file {p} does not exist.", param="models_file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequestError(f"Models file {p} is not valid TOML: {exc}", param="models_file") from exc


def read_models_file(path: str) -> list[tuple[str, ModelSpec, dict[str, Any]]]:
    """(name, spec, host options) for every table of the file."""
    entries = []
    for name, table in _read(path).items():
        if not isinstance(table, dict):
            raise InvalidRequestError(f"Models file: '{name}' must be a table ([{name}]).", param="models_file")
        spec = ModelSpec.parse({k: v for k, v in table.items() if k in SPEC_FIELDS or k not in HOST_FIELDS})
        entries.append((name, spec, {k: table[k] for k in HOST_FIELDS if k in table}))
    return entries


def lock_models_file(path: str) -> dict[str, str]:
    """Write each table's current source sha256 into the file; returns name → sha256."""
    import tomlkit

    p = Path(path).expanduser()
    entries = read_models_file(path)  # validates first
    doc = tomlkit.parse(p.read_text(encoding="utf-8"))
    locked: dict[str, str] = {}
    for name, spec, _ in entries:
        sha = source_sha256(spec.location)
        if sha is None:
            raise InvalidRequestError(f"'{name}': a hub source is pinned by its revision, not a file hash.", param="sha256")
        doc[name]["sha256"] = sha
        locked[name] = sha
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(tomlkit.dumps(doc), encoding="utf-8")
    tmp.replace(p)
    return locked
