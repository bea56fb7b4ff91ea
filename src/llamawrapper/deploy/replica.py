"""One Ray Serve replica: the ordinary FastAPI app (``create_app``) around one ``ModelHost``,
built inside the replica's process. Every response names the replica (``x-replica``), every
``/metrics`` sample carries a ``replica`` label, ``/replica`` says which process answers, and
the replica only reports itself started once its models are loaded (so Ray sends it no traffic
before, and a rollout never swaps a loaded replica for a loading one); model admin calls reach
every replica (``fanout.py``), replicas started later included (``adminlog.py``)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable, Optional

from fastapi import APIRouter, Request
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import EngineSettings, SecuritySettings, ServerSettings
from .adminlog import open_admin_log
from .fanout import AdminFanout, apply_here, handle_broadcast

log = logging.getLogger("llamawrapper.deploy")
REPLICA_HEADER = "x-replica"

_router = APIRouter()


@_router.get("/replica", include_in_schema=False)
async def replica_info(request: Request) -> dict:
    """Which replica and process answered (for operators and the fault tests)."""
    return {"replica": request.app.state.replica, "pid": os.getpid(), "node": _node_id()}


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside a Ray worker (unit use)
        return ""


class ReplicaMiddleware:
    """Adds ``x-replica`` to every response; holds the ASGI lifespan's "startup complete" until
    the host has loaded every model, and turns a failed load into a failed startup (Ray then
    retries the replica instead of routing to a replica that can only answer 503)."""

    def __init__(self, app: ASGIApp, replica: str, host: Any, load_timeout: float = 1800,
                 after_load: Optional[Callable[[], Any]] = None) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())
        self.host = host
        self.load_timeout = load_timeout
        self.after_load = after_load  # the admin log's replay: before startup completes too

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._after_load(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, named)

    def _after_load(self, send: Send) -> Send:
        async def send_when_loaded(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                loaded = await asyncio.to_thread(self.host.wait, None, None, self.load_timeout)
                if not loaded:
                    message = {"type": "lifespan.startup.failed", "message": f"models not loaded: {self.host.statuses()}"}
                elif self.after_load is not None:
                    try:
                        await asyncio.to_thread(self.after_load)
                    except Exception as exc:  # Redis away: Ray retries the replica rather than start it stale
                        message = {"type": "lifespan.startup.failed", "message": f"admin log not replayed: {exc}"}
            await send(message)

        return send_when_loaded


def label_metrics(metrics: Any, replica: str) -> None:
    """Make ``metrics.render()`` add ``replica="..."`` to every sample (the app's registry is
    read as it is; only the exposition changes)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.samples import Sample

    class Labelled:
        def collect(self):
            for family in metrics.registry.collect():
                family.samples = [Sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
                                  for s in family.samples]
                yield family

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Labelled())
    metrics.render = lambda: generate_latest(registry)


@serve.ingress()
class LlamaWrapperReplica:
    """The Ray Serve deployment class: its ASGI app is built in the replica, after ``__init__``."""

    def __init__(self, settings: ServerSettings, engine: EngineSettings, security: SecuritySettings,
                 deployment_id: Optional[str] = None) -> None:
        self._settings, self._engine, self._security = settings, engine, security
        self._deployment_id = deployment_id  # names the admin log (``adminlog.py``); one per build_app

    def __serve_build_asgi_app__(self) -> ASGIApp:
        from ..server.app import create_app

        replica = serve.get_replica_context().replica_id.unique_id
        app = create_app(self._settings, self._engine, security=self._security)
        state = app.state.lw
        app.state.replica = replica
        app.include_router(_router)
        label_metrics(state.metrics, replica)
        context = serve.get_replica_context()
        admin_log = open_admin_log(self._security.state_url, self._deployment_id)
        app.add_middleware(AdminFanout, replica=replica, admin_log=admin_log,
                           broadcast=handle_broadcast(context.app_name, context.deployment))
        app.add_middleware(ReplicaMiddleware, replica=replica, host=state.host,
                           after_load=(lambda: admin_log.replay(state.host)) if admin_log is not None else None)
        self._app, self._replica, self._admin_log = app, replica, admin_log
        log.info("replica %s built (pid %d)", replica, os.getpid())
        return app

    async def admin_apply(self, request: dict) -> dict:
        """A model admin call fanned out by the replica that received it (``fanout.py``)."""
        return await apply_here(self._app, self._replica, request,
                                replayed=self._admin_log.replayed if self._admin_log is not None else 0)
