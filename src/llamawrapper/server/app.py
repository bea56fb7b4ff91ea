"""The FastAPI app factory: routes, middleware (request ids and access logs, API keys, body
limit), OpenAI-shaped error handlers, metrics, and the lifespan that starts loading models
in the background once the server is up and closes their engines on shutdown."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from .. import __version__
from ..config import EngineSettings, SecuritySettings, ServerSettings
from ..errors import LlamaWrapperError
from .auth import OPEN_PATHS, SecurityMiddleware
from .errors import APIError, from_exception, validation_error
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, RequestContextMiddleware
from ..models.host import ModelHost
from ..models.loaders import default_loader
from .admin_models import router as admin_models_router
from .admin_keys import router as admin_keys_router
from .auth import record_admin_action  # noqa: F401  (the audit seam the admin routes use)
from .routes import router
from .tracing import TracingMiddleware, from_settings as tracing_from_settings
from .web import PAGE_PATHS, router as web_router
from .task_routes import router as task_router


@dataclass
class ServerState:
    settings: ServerSettings
    host: ModelHost
    metrics: Metrics
    draining: bool = False


def create_app(settings: Optional[ServerSettings] = None, engine: Optional[EngineSettings] = None,
               host: Optional[ModelHost] = None, security: Optional[SecuritySettings] = None) -> FastAPI:
    """An app serving ``settings.models`` (and ``settings.models_file``) through a ``ModelHost``;
    loading starts in the background when the app starts (lifespan)."""
    settings = settings or ServerSettings()
    host = host or ModelHost(default_loader(dtype=settings.dtype, quantization=settings.quantization, engine=engine),
                             keep_alive=settings.keep_alive, max_loaded_models=settings.max_loaded_models,
                             drain_timeout=max(settings.drain_timeout, 1.0) * 20)
    entries = served_entries(settings)  # bad specs or files fail here, before the port opens
    state = ServerState(settings, host, Metrics(host.engines))
    security = security or SecuritySettings()
    gate = _open_security(settings, security)  # a wrong encryption key fails here, before the port opens
    tracing = tracing_from_settings(settings, log_content=security.log_content)  # None unless an OTLP endpoint is set

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for name, spec, options in entries:
            host.put(name, spec, **options)
        try:
            yield
        finally:
            host.close()
            gate.close()
            if tracing is not None:
                tracing.shutdown()

    app = FastAPI(title="LlamaWrapper", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat and completion endpoints over local models.")
    app.state.lw = state
    app.state.security = gate
    app.include_router(router)
    app.include_router(task_router)
    app.include_router(admin_models_router)
    app.include_router(admin_keys_router)
    app.include_router(web_router)
    _install_error_handlers(app, settings)
    # added innermost first: the request context wraps everything, then the trace span, then
    # auth (the page's files are open: the page asks for the key), then the body limit
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(SecurityMiddleware, gate=gate, max_body_bytes=settings.max_body_bytes, models=host.names,
                       default_model=lambda: host.default, log_content=security.log_content,
                       open_paths=OPEN_PATHS | PAGE_PATHS)
    app.add_middleware(TracingMiddleware, tracing=tracing)
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)
    app.openapi = lambda: _openapi(app)
    return app


def _open_security(settings: ServerSettings, security: SecuritySettings) -> Any:
    from ..security.gate import open_gate
    from ..security.startup import configure_process

    configure_process(security)
    return open_gate(security, api_keys=settings.api_keys)


def served_entries(settings: ServerSettings) -> list[tuple[str, Any, dict]]:
    """(name, spec, options) for every model to serve: ``serve`` arguments (``source`` or
    ``name=source``), then the models file's tables."""
    from ..models.modelsfile import read_models_file, split_serve_spec

    entries = [(*split_serve_spec(spec), {}) for spec in settings.models]
    if settings.models_file:
        entries += read_models_file(settings.models_file)
    return entries


def _install_error_handlers(app: FastAPI, settings: ServerSettings) -> None:
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    async def library_error(request: Request, exc: LlamaWrapperError):
        return from_exception(exc, settings.retry_after).response()

    async def invalid_body(request: Request, exc: RequestValidationError):
        return validation_error(list(exc.errors())).response()

    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        message = f"Unknown route {request.method} {request.url.path}." if exc.status_code == 404 else str(exc.detail)
        return APIError(exc.status_code, message, "invalid_request_error", code, headers=dict(exc.headers or {})).response()

    async def unexpected(request: Request, exc: Exception):
        return from_exception(exc).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(LlamaWrapperError, library_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema without its 422 responses: validation errors are OpenAI-style 400s."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path in schema.get("paths", {}).values():
        for op in path.values():
            responses = op.get("responses", {})
            responses.pop("422", None)
            if op.get("requestBody") and "400" not in responses:
                responses["400"] = {"description": "Invalid request",
                                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    schemas = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    app.openapi_schema = schema
    return schema
