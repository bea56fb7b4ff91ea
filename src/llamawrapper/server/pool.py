"""The models a server serves, by alias, loaded in a background thread after the server
starts listening (so ``/health`` answers at once and ``/ready`` says 503 until they load).

A model spec is ``source`` (served under the name typed) or ``name=source``. torch is imported
here only inside the loading thread, through ``LlamaWrapper``."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from ..config import EngineSettings
from ..errors import ModelNotFoundError
from .errors import not_ready

log = logging.getLogger("llamawrapper.server")


@dataclass
class Served:
    alias: str
    source: str
    status: str = "loading"  # loading | ready | failed
    llm: Any = None
    error: Optional[str] = None
    created: int = field(default_factory=lambda: int(time.time()))


def parse_spec(spec: str) -> tuple[str, str]:
    name, sep, source = spec.partition("=")
    if sep and name and source and "/" not in name:
        return name, source
    return spec, spec


class ModelPool:
    def __init__(self, specs: list[str], dtype: str = "float32", engine: Optional[EngineSettings] = None,
                 **load_kwargs: Any) -> None:
        if not specs:
            raise ValueError("serve needs at least one model")
        self.dtype = dtype
        self.load_kwargs = {k: v for k, v in load_kwargs.items() if v is not None}
        self.engine_settings = engine or EngineSettings()
        self.models: dict[str, Served] = {}
        for spec in specs:
            alias, source = parse_spec(spec)
            self.models[alias] = Served(alias, source)
        self.default = next(iter(self.models))
        self._thread: Optional[threading.Thread] = None
        self._loaded = threading.Event()
        self._closing = threading.Event()

    # -- loading -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._load_all, name="llamawrapper-loader", daemon=True)
        self._thread.start()

    def _load_all(self) -> None:
        # LlamaWrapper.load itself keeps torch work off this thread (see docs/DESIGN.md, Threads).
        try:
            self._load_each()
        finally:
            self._loaded.set()

    def _load_each(self) -> None:
        from ..api import LlamaWrapper  # imports torch: kept off the startup path

        for served in self.models.values():
            if self._closing.is_set():
                return
            t0 = time.perf_counter()
            try:
                served.llm = LlamaWrapper.load(served.source, dtype=self.dtype, engine=self.engine_settings, progress=False,
                                               **self.load_kwargs)
                served.status = "ready"
                log.info("model %s ready in %.1f s", served.alias, time.perf_counter() - t0,
                         extra={"model": served.alias, "load_seconds": round(time.perf_counter() - t0, 2)})
            except Exception as exc:  # the server keeps answering /health; /ready reports the failure
                served.status, served.error = "failed", f"{type(exc).__name__}: {exc}"
                log.error("model %s failed to load: %s", served.alias, served.error, extra={"model": served.alias})

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until every model has loaded or failed; True if all are ready."""
        self._loaded.wait(timeout)
        return self.ready

    # -- state ---------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return all(s.status == "ready" for s in self.models.values())

    def statuses(self) -> dict[str, str]:
        return {alias: (s.status if s.error is None else f"failed: {s.error}") for alias, s in self.models.items()}

    def get(self, name: Optional[str]) -> Any:
        """The ``LlamaWrapper`` serving ``name`` (the first model when ``name`` is None)."""
        served = self.models.get(self.default if name is None else name)
        if served is None:
            raise ModelNotFoundError(f"The model '{name}' does not exist. Served models: {', '.join(self.models)}.")
        if served.status != "ready":
            raise not_ready(f"The model '{served.alias}' is {served.status}; retry shortly." if served.error is None
                            else f"The model '{served.alias}' failed to load.")
        return served.llm

    def resolve(self, name: Optional[str]) -> tuple[Any, Optional[str]]:
        """The ``LlamaWrapper`` and LoRA adapter for a request's ``model``: a served name, or
        ``name:adapter`` for an adapter loaded on that model."""
        if name is None or name in self.models:
            return self.get(name), None
        from ..models.adapters import split_model_name  # no torch at module level

        base, adapter = split_model_name(name)
        if adapter is None or base not in self.models:
            return self.get(name), None  # raises ModelNotFoundError naming the model
        llm = self.get(base)
        if adapter not in getattr(llm, "adapters", {}):
            raise ModelNotFoundError(f"The model '{name}' does not exist: '{base}' has no adapter '{adapter}'. "
                                     f"Loaded adapters: {', '.join(sorted(getattr(llm, 'adapters', {}))) or 'none'}.")
        return llm, adapter

    def engines(self) -> Iterator[tuple[str, Any]]:
        for alias, served in list(self.models.items()):
            if served.status == "ready":
                yield alias, served.llm.engine

    def close(self) -> None:
        self._closing.set()
        for served in self.models.values():
            if served.llm is not None:
                served.llm.close()
