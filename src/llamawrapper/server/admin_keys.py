"""Operator routes for keys and the audit log: ``/admin/keys`` (create, list, show with usage,
revoke) and ``/admin/audit`` (read). Thin: each handler checks the admin key, asks the
security gate and records the action; a secret is shown once, in the create response."""

from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from ..errors import InvalidRequestError, KeyNotFoundError
from . import protocol as P
from .auth import record_admin_action, require_admin

router = APIRouter(prefix="/admin", tags=["admin"])
_ERRORS = {code: {"model": P.ErrorResponse} for code in (400, 401, 403, 404, 503)}


def _gate(request: Request) -> Any:
    return request.app.state.security


@router.post("/keys", status_code=201, responses=_ERRORS)
async def create_key(request: Request) -> Response:
    """Make a key: ``{"name", "models"?, "rpm"?, "tpm"?, "max_parallel"?, "expires_at"?, "admin"?,
    "metadata"?}``. The response's ``key`` is the secret, shown this once."""
    require_admin(request)
    spec = await P.json_object(request)
    key, secret = await run_in_threadpool(_gate(request).create_key, spec)
    record_admin_action(request, "key.create", target=key.id, name=key.name, admin=key.admin, models=key.models)
    return JSONResponse({**key.public(), "key": secret}, status_code=201)


@router.get("/keys", responses=_ERRORS)
async def list_keys(request: Request) -> Response:
    require_admin(request)
    keys = await run_in_threadpool(_gate(request).store.list)
    return JSONResponse({"object": "list", "data": [k.public() for k in keys]})


@router.get("/keys/{key_id}", responses=_ERRORS)
async def show_key(key_id: str, request: Request) -> Response:
    require_admin(request)
    gate = _gate(request)
    usage = await run_in_threadpool(gate.usage, key_id)  # flushes this process's counts (and last use) first
    key = await run_in_threadpool(gate.store.get, key_id)
    if key is None:
        raise KeyNotFoundError(f"No key with id '{key_id}'.")
    return JSONResponse(key.public(usage))


@router.delete("/keys/{key_id}", responses=_ERRORS)
async def revoke_key(key_id: str, request: Request) -> Response:
    require_admin(request)
    key = await run_in_threadpool(_gate(request).revoke_key, key_id)
    record_admin_action(request, "key.revoke", target=key_id, name=key.name)
    return JSONResponse(key.public())


@router.get("/audit", responses=_ERRORS)
async def read_audit(request: Request, since: Optional[str] = None, key: Optional[str] = None, limit: int = 1000) -> Response:
    """Audit lines at or after ``since`` (ISO 8601 or epoch seconds), of key id ``key``; the last ``limit``."""
    require_admin(request)
    from ..security.audit import parse_time

    try:
        start = parse_time(since) if since else None
    except ValueError:
        raise InvalidRequestError(f"Invalid value for 'since': an ISO 8601 time or epoch seconds, got {since!r}.",
                                  param="since") from None
    if limit < 1:
        raise InvalidRequestError("Invalid value for 'limit': at least 1.", param="limit")
    lines = await run_in_threadpool(_gate(request).audit.read, start, key, limit)
    return JSONResponse({"object": "list", "data": lines})
