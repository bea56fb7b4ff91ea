"""Model admin calls that reach every replica. ``PUT``/``DELETE /admin/models/{name}``,
``/promote``, ``/rollback`` and the adapter routes change one process's ``ModelHost``; on the
Ray app Ray's proxy gives the call to one replica. ``AdminFanout`` (ASGI middleware in each
replica) lets that replica answer it as the single server does, then, if it succeeded, replays
the same request (method, path, headers, body) on every other running replica through Ray
Serve's ``DeploymentHandle.broadcast`` (each replica runs it through its own app: the same
admin-key check, validation, audit record), and adds what each replica answered to the
response: ``"replicas": {id: {"status", "body"}}`` and ``x-lw-replicas-applied: ok/total``.

Versions are named by each host in order (``v2``, ``v3``...), so replicas that saw the same
calls name them alike. A replica that starts later (Ray's replacement of a dead one, an
autoscaled one) learns the calls from the deployment's admin log in Redis (``adminlog.py``, with
a Redis ``--state-url``): the replica that answered a call appends it there before replaying it,
and says where in ``x-lw-admin-log`` (the entry's index, or ``unavailable``)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable, Optional

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import StateUnavailableError
from .adminlog import AdminLog, call_of

log = logging.getLogger("llamawrapper.deploy")
APPLIED_HEADER = b"x-lw-replicas-applied"
LOG_HEADER = b"x-lw-admin-log"
FANOUT_SCOPE_KEY = "llamawrapper.fanout_origin"   # set on a replayed call: never fanned out again
_METHODS = ("PUT", "DELETE", "POST")
_PREFIX = "/admin/models/"
_DROPPED_HEADERS = (b"content-length", b"host", b"transfer-encoding", b"connection")

Broadcast = Callable[[dict], Awaitable[list]]


def fans_out(scope: Scope) -> bool:
    return (scope["type"] == "http" and scope.get("method") in _METHODS and scope.get("path", "").startswith(_PREFIX)
            and FANOUT_SCOPE_KEY not in scope)


async def call_app(app: ASGIApp, scope: Scope, body: bytes) -> tuple[int, list, bytes]:
    """Run one request through an ASGI app in this process; (status, headers, body)."""
    sent = False
    status, headers, chunks = 500, [], []

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, headers, b"".join(chunks)


def replay_scope(request: dict) -> Scope:
    """The ASGI scope of a fanned-out admin call, as the receiving replica saw it."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
            "method": request["method"], "path": request["path"], "raw_path": request["path"].encode(),
            "query_string": request["query"].encode(), "root_path": "",
            "headers": [(k.encode(), v.encode()) for k, v in request["headers"]],
            "client": ("127.0.0.1", 0), "server": ("replica", 0), FANOUT_SCOPE_KEY: request["origin"]}


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:500]


class AdminFanout:
    """ASGI middleware: a successful model admin call is replayed on every other replica."""

    def __init__(self, app: ASGIApp, replica: str, broadcast: Broadcast, admin_log: Optional[AdminLog] = None) -> None:
        self.app = app
        self.replica = replica
        self.broadcast = broadcast
        self.admin_log = admin_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not fans_out(scope):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            return
        status, headers, raw = await call_app(self.app, scope, body)
        if 200 <= status < 300:
            request = {"method": scope["method"], "path": scope["path"],
                       "query": scope.get("query_string", b"").decode(), "origin": self.replica,
                       "headers": [(k.decode(), v.decode()) for k, v in scope.get("headers", [])
                                   if k.lower() not in _DROPPED_HEADERS],
                       "body": body}
            logged = await self._record(scope, body, request)
            replicas = {self.replica: {"status": status, "body": _json(raw)}}
            replicas.update(await self._others(request))
            ok = sum(200 <= r["status"] < 300 for r in replicas.values())
            out = _json(raw)
            if isinstance(out, dict):
                out["replicas"] = replicas
                raw = json.dumps(out).encode()
            headers = [(k, v) for k, v in headers if k.lower() not in (b"content-length", APPLIED_HEADER)]
            headers += [(b"content-length", str(len(raw)).encode()), (APPLIED_HEADER, f"{ok}/{len(replicas)}".encode())]
            if logged is not None:
                headers.append((LOG_HEADER, logged.encode()))
            if ok < len(replicas):
                log.warning("admin %s %s applied on %d of %d replicas: %s", scope["method"], scope["path"], ok,
                            len(replicas), replicas)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": raw})

    async def _record(self, scope: Scope, body: bytes, request: dict) -> Optional[str]:
        """Append the call to the admin log (its index goes with the fan-out); what to say in
        ``x-lw-admin-log``, None without a log."""
        if self.admin_log is None:
            return None
        try:
            call = call_of(scope["method"], scope["path"], body)
        except ValueError:  # the app took the body, so this does not happen; never fail the call for it
            call = None
        if call is None:
            return None
        try:
            request["log_index"] = await asyncio.to_thread(self.admin_log.append, call)
        except StateUnavailableError as exc:
            log.warning("admin %s %s not recorded in the admin log (replicas started later miss it): %s",
                        scope["method"], scope["path"], exc)
            return "unavailable"
        return str(request["log_index"])

    async def _others(self, request: dict) -> dict:
        """{replica: {"status", "body"}} from every other running replica (502 for one whose
        call failed: it died, or the broadcast itself could not be sent)."""
        try:
            results = await self.broadcast(request)
        except Exception as exc:  # no handle, no replicas known: say so instead of failing the call
            log.exception("admin fan-out failed")
            return {"(broadcast)": {"status": 502, "body": f"fan-out failed: {exc!r}"[:500]}}
        out: dict = {}
        for n, result in enumerate(results):
            if isinstance(result, BaseException):
                out[f"(failed {n})"] = {"status": 502, "body": f"{type(result).__name__}: {result}"[:500]}
            elif result.get("replica") != self.replica:
                out[result["replica"]] = {"status": result["status"], "body": result["body"]}
        return out


async def _read_body(receive: Receive) -> Optional[bytes]:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def apply_here(app: ASGIApp, replica: str, request: dict, replayed: int = 0) -> dict:
    """The replica's side of a fanned-out call (``LlamaWrapperReplica.admin_apply``); the
    replica that received the call skips it (it has answered already), and so does a replica
    that applied it from the admin log at its start (``replayed``: how many entries it did)."""
    if request["origin"] == replica:
        return {"replica": replica, "status": 0, "body": None}
    if 0 < request.get("log_index", 0) <= replayed:
        return {"replica": replica, "status": 200, "body": {"skipped": f"applied at start from admin log entry "
                                                                       f"{request['log_index']}"}}
    status, _, raw = await call_app(app, replay_scope(request), request["body"])
    return {"replica": replica, "status": status, "body": _json(raw)}


def handle_broadcast(app_name: str, deployment: str, timeout_s: float = 60) -> Broadcast:
    """A ``Broadcast`` through Ray Serve's ``DeploymentHandle.broadcast`` to this deployment."""
    from ray import serve

    handle = None

    async def broadcast(request: dict) -> list:
        nonlocal handle
        if handle is None:
            handle = serve.get_deployment_handle(deployment, app_name)
        response = handle.broadcast("admin_apply", request)
        return await response.results_async(timeout_s=timeout_s, return_exceptions=True)

    return broadcast
