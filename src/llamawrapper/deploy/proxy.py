"""Ray Serve's HTTP proxy, made to keep the single server's promise when a replica dies: a
request whose replica vanished before it sent a response start (``kill -9``, a lost node) is
sent again, and Ray routes it to a live replica (each body is read once here, which also
lets the prefix-aware router see the prompt: ``routing.py``); after ``attempts`` tries it gets a retriable
503 with ``Retry-After`` (Ray's own proxy would answer a bare 500). A response that had
started (a stream) cannot be replayed: it ends where the replica died.

Ray's own back-pressure answer (every replica full and the router's queue full: a 429 with
``Retry-After``, from ``plan.py``'s ``backpressure_config``, in plain text) gets the single
server's OpenAI-shaped ``queue_full`` error body; it is told from a replica's 429 (a rate
limit) by the missing ``x-replica`` header.

A retried request may be charged twice against a key's limits (the dead replica had counted
it in the shared store).

Ray Serve installs proxy middleware only through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
(read by the proxy process): ``serve --ray`` sets it to ``PROXY_CALLBACK`` before it starts a
local cluster; a cluster started elsewhere needs it in its environment (``ray start``)."""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("llamawrapper.deploy")


PROXY_CALLBACK = "llamawrapper.deploy.proxy:middlewares"


def middlewares() -> list:
    """The proxy's middleware list (Ray calls this by import path in the proxy process)."""
    from starlette.middleware import Middleware

    from ..config import ServerSettings

    return [Middleware(RetryLostReplica, max_body_bytes=ServerSettings().max_body_bytes)]


def _with_prefix(scope: Scope, body: bytes) -> Scope:
    """The prompt's prefix hashes for the prefix-aware router (when Ray is importable here)."""
    try:
        from .routing import with_prefix_header
    except ImportError:
        return scope
    return with_prefix_header(scope, body)


QUEUE_FULL_BODY = json.dumps({"error": {
    "message": "Every replica is busy and the queue is full; retry shortly.",
    "type": "rate_limit_error", "param": None, "code": "queue_full"}}).encode()


def _queue_full_start(message: Message) -> Message:
    headers = [(k, v) for k, v in message["headers"] if k not in (b"content-type", b"content-length")]
    if not any(k == b"retry-after" for k, _ in headers):
        headers.append((b"retry-after", b"1"))
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(QUEUE_FULL_BODY)).encode())]
    return {**message, "headers": headers}


class RetryLostReplica:
    """Plain ASGI middleware for the proxy (``http_options.middlewares``)."""

    def __init__(self, app: ASGIApp, attempts: int = 4, max_body_bytes: int = 4 * 1024 * 1024, retry_after: int = 1) -> None:
        self.app = app
        self.attempts = attempts
        self.max_body_bytes = max_body_bytes
        self.retry_after = retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._replayable(scope):
            await self.app(scope, receive, send)
            return
        body = await self._read_body(receive)
        if body is None:  # the client left while sending
            return
        scope = _with_prefix(scope, body)
        for attempt in range(self.attempts):
            started = await self._attempt(scope, body, receive, send)
            if started:
                return
            log.warning("replica lost before answering %s %s; retry %d", scope["method"], scope["path"], attempt + 1)
            await asyncio.sleep(0.25 * (attempt + 1))
        await self._unavailable(send)

    def _replayable(self, scope: Scope) -> bool:
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                return value.isdigit() and int(value) <= self.max_body_bytes
        return True  # no declared length: read up to the limit below

    async def _read_body(self, receive: Receive):
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if not message.get("more_body", False) or size > self.max_body_bytes:
                return b"".join(chunks)  # an oversized body goes on as is; the app answers 413

    async def _attempt(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """One pass through Ray's proxy; True once a response had started."""
        started = False
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the real channel: a disconnect still cancels the replica's work

        rejected = False

        async def watch(message: Message) -> None:
            nonlocal started, rejected
            if message["type"] == "http.response.start":
                started = True
                # the replica's app and Ray's proxy both echo x-request-id: send each header once
                message["headers"] = list(dict.fromkeys(tuple(h) for h in message.get("headers", [])))
                if message["status"] == 429 and not any(k == b"x-replica" for k, _ in message["headers"]):
                    rejected = True
                    message = _queue_full_start(message)
            elif rejected and message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # Ray's plain-text body is replaced by ours at its last chunk
                message = {"type": "http.response.body", "body": QUEUE_FULL_BODY}
            await send(message)

        try:
            await self.app(dict(scope), replay, watch)
        except Exception:
            if started:
                raise
            log.exception("proxy failed before answering")
        return started

    async def _unavailable(self, send: Send) -> None:
        body = json.dumps({"error": {"message": "The replica serving this request was lost; retry shortly.",
                                     "type": "service_unavailable_error", "param": None, "code": "replica_lost"}}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(self.retry_after).encode())]})
        await send({"type": "http.response.body", "body": body})
