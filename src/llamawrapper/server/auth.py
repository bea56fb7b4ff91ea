"""API keys: ``Authorization: Bearer <key>`` on every route but the open ones (``/health``).

Keys are compared in constant time (digests of equal length, every key checked, no early
exit) and never logged or echoed. With no keys configured, every request is let through."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Iterable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import unauthorized

OPEN_PATHS = frozenset({"/health"})


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class KeyChecker:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def accepts(self, presented: str) -> bool:
        probe = _digest(presented)
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(probe, d)
        return ok


def bearer_token(headers: Headers) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class APIKeyMiddleware:
    """ASGI middleware answering 401 in OpenAI's error shape when the key is missing or wrong."""

    def __init__(self, app: ASGIApp, keys: Iterable[str], open_paths: Iterable[str] = OPEN_PATHS) -> None:
        self.app = app
        self.checker = KeyChecker(keys)
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.checker.enabled or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        token = bearer_token(Headers(scope=scope))
        if token is None or not self.checker.accepts(token):
            await unauthorized(missing=token is None).response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def require_admin(request: Any) -> None:
    """Let an operator route (``/admin/...``) through only for an admin key. Until keys carry
    scopes every configured key is an admin key; the middleware has already refused requests
    without a valid key, and with no keys configured the server is open."""


def record_admin_action(request: Any, action: str, **details: Any) -> None:
    """Record an admin action (model loaded, swapped, removed; key created, revoked). The audit
    trail plugs in here; until then the access log's line is the only record."""
