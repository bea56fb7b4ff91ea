"""How the host turns a version's spec into a loaded model (a task model when
``llamawrapper.tasks`` recognises the source, else a chat ``LlamaWrapper``), how much memory it
holds, and how it is closed."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from .versions import ModelSpec

log = logging.getLogger("llamawrapper.host")

Loader = Callable[[ModelSpec], Any]


def close_model(model: Any) -> None:
    """Close a model (its engine leaves the executor); a failure is logged, not raised."""
    try:
        if model is not None and hasattr(model, "close"):
            model.close()
    except Exception:
        log.exception("closing a model failed")


def memory_bytes(model: Any) -> int:
    """Bytes of the model's weights and buffers (shared storages counted once), and of the packed
    copies its engine's runner calls (``onednn_linear``)."""
    inner = getattr(getattr(model, "loaded", None), "model", None) or getattr(model, "module", None)
    if inner is None or not hasattr(inner, "state_dict"):
        return 0
    seen, total = set(), 0
    for t in inner.state_dict(keep_vars=True).values():
        if hasattr(t, "untyped_storage"):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
    runner = getattr(getattr(model, "engine", None), "runner", None)
    return total + int(getattr(runner, "packed_bytes", 0) or 0)


def default_loader(dtype: Optional[str] = None, quantization: Optional[str] = None, engine: Any = None) -> Loader:
    """Load a version as a task model when ``llamawrapper.tasks`` recognises it, else as a chat
    model through ``LlamaWrapper.load``."""

    def load(spec: ModelSpec) -> Any:
        try:
            from .. import tasks
        except ImportError:
            tasks = None
        if tasks is not None and hasattr(tasks, "load_served"):
            model = tasks.load_served(spec.location)
            if model is not None:  # it runs on the executor too: its threads as a chat model's load sets them
                from ..config import EngineSettings
                from ..engine.threads import set_process_threads

                settings = EngineSettings.of(engine)
                set_process_threads(settings.threads, settings.pin_threads)
                return model
        from ..api import LlamaWrapper

        return LlamaWrapper.load(spec.location, dtype=spec.dtype or dtype, engine=engine, progress=False,
                                 quantization=spec.quantization or quantization, overrides=spec.overrides or None,
                                 adapters=spec.adapters or None)

    return load
