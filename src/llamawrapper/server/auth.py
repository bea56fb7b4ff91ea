"""Keys, scopes, limits and the audit trail at the HTTP edge (the decisions are
``llamawrapper.security.Gate``'s; this module only reads and writes HTTP).

``SecurityMiddleware`` (plain ASGI, inside the request-id middleware) on every route but the open
ones (``/health``):

1. authenticates ``Authorization: Bearer <key>`` (401 in OpenAI's shape, the attempt audited);
2. for a key with a ``models`` list, reads the JSON body's ``model`` (or ``/v1/models/{model}``)
   and answers 404 ``model_not_found`` for a model outside it, as for a model that does not exist;
3. admits the request under the key's rpm / tpm / max_parallel (429 + ``Retry-After``), adding
   OpenAI's ``x-ratelimit-*`` headers to the response;
4. writes one audit line when the response is done (key id, route, model and version, tokens,
   status, latency, client address; text only with ``log_content``).

Routes call ``charge_tokens`` when the prompt is counted, ``charge_streamed`` as completion tokens
stream out and ``settle_completion`` when a request ends; ``model_allowed`` filters lists; the
admin routes call ``require_admin`` and ``record_admin_action``."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Iterable, Optional

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import AuthenticationError, LlamaWrapperError, ModelNotFoundError, PermissionDeniedError
from ..security.content import ContentCapture, request_text
from ..security.gate import OPEN, Gate, Principal
from .errors import from_exception

OPEN_PATHS = frozenset({"/health"})
_MODEL_PATH = "/v1/models/"


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, gate: Gate, max_body_bytes: int, models: Callable[[], list[str]],
                 default_model: Callable[[], Optional[str]], log_content: bool = False,
                 open_paths: Iterable[str] = OPEN_PATHS) -> None:
        self.app, self.gate, self.max_body_bytes = app, gate, max_body_bytes
        self.models, self.default_model = models, default_model
        self.log_content = log_content
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        client = (scope.get("client") or ("", 0))[0]
        where = {"request_id": state.get("request_id"), "route": scope["path"], "method": scope["method"], "client": client}
        principal = OPEN
        try:
            if self.gate.enabled:
                principal = self.gate.authenticate(Headers(scope=scope).get("authorization"))
        except LlamaWrapperError as exc:
            if isinstance(exc, AuthenticationError):
                self.gate.record_failure(str(exc), **where)
            await from_exception(exc).response()(scope, receive, send)
            return
        state["principal"] = principal
        usage = state["usage"] = {"prompt_tokens": 0, "completion_tokens": 0}
        body, receive = await self._peek_body(scope, receive)
        model = self._model_of(scope, body)
        ticket = f"{state.get('request_id') or uuid.uuid4().hex}-{uuid.uuid4().hex[:8]}"
        try:
            if model is not _NO_MODEL and not principal.allows_model(model):
                visible = [m for m in self.models() if principal.allows_model(m)]
                raise ModelNotFoundError(f"The model '{model}' does not exist. Served models: {', '.join(visible) or 'none'}.")
            headers = self.gate.admit(principal, ticket)
        except LlamaWrapperError as exc:
            error = from_exception(exc)
            self._audit(principal, where, model, None, error.status, start, usage, None)
            await error.response()(scope, receive, send)
            return
        status, version = 500, None
        capture = ContentCapture() if self.log_content else None
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

        async def send_with_headers(message: Message) -> None:
            nonlocal status, version
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *extra]
                version = Headers(raw=message["headers"]).get("x-model-version")
                if capture is not None:
                    capture.start(Headers(raw=message["headers"]).get("content-type", ""))
            elif message["type"] == "http.response.body" and capture is not None:
                capture.add(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            self.gate.release(principal, ticket)
            content = (request_text(body), capture.text()) if capture is not None else None
            self._audit(principal, where, model, version, status, start, usage, content)

    def _audit(self, principal: Principal, where: dict, model: Any, version: Optional[str], status: int, start: float,
               usage: dict, content: Optional[tuple[Optional[str], Optional[str]]]) -> None:
        fields = {**where, "model": None if model is _NO_MODEL else model, "version": version, **usage, "status": status,
                  "latency_ms": round((time.perf_counter() - start) * 1000, 2)}
        if content is not None:
            fields["prompt"], fields["completion"] = content
        self.gate.record_request(principal, **fields)

    async def _peek_body(self, scope: Scope, receive: Receive) -> tuple[Any, Receive]:
        """The JSON body of a POST (None when it is not JSON or too large to hold), and a
        ``receive`` that replays what was read, then passes on (so a disconnect is still seen)."""
        if scope["method"] != "POST" or scope["path"].startswith("/admin/"):
            return None, receive
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None, receive  # the body limit answers 413
        chunks: list[bytes] = []
        size, more, last = 0, True, None
        while more and size <= self.max_body_bytes:
            message = await receive()
            if message["type"] != "http.request":
                last = message
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        replay: list[Message] = [{"type": "http.request", "body": raw, "more_body": more and last is None}]
        if last is not None:
            replay.append(last)

        async def replaying() -> Message:
            return replay.pop(0) if replay else await receive()

        try:
            body = json.loads(raw) if not more and raw else None
        except ValueError:
            body = None
        return body, replaying

    def _model_of(self, scope: Scope, body: Any) -> Any:
        """The model a request names (None = the default model), or ``_NO_MODEL`` for routes
        that name none."""
        path = scope["path"]
        if scope["method"] == "GET" and path.startswith(_MODEL_PATH) and len(path) > len(_MODEL_PATH):
            return path[len(_MODEL_PATH):]
        if isinstance(body, dict):
            model = body.get("model")
            return model if isinstance(model, str) else self.default_model()
        return _NO_MODEL


_NO_MODEL = object()


def principal_of(request: Any) -> Principal:
    return request.scope.get("state", {}).get("principal", OPEN)


def model_allowed(request: Any, model: str) -> bool:
    """Whether the request's key may see ``model`` (lists filter with it)."""
    return principal_of(request).allows_model(model)


def charge_tokens(request: Any, prompt: int = 0, completion: int = 0) -> None:
    """Count tokens against the key's tpm and usage, and for the request's audit line."""
    usage = request.scope.get("state", {}).get("usage")
    if usage is not None:
        usage["prompt_tokens"] += prompt
        usage["completion_tokens"] += completion
    gate = getattr(request.app.state, "security", None)
    if gate is not None:
        gate.charge(principal_of(request), prompt, completion)


STREAM_CHARGE_EVERY = 16  # streamed tokens are charged in groups: a Redis round trip per token would cost more than the token


def charge_streamed(request: Any, tokens: int) -> None:
    """Count streamed completion tokens as they go out, in groups of ``STREAM_CHARGE_EVERY``."""
    state = request.scope.get("state", {})
    pending = state.get("stream_pending", 0) + tokens
    if pending >= STREAM_CHARGE_EVERY:
        charge_tokens(request, completion=pending)
        pending = 0
    state["stream_pending"] = pending


def settle_completion(request: Any, total: int) -> None:
    """At the end of a request: charge whatever of its ``total`` completion tokens is not charged yet."""
    usage = request.scope.get("state", {}).get("usage")
    charged = usage["completion_tokens"] if usage is not None else 0
    if total > charged:
        charge_tokens(request, completion=total - charged)


def require_admin(request: Any) -> None:
    """Let an operator route (``/admin/...``) through only for an admin key (403 otherwise). An open
    server (no keys at all) lets everyone through; keys given by flag or env are admin keys until
    a bootstrap ``admin_key`` is set."""
    if not principal_of(request).admin:
        raise PermissionDeniedError("This route needs an admin key.")


def record_admin_action(request: Any, action: str, **details: Any) -> None:
    """Append an admin action (model loaded, swapped, removed; key created, revoked) to the audit log."""
    gate = getattr(request.app.state, "security", None)
    if gate is None:
        return
    state = request.scope.get("state", {})
    client = (request.scope.get("client") or ("", 0))[0]
    gate.record_admin(principal_of(request), action, request_id=state.get("request_id"), client=client, **details)
