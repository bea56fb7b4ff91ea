"""Model versions: what a version is made of (``ModelSpec``), its state in the host
(``Version``), and the source hash a pin is checked against.

A model *name* (what requests say in ``model``) has one or more versions, numbered ``v1``,
``v2``, ... in the order they were put. A version's spec says where its weights come from and
how they are loaded; two versions of one name may differ in any of it."""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import InvalidRequestError, ModelHashMismatchError

STATUSES = ("loading", "ready", "draining", "unloaded", "failed")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = (None, "int8", "int4", "w8a8")
SPEC_FIELDS = ("source", "revision", "sha256", "dtype", "quantization", "adapters", "overrides")


@dataclass
class ModelSpec:
    """Where a version's weights come from and how they are loaded."""

    source: str
    revision: Optional[str] = None
    sha256: Optional[str] = None
    dtype: Optional[str] = None
    quantization: Optional[str] = None
    adapters: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: dict[str, Any]) -> "ModelSpec":
        """A spec from a request body or a models-file table; bad fields name themselves."""
        if not isinstance(data, dict):
            raise InvalidRequestError("A model spec must be an object.", param="source")
        unknown = sorted(set(data) - set(SPEC_FIELDS))
        if unknown:
            raise InvalidRequestError(f"Unknown model field '{unknown[0]}'; known: {', '.join(SPEC_FIELDS)}.", param=unknown[0])
        source = data.get("source")
        if not isinstance(source, str) or not source.strip():
            raise InvalidRequestError("'source' must be a non-empty string (alias, folder, .gguf file or hub id).", param="source")
        for key in ("revision", "sha256", "dtype", "quantization"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise InvalidRequestError(f"'{key}' must be a string.", param=key)
        if data.get("dtype") not in (None, *DTYPES):
            raise InvalidRequestError(f"Invalid dtype {data['dtype']!r}; choose one of {', '.join(DTYPES)}.", param="dtype")
        if data.get("quantization") not in QUANTIZATIONS:
            raise InvalidRequestError(f"Invalid quantization {data['quantization']!r}; choose int8, int4 or w8a8.", param="quantization")
        sha = data.get("sha256")
        if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower())):
            raise InvalidRequestError("'sha256' must be 64 hexadecimal digits.", param="sha256")
        for key in ("adapters", "overrides"):
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise InvalidRequestError(f"'{key}' must be an object.", param=key)
        return cls(source=source.strip(), revision=data.get("revision"), sha256=sha.lower() if sha else None,
                   dtype=data.get("dtype"), quantization=data.get("quantization"),
                   adapters=dict(data.get("adapters") or {}), overrides=dict(data.get("overrides") or {}))

    @property
    def location(self) -> str:
        """What the registry resolves: the source, with ``@revision`` for a hub id."""
        return f"{self.source}@{self.revision}" if self.revision and "@" not in self.source else self.source

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, [])}


@dataclass
class Version:
    """One version of a name inside the host."""

    name: str
    version: str
    spec: ModelSpec
    status: str = "loading"
    error: Optional[str] = None
    traffic: float = 0.0
    role: Optional[str] = None  # what it becomes once loaded: "active", "canary", or None (pinned use only)
    model: Any = None  # a LlamaWrapper, or a task model
    sha256: Optional[str] = None
    created_at: float = field(default_factory=time.time)
    loaded_at: Optional[float] = None
    last_used: float = field(default_factory=time.monotonic)
    leases: int = 0
    memory_bytes: int = 0

    @property
    def in_flight(self) -> int:
        """Requests this version holds: leased and not yet handed over, queued or running."""
        engine = getattr(self.model, "engine", None)
        held = getattr(engine, "in_flight", None) if engine is not None else getattr(self.model, "in_flight", None)
        return self.leases + (held or 0)

    def info(self) -> dict[str, Any]:
        # what a loaded chat model runs with, the server's defaults (serve --quantization/--dtype) included
        dtype, quantization = getattr(self.model, "runs_as", (None, None))
        return {
            "version": self.version, "status": self.status, "error": self.error, "traffic": round(self.traffic, 4),
            "source": self.spec.source, "revision": self.spec.revision, "sha256": self.sha256 or self.spec.sha256,
            "dtype": dtype or self.spec.dtype or "float32", "quantization": quantization or self.spec.quantization,
            "adapters": dict(self.spec.adapters), "overrides": dict(self.spec.overrides),
            "task": getattr(self.model, "task", "chat") if self.model is not None else None,
            "created_at": int(self.created_at), "loaded_at": int(self.loaded_at) if self.loaded_at else None,
            "memory_bytes": self.memory_bytes, "in_flight": self.in_flight,
        }


def source_sha256(location: str) -> Optional[str]:
    """The sha256 a pin is checked against: the file's for a ``.gguf``, a digest over the weight
    and config files for a folder, None for a hub id (checked after download)."""
    from . import registry
    from .loading import file_sha256

    source = registry.resolve(location)
    if source.kind == "gguf" and source.path is not None:
        return _cached_file_sha(source.path, file_sha256)
    if source.kind == "dir" and source.path is not None:
        return folder_sha256(source.path)
    return None


_sha_cache: dict[tuple[str, int, int], str] = {}


def _cached_file_sha(path: Path, hasher: Any) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        _sha_cache[key] = hasher(path)
    return _sha_cache[key]


def folder_sha256(folder: Path) -> str:
    """sha256 over (relative name, sha256) of every weight, config and tokenizer file, sorted."""
    h = hashlib.sha256()
    patterns = ("*.safetensors", "*.bin", "*.gguf", "*.json", "*.model", "*.txt")
    files = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file() and p.name != "manifest.json"})
    from .loading import file_sha256

    for p in files:
        h.update(p.name.encode())
        h.update(_cached_file_sha(p, file_sha256).encode())
    return h.hexdigest()


def check_pin(spec: ModelSpec) -> Optional[str]:
    """The source's sha256 when pinned (checked against the pin), else None (the loader's
    manifest reports it). An unknown source raises ``ModelNotFoundError``."""
    from . import registry

    registry.resolve(spec.location)
    if not spec.sha256:
        return None
    actual = source_sha256(spec.location)
    if spec.sha256 and actual and actual != spec.sha256:
        raise ModelHashMismatchError(spec.source, spec.sha256, actual)
    return actual
