"""Operator routes for models (``/admin/models``): list versions, put a new version (hot swap or
canary), promote, roll back, remove, and runtime LoRA adapters. Thin: each handler checks the
admin key, calls the ``ModelHost`` and records the action; the host does the rest."""

from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from ..errors import InvalidRequestError
from . import protocol as P
from .auth import record_admin_action, require_admin

router = APIRouter(prefix="/admin/models", tags=["admin"])
_ERRORS = {code: {"model": P.ErrorResponse} for code in (400, 401, 403, 404, 409)}
_HOST_FIELDS = ("traffic", "keep_alive")


def _host(request: Request) -> Any:
    return request.app.state.lw.host


@router.get("", responses=_ERRORS)
async def list_models(request: Request) -> Response:
    require_admin(request)
    return JSONResponse({"object": "list", "data": _host(request).models()})


@router.get("/{name}", responses=_ERRORS)
async def get_model(name: str, request: Request) -> Response:
    require_admin(request)
    return JSONResponse(_host(request).describe(name))


@router.put("/{name}", status_code=202, responses=_ERRORS)
async def put_model(name: str, request: Request) -> Response:
    """Load a new version of ``name`` (the first creates it); 202 at once, status ``loading``."""
    require_admin(request)
    body = await P.json_object(request)
    options = {k: body.pop(k) for k in _HOST_FIELDS if k in body}
    result = await _put(_host(request), name, body, **options)
    record_admin_action(request, "model.put", name=name, version=result["version"], source=body.get("source"), **options)
    return JSONResponse(result, status_code=202)


@router.post("/{name}/promote", responses=_ERRORS)
async def promote(name: str, request: Request) -> Response:
    require_admin(request)
    result = _host(request).promote(name)
    record_admin_action(request, "model.promote", name=name, version=result["version"])
    return JSONResponse(result)


@router.post("/{name}/rollback", status_code=202, responses=_ERRORS)
async def rollback(name: str, request: Request) -> Response:
    require_admin(request)
    result = _host(request).rollback(name)
    record_admin_action(request, "model.rollback", name=name, version=result["version"])
    return JSONResponse(result, status_code=202)


@router.delete("/{name}", responses=_ERRORS)
async def remove(name: str, request: Request) -> Response:
    require_admin(request)
    result = _host(request).remove(name)
    record_admin_action(request, "model.remove", name=name)
    return JSONResponse(result)


@router.put("/{name}/adapters/{adapter}", status_code=202, responses=_ERRORS)
async def put_adapter(name: str, adapter: str, request: Request) -> Response:
    """Add or replace a LoRA adapter: a new version with the adapter, swapped in like any other."""
    require_admin(request)
    path = (await P.json_object(request)).get("path")
    from pathlib import Path

    if not isinstance(path, str) or not path or not Path(path).expanduser().is_dir():
        raise InvalidRequestError(f"'path' must name an existing adapter folder; got {path!r}.", param="path")
    return await _with_adapters(request, name, adapter, path)


@router.delete("/{name}/adapters/{adapter}", status_code=202, responses=_ERRORS)
async def delete_adapter(name: str, adapter: str, request: Request) -> Response:
    require_admin(request)
    return await _with_adapters(request, name, adapter, None)


async def _put(host: Any, name: str, spec: dict, **options: Any) -> dict:
    """``host.put`` off the event loop (it hashes a pinned source); an unknown source is a 404
    naming ``source``, not the request's ``model``."""
    from ..errors import ModelNotFoundError
    from .errors import APIError

    try:
        return await run_in_threadpool(host.put, name, spec, **options)
    except ModelNotFoundError as exc:
        raise APIError(404, str(exc), "invalid_request_error", "model_not_found", "source") from exc


async def _with_adapters(request: Request, name: str, adapter: str, path: Optional[str]) -> Response:
    from ..errors import ModelNotFoundError

    host = _host(request)
    current = host.current_spec(name)
    adapters = dict(current.adapters)
    if path is None and adapter not in adapters:
        raise ModelNotFoundError(f"'{name}' has no adapter '{adapter}'; adapters: {', '.join(sorted(adapters)) or 'none'}.")
    if path is None:
        adapters.pop(adapter)
    else:
        adapters[adapter] = path
    spec = {**current.to_dict(), "adapters": adapters}
    result = await _put(host, name, spec)
    record_admin_action(request, "model.adapter." + ("put" if path else "delete"), name=name, adapter=adapter,
                        version=result["version"])
    return JSONResponse(result, status_code=202)
