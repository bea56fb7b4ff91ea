"""HTTP errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Library exceptions are mapped to a status by their type (never by their message text):

    ContextLengthExceededError  400  invalid_request_error / context_length_exceeded
    InvalidRequestError         400  invalid_request_error (param named)
    ModelNotFoundError          404  invalid_request_error / model_not_found
    ModelConflictError          409  invalid_request_error / conflict (hash mismatch: sha256_mismatch)
    ModelUnavailableError       503  server_error / model_unavailable, with Retry-After
    QueueFullError              429  rate_limit_error / queue_full, with Retry-After
    RequestCancelledError       503  server_error / cancelled
    AuthenticationError         401  invalid_request_error / invalid_api_key, WWW-Authenticate
    PermissionDeniedError       403  invalid_request_error / permission_denied
    KeyNotFoundError            404  invalid_request_error / key_not_found
    RateLimitError              429  rate_limit_error / rate_limit_exceeded, Retry-After + x-ratelimit-*
    StateUnavailableError       503  service_unavailable_error / state_unavailable, Retry-After
    any other LlamaWrapperError 500  server_error

The server's own conditions (no key, not ready, body too large, unknown route) are ``APIError``s.
"""

from __future__ import annotations

import math
from typing import Optional

from starlette.responses import JSONResponse

from ..errors import (
    AuthenticationError,
    KeyNotFoundError,
    PermissionDeniedError,
    RateLimitError,
    StateUnavailableError,
    ContextLengthExceededError,
    InvalidRequestError,
    LlamaWrapperError,
    ModelConflictError,
    ModelHashMismatchError,
    ModelNotFoundError,
    ModelUnavailableError,
    QueueFullError,
    RequestCancelledError,
)


class APIError(Exception):
    """An error response: status, OpenAI ``type``/``code``/``param``, extra headers."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: Optional[str] = None,
                 param: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def not_ready(detail: str = "The model is still loading; retry shortly.") -> APIError:
    return APIError(503, detail, "service_unavailable_error", "model_not_ready", headers={"Retry-After": "1"})


def unauthorized(missing: bool) -> APIError:
    msg = ("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'." if missing
           else "Incorrect API key provided.")
    return APIError(401, msg, "invalid_request_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes.", "invalid_request_error", "request_too_large")


def from_exception(exc: BaseException, retry_after: Optional[int] = None) -> APIError:
    """The ``APIError`` for a library exception, chosen by its type."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthExceededError):
        return APIError(400, str(exc), "invalid_request_error", "context_length_exceeded", exc.param)
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), "invalid_request_error", "invalid_value", exc.param)
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, str(exc), "invalid_request_error", "model_not_found", "model")
    if isinstance(exc, ModelHashMismatchError):
        return APIError(409, str(exc), "invalid_request_error", "sha256_mismatch", "sha256")
    if isinstance(exc, ModelConflictError):
        return APIError(409, str(exc), "invalid_request_error", "conflict")
    if isinstance(exc, ModelUnavailableError):
        return APIError(503, str(exc), "server_error", "model_unavailable", "model", headers={"Retry-After": str(retry_after or 1)})
    if isinstance(exc, QueueFullError):
        seconds = retry_after if retry_after is not None else max(1, math.ceil(exc.retry_after))
        return APIError(429, str(exc), "rate_limit_error", "queue_full", headers={"Retry-After": str(seconds)})
    if isinstance(exc, RequestCancelledError):
        return APIError(503, str(exc), "server_error", "cancelled")
    if isinstance(exc, AuthenticationError):
        return APIError(401, str(exc), "invalid_request_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if isinstance(exc, PermissionDeniedError):
        return APIError(403, str(exc), "invalid_request_error", "permission_denied")
    if isinstance(exc, KeyNotFoundError):
        return APIError(404, str(exc), "invalid_request_error", "key_not_found", "id")
    if isinstance(exc, RateLimitError):
        return APIError(429, str(exc), "rate_limit_error", "rate_limit_exceeded", headers=dict(exc.headers))
    if isinstance(exc, StateUnavailableError):
        return APIError(503, str(exc), "service_unavailable_error", "state_unavailable", headers={"Retry-After": "1"})
    if isinstance(exc, LlamaWrapperError):
        return APIError(500, str(exc), "server_error", "generation_failed")
    return APIError(500, "The server had an error while processing your request.", "server_error", None)


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI's 422 body, reshaped as OpenAI's 400 naming the first bad parameter."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":  # the body itself does not parse
        return APIError(400, f"The request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}.",
                        "invalid_request_error", "invalid_json", None)
    param = ""
    for part in first.get("loc", ())[1:] if first.get("loc", ("",))[0] == "body" else first.get("loc", ()):
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    param = param or None
    msg = first.get("msg", "Invalid request body.")
    return APIError(400, f"Invalid value for '{param}': {msg}" if param else msg, "invalid_request_error", "invalid_value", param)
