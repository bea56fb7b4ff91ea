"""The model host: every served name, its versions, and the rules that move traffic between
them — load, hot swap, canary, promote, rollback, drain, unload, keep-alive and LRU eviction.

    put(name, spec) ─► version "loading" ─► "ready" ─┬─ traffic 1: takes the name's traffic;
                                     └─► "failed"     │  the old version drains, then unloads
                        (the old version serves on)   └─ traffic t<1: a canary beside it
    promote: the canary takes all traffic        rollback: back to the version before
    remove: the name stops resolving; its versions drain, then unload
    keep_alive: an idle version unloads; the next request loads it again (and waits)
    max_loaded_models: loading one more unloads the least recently used idle version

Requests take a ``Lease`` on the version they picked (``acquire``) and hold it until their
work is handed to the engine; a version drains until no lease and no engine request is left,
so no admin call loses a request. The host imports no torch: loading happens in its threads
through a loader (``LlamaWrapper.load`` by default), and engines are stepped by the process's
one executor thread (``engine/executor.py``)."""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

from ..errors import (InvalidRequestError, ModelConflictError, ModelHashMismatchError, ModelNotFoundError,
                      ModelUnavailableError)
from .load_process import start_load_process
from .loaders import Loader, close_model, default_loader, memory_bytes
from .versions import ModelSpec, Version, check_pin

log = logging.getLogger("llamawrapper.host")

@dataclass
class Served:
    """One name and its versions."""

    name: str
    versions: list[Version] = field(default_factory=list)
    active: Optional[Version] = None
    canary: Optional[Version] = None
    previous: Optional[Version] = None
    keep_alive: Optional[float] = None
    created: int = field(default_factory=lambda: int(time.time()))

    def find(self, version: str) -> Optional[Version]:
        return next((v for v in self.versions if v.version == version), None)

    @property
    def loading(self) -> Optional[Version]:
        return next((v for v in self.versions if v.status == "loading"), None)


class Lease:
    """A request's hold on one version; release it once the work is handed to the engine."""

    def __init__(self, host: "ModelHost", version: Version, adapter: Optional[str]) -> None:
        self.host, self._version, self.adapter = host, version, adapter
        self.model, self.name, self.version = version.model, version.name, version.version
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.host._release(self._version)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class _MustWait(Exception):
    """Internal: the picked version is being (re)loaded; the caller may wait for it."""


class ModelHost:
    """Names → versions, loaded in the background, swapped without failing a request."""

    def __init__(self, loader: Optional[Loader] = None, *, keep_alive: Optional[float] = None,
                 max_loaded_models: Optional[int] = None, drain_timeout: float = 600.0, load_timeout: float = 600.0) -> None:
        if max_loaded_models is not None and max_loaded_models < 1:
            raise InvalidRequestError("max_loaded_models must be at least 1.", param="max_loaded_models")
        self._loader = loader or default_loader()
        self.keep_alive = keep_alive
        self.max_loaded_models = max_loaded_models
        self.drain_timeout, self.load_timeout = drain_timeout, load_timeout
        self._cv = threading.Condition(threading.RLock())
        self._names: dict[str, Served] = {}
        self._closed = False
        self._reaper: Optional[threading.Thread] = None
        # One load at a time: concurrent first imports of transformers race (ImportError or a
        # deadlock), and on a small machine two loads side by side only slow each other.
        self._load_lock = threading.Lock()

    # -- admin -------------------------------------------------------------------------------------
    def put(self, name: str, spec: Union[ModelSpec, dict, str], *, traffic: Optional[float] = None,
            keep_alive: Optional[float] = None, wait: bool = False) -> dict:
        """Load a new version of ``name`` (the first creates the name). With ``traffic`` below 1
        it becomes a canary; otherwise it takes the name's traffic once ready. Returns at once
        (``wait=True``: once loaded or failed) with ``{"name", "version", "status"}``."""
        spec = spec if isinstance(spec, ModelSpec) else ModelSpec.parse({"source": spec} if isinstance(spec, str) else spec)
        _check_name(name)
        if traffic is not None and (isinstance(traffic, bool) or not isinstance(traffic, (int, float)) or not 0 <= traffic <= 1):
            raise InvalidRequestError(f"'traffic' must be a number from 0 to 1; got {traffic!r}.", param="traffic")
        if keep_alive is not None and (not isinstance(keep_alive, (int, float)) or keep_alive <= 0):
            raise InvalidRequestError("'keep_alive' must be a positive number of seconds.", param="keep_alive")
        sha = check_pin(spec)  # unknown source -> ModelNotFoundError; pin mismatch -> ModelHashMismatchError
        with self._cv:
            served = self._names.get(name)
            if served is not None and served.loading is not None:
                raise ModelConflictError(f"Version {served.loading.version} of '{name}' is still loading; "
                                         "wait for it (GET /admin/models) before putting another.")
            if served is None:
                served = self._names[name] = Served(name)
            if keep_alive is not None:
                served.keep_alive = float(keep_alive)
            full = traffic is None or traffic >= 1
            version = Version(name, f"v{len(served.versions) + 1}", spec, sha256=sha,
                              traffic=1.0 if traffic is None else float(traffic), role="active" if full else "canary")
            served.versions.append(version)
            self._start_load(served, version)
        if wait:
            self.wait(name, version.version)
        return {"name": name, "version": version.version, "status": version.status}

    def promote(self, name: str) -> dict:
        """The canary takes all traffic; the version it replaces drains."""
        with self._cv:
            served = self._served(name)
            canary = served.canary
            if canary is None or canary.status != "ready":
                raise ModelConflictError(f"'{name}' has no ready canary to promote.")
            served.canary = None
            self._make_active(served, canary)
        return {"name": name, "version": canary.version, "status": canary.status}

    def rollback(self, name: str) -> dict:
        """Drop the canary if there is one; else go back to the version served before this one
        (loaded again if it was unloaded; the current one serves until it is ready)."""
        with self._cv:
            served = self._served(name)
            if served.canary is not None:
                dropped, served.canary = served.canary, None
                self._drain(dropped)
                target = served.active
            else:
                target = served.previous
                if target is None or target is served.active:
                    raise ModelConflictError(f"'{name}' has no earlier version to roll back to.")
                if served.loading is not None:
                    raise ModelConflictError(f"Version {served.loading.version} of '{name}' is still loading.")
                target.traffic, target.error, target.role = 1.0, None, "active"
                if target.status in ("ready", "draining"):
                    target.status = "ready"  # a draining version is taken back before it unloads
                    self._make_active(served, target)
                else:
                    self._start_load(served, target)
        return {"name": name, "version": target.version if target else None, "status": target.status if target else None}

    def remove(self, name: str) -> dict:
        """The name stops resolving now; its versions drain, then unload."""
        with self._cv:
            served = self._names.pop(name, None)
            if served is None:
                raise self._not_found(name)
            for v in served.versions:
                if v.status in ("ready", "loading"):
                    self._drain(v)
        return {"name": name, "status": "removed"}

    def models(self) -> list[dict]:
        """Every name with its versions (the admin view)."""
        with self._cv:
            return [self._describe(s) for s in self._names.values()]

    def current_spec(self, name: str) -> ModelSpec:
        """The spec of the version serving ``name`` (else its newest version)."""
        with self._cv:
            served = self._served(name)
            return (served.active or served.versions[-1]).spec

    def describe(self, name: str) -> dict:
        with self._cv:
            return self._describe(self._served(name))

    # -- serving -------------------------------------------------------------------------------------
    def acquire(self, model: Optional[str] = None, *, wait: bool = True) -> Lease:
        """A lease on the version that serves ``model`` (``name``, ``name@version`` or
        ``name:adapter``; None = the first name). A version unloaded by keep-alive or eviction is
        loaded again; with ``wait`` the call blocks until it is ready."""
        deadline = time.monotonic() + self.load_timeout
        while True:
            try:
                with self._cv:
                    return self._lease(model)
            except _MustWait:
                if not wait:
                    raise
            with self._cv:
                if time.monotonic() > deadline:
                    raise ModelUnavailableError(f"The model '{model}' did not load within {self.load_timeout:.0f} s.")
                self._cv.wait(0.2)

    async def acquire_async(self, model: Optional[str] = None) -> Lease:
        """``acquire`` for asyncio: immediate when the version is loaded, else waits in a thread."""
        try:
            return self.acquire(model, wait=False)
        except _MustWait:
            import anyio

            return await anyio.to_thread.run_sync(lambda: self.acquire(model, wait=True))

    def resolve(self, model: Optional[str] = None) -> tuple[Any, Optional[str]]:
        """The model object and adapter for ``model``, without holding a lease (short calls)."""
        with self.acquire(model) as lease:
            return lease.model, lease.adapter

    def chat(self, model: str, messages: Any, **kwargs: Any) -> Any:
        """``LlamaWrapper.chat`` on whichever version serves ``model`` now."""
        with self.acquire(model) as lease:
            handle = lease.model.submit_chat(messages, _sampling(kwargs), adapter=lease.adapter, **kwargs)
        return handle.result()

    @property
    def default(self) -> Optional[str]:
        with self._cv:
            return next(iter(self._names), None)

    def names(self) -> list[str]:
        with self._cv:
            return list(self._names)

    def served(self) -> list[dict]:
        """Each name with its task and creation time (``/v1/models``)."""
        with self._cv:
            out = []
            for s in self._names.values():
                v = s.active or s.loading
                out.append({"id": s.name, "created": s.created,
                            "task": getattr(v.model, "task", "chat") if v is not None and v.model is not None else None})
            return out

    def statuses(self) -> dict[str, str]:
        with self._cv:
            return {s.name: self._status(s) for s in self._names.values()}

    @property
    def ready(self) -> bool:
        """Every name can serve (ready, or unloaded and loadable on demand)."""
        with self._cv:
            return bool(self._names) and all(self._status(s) in ("ready", "unloaded") for s in self._names.values())

    def wait(self, name: Optional[str] = None, version: Optional[str] = None, timeout: Optional[float] = None) -> bool:
        """Wait until ``name``'s version (every name's loading version by default) is no longer
        loading; True when everything waited for is ready."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while True:
                targets = [v for s in self._names.values() if name in (None, s.name) for v in s.versions
                           if version in (None, v.version)]
                if not any(v.status == "loading" for v in targets):
                    return all(v.status in ("ready", "draining", "unloaded") for v in targets) and bool(targets)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left if left is not None else 1.0)

    def engines(self) -> Iterator[tuple[str, str, Any]]:
        """(name, version, engine) of every loaded chat version."""
        with self._cv:
            items = [(s, v) for s in self._names.values() for v in s.versions if v.model is not None]
        for s, v in items:
            engine = getattr(v.model, "engine", None)
            if engine is not None:
                yield s.name, v.version, engine

    def close(self) -> None:
        with self._cv:
            self._closed = True
            versions = [v for s in self._names.values() for v in s.versions if v.model is not None]
            self._cv.notify_all()
        for v in versions:
            close_model(v.model)
            v.model, v.status = None, "unloaded"

    # -- internals (called with the lock held) ----------------------------------------------------------
    def _served(self, name: str) -> Served:
        served = self._names.get(name)
        if served is None:
            raise self._not_found(name)
        return served

    def _not_found(self, name: Optional[str]) -> ModelNotFoundError:
        return ModelNotFoundError(f"The model '{name}' does not exist. Served models: {', '.join(self._names) or 'none'}.")

    def _parse(self, model: Optional[str]) -> tuple[Served, Optional[str], Optional[str]]:
        if model is None:
            if not self._names:
                raise self._not_found(model)
            return next(iter(self._names.values())), None, None
        if model in self._names:
            return self._names[model], None, None
        base, adapter = model, None
        if ":" in base:
            base, _, adapter = base.rpartition(":")
        name, _, pin = base.partition("@")
        served = self._names.get(name)
        if served is None:
            raise self._not_found(model)
        return served, pin or None, adapter or None

    def _lease(self, model: Optional[str]) -> Lease:
        if self._closed:
            raise ModelUnavailableError("The model host is shut down.")
        served, pin, adapter = self._parse(model)
        if pin is not None:
            version = served.find(pin)
            if version is None or version.status == "failed":
                listed = ", ".join(f"{v.version} ({v.status})" for v in served.versions)
                raise ModelNotFoundError(f"'{served.name}' has no version '{pin}'. Versions: {listed}.")
        else:
            version = served.active
            if served.canary is not None and served.canary.status == "ready" and random.random() < served.canary.traffic:
                version = served.canary
        if version is None:
            loading = served.loading
            failed = next((v for v in reversed(served.versions) if v.status == "failed"), None)
            if loading is not None:
                raise ModelUnavailableError(f"The model '{served.name}' is loading; retry shortly.")
            why = str(failed.error).rstrip(".") if failed else "no version"
            raise ModelUnavailableError(f"The model '{served.name}' failed to load: {why}.")
        if version.status == "unloaded":
            self._start_load(served, version)
            raise _MustWait()
        if version.status == "loading":
            raise _MustWait()
        if version.status == "failed":  # loading it again (keep-alive, eviction, a pin) failed
            raise ModelUnavailableError(f"The model '{served.name}' ({version.version}) failed to load: {version.error}")
        if adapter is not None and adapter not in getattr(version.model, "adapters", {}):
            known = ", ".join(sorted(getattr(version.model, "adapters", {}))) or "none"
            raise ModelNotFoundError(f"The model '{model}' does not exist: '{served.name}' has no adapter '{adapter}'. "
                                     f"Loaded adapters: {known}.")
        version.leases += 1
        version.last_used = time.monotonic()
        return Lease(self, version, adapter)

    def _release(self, version: Version) -> None:
        with self._cv:
            version.leases -= 1
            version.last_used = time.monotonic()
            self._cv.notify_all()

    def _status(self, served: Served) -> str:
        v = served.active
        if v is not None:
            return v.status if v.status != "draining" else "ready"
        loading = served.loading
        if loading is not None:
            return "loading"
        failed = next((x for x in reversed(served.versions) if x.status == "failed"), None)
        return f"failed: {failed.error}" if failed else "unloaded"

    def _describe(self, served: Served) -> dict:
        return {"name": served.name, "status": self._status(served), "keep_alive": served.keep_alive,
                "active": served.active.version if served.active else None,
                "canary": served.canary.version if served.canary else None,
                "versions": [v.info() for v in served.versions]}

    def _make_active(self, served: Served, version: Version) -> None:
        old = served.active
        version.traffic, version.role = 1.0, "active"
        served.active = version
        if old is not None and old is not version:
            served.previous = old
            self._drain(old)
        if served.canary is not None and served.canary is not version:
            canary, served.canary = served.canary, None
            self._drain(canary)
        if served.canary is version:
            served.canary = None
        self._cv.notify_all()

    def _drain(self, version: Version) -> None:
        if version.status == "loading":
            version.status, version.traffic = "unloaded", 0.0  # its load thread sees it and unloads
            return
        if version.status != "ready":
            return
        version.status, version.traffic = "draining", 0.0
        threading.Thread(target=self._drain_then_unload, args=(version,), name="llamawrapper-drain", daemon=True).start()

    def _drain_then_unload(self, version: Version) -> None:
        deadline = time.monotonic() + self.drain_timeout
        with self._cv:
            while version.in_flight > 0 and time.monotonic() < deadline and not self._closed:
                self._cv.wait(0.05)
            if version.status != "draining":  # rolled back to while draining
                return
            model, version.model, version.status = version.model, None, "unloaded"
        log.info("%s %s drained and unloaded", version.name, version.version)
        close_model(model)

    def _start_load(self, served: Served, version: Version) -> None:
        version.status, version.error = "loading", None
        self._make_room(version)
        threading.Thread(target=self._load, args=(served, version), name="llamawrapper-loader", daemon=True).start()
        self._ensure_reaper()

    def _make_room(self, loading: Version) -> None:
        if self.max_loaded_models is None:
            return
        # never the loading version's own name: evicting the version it replaces would make the
        # requests still going to it load it again, and the two would evict each other
        loaded = [v for s in self._names.values() for v in s.versions if v.model is not None and v.name != loading.name]
        idle = sorted((v for v in loaded if v.status == "ready" and v.in_flight == 0), key=lambda v: v.last_used)
        while len(loaded) + 1 > self.max_loaded_models and idle:
            victim = idle.pop(0)
            loaded.remove(victim)
            self._unload_now(victim, reason="max_loaded_models")

    def _unload_now(self, version: Version, reason: str) -> None:
        model, version.model, version.status = version.model, None, "unloaded"
        log.info("%s %s unloaded (%s)", version.name, version.version, reason)
        threading.Thread(target=close_model, args=(model,), name="llamawrapper-unload", daemon=True).start()

    def _load(self, served: Served, version: Version) -> None:
        t0 = time.perf_counter()
        try:
            with self._load_lock:
                if version.status != "loading":  # removed or superseded while waiting its turn
                    return
                model = self._loader(version.spec)
            sha = getattr(getattr(model, "loaded", None), "manifest", {}).get("source_sha256")
            if version.spec.sha256 and sha and version.sha256 is None and sha != version.spec.sha256:
                close_model(model)
                raise ModelHashMismatchError(version.spec.source, version.spec.sha256, sha)
        except Exception as exc:  # the version fails alone; whatever served before serves on
            with self._cv:
                version.status, version.error = "failed", f"{type(exc).__name__}: {exc}"
                self._cv.notify_all()
            log.error("%s %s failed to load: %s", version.name, version.version, version.error)
            return
        with self._cv:
            if version.status != "loading" or self._closed or self._names.get(served.name) is not served:
                self._cv.notify_all()
                drop = True  # removed or superseded while loading
            else:
                drop = False
                version.model, version.status, version.loaded_at = model, "ready", time.time()
                version.sha256 = version.sha256 or sha
                version.memory_bytes = memory_bytes(model)
                version.last_used = time.monotonic()
                self._make_room(version)  # again: versions busy when the load began may be idle now
                if version is served.active or version is served.canary:
                    pass  # loaded again after keep-alive or eviction: same place as before
                elif version.role == "active" or served.active is None:
                    self._make_active(served, version)
                elif version.role == "canary":
                    if served.canary is not None:
                        self._drain(served.canary)
                    served.canary = version
                self._cv.notify_all()
        if drop:
            close_model(model)
            return
        if getattr(model, "engine", None) is not None:  # a chat model: later loads happen beside it,
            start_load_process()  # so get their process ready now
        log.info("%s %s ready in %.1f s", version.name, version.version, time.perf_counter() - t0,
                 extra={"model": version.name, "version": version.version, "load_seconds": round(time.perf_counter() - t0, 2)})

    def _ensure_reaper(self) -> None:
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap, name="llamawrapper-keepalive", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        """Unload versions idle for longer than their name's keep_alive."""
        while True:
            with self._cv:
                if self._closed:
                    return
                now = time.monotonic()
                for s in list(self._names.values()):
                    ttl = s.keep_alive if s.keep_alive is not None else self.keep_alive
                    for v in (s.active, s.canary):
                        if v is None or v.status != "ready":
                            continue
                        if v.in_flight > 0:
                            v.last_used = now
                        elif ttl is not None and now - v.last_used > ttl:
                            self._unload_now(v, reason=f"idle for {ttl:g} s")
                self._cv.wait(0.25)


def _check_name(name: str) -> None:
    # '@' and ':' would read as a version pin or an adapter; a served path or hub id keeps its '/'
    if not isinstance(name, str) or not name.strip() or len(name) > 512 or any(c.isspace() for c in name):
        raise InvalidRequestError(f"Invalid model name {name!r}.", param="name")


def _sampling(kwargs: dict) -> Any:
    from ..api import SAMPLING_NAMES, sampling_params

    return sampling_params(**{k: kwargs.pop(k) for k in list(kwargs) if k in SAMPLING_NAMES})
