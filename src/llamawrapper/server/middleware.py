"""Plain ASGI middleware (no ``BaseHTTPMiddleware``, which hides client disconnects):

- ``RequestContextMiddleware``: gives each request an id (``x-request-id``, echoed or made),
  echoes it on the response, logs one JSON-friendly access line with it, counts metrics.
- ``BodyLimitMiddleware``: 413 for a body over the limit, by ``Content-Length`` or while reading;
  a form-encoded body (what ``curl -d`` declares) is read as the JSON it nearly always is.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import too_large
from .metrics import Metrics

log = logging.getLogger("llamawrapper.server")

_GOOD_ID = re.compile(r"^[\w.:\-]{1,128}$")


def request_id_of(headers: Headers) -> str:
    given = headers.get("x-request-id", "")
    return given if _GOOD_ID.match(given) else uuid.uuid4().hex


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(Headers(scope=scope))
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_http(route, scope["method"], status, elapsed)
            log.info("%s %s %s", scope["method"], scope["path"], status, extra={
                "request_id": rid, "method": scope["method"], "path": scope["path"], "status": status,
                "duration_ms": round(elapsed * 1000, 1)})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            scope["headers"] = [(k, b"application/json" if k == b"content-type" else v) for k, v in scope["headers"]]
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await too_large(self.max_bytes).response()(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # an HTTPException, which FastAPI's body reader lets through (anything else
                    # becomes its "error parsing the body" 400); the app's handler shapes it
                    raise HTTPException(413, detail=too_large(self.max_bytes).message)
            return message

        await self.app(scope, counting_receive, send)
