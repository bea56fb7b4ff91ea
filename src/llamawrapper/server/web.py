"""The web chat page: ``GET /`` serves ``static/index.html`` and ``GET /static/<file>`` its CSS and
JavaScript modules (shipped in the package, no CDN, no build step: the page works offline).

The page talks to the server only through the public OpenAI routes (``/v1/models``,
``/v1/chat/completions``, and the task routes when such models are served), with the API key the
user types in, so its own files are open (``PAGE_PATHS``) even when the API needs a key. A strict
Content-Security-Policy (scripts and styles from this origin only, no inline code) backs up the
page's rule of treating every model output as text."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.exceptions import HTTPException
from starlette.responses import Response

STATIC = Path(__file__).with_name("static")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_FILES = {p.name: p for p in sorted(STATIC.iterdir()) if p.is_file() and p.suffix in _TYPES} if STATIC.is_dir() else {}
PAGE_PATHS = frozenset({"/", *(f"/static/{name}" for name in _FILES)})
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

router = APIRouter(include_in_schema=False)


def _file(name: str) -> Response:
    path = _FILES.get(name)
    if path is None:
        raise HTTPException(404)
    return Response(path.read_bytes(), media_type=_TYPES[path.suffix],
                    headers={"Cache-Control": "no-cache", "Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff"})


@router.get("/")
async def page() -> Response:
    return _file("index.html")


@router.get("/static/{name}")
async def static_file(name: str) -> Response:
    return _file(name)
