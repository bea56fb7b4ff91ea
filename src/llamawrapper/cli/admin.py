"""``llamawrapper admin models ...``: drive a running server's model host over its admin routes
(list, put a version, promote, roll back, delete). Errors print the server's message."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional

import typer
from rich.table import Table

from . import app
from .common import err, fail, out

admin_app = typer.Typer(help="Operate a running server (admin routes; needs an admin key when keys are configured).",
                        no_args_is_help=True)
models_app = typer.Typer(help="Model versions on a running server: list, put, promote, rollback, delete.", no_args_is_help=True)
admin_app.add_typer(models_app, name="models")
app.add_typer(admin_app, name="admin")

Url = typer.Option(None, "--url", help="Server URL (default: LLAMAWRAPPER_URL or http://127.0.0.1:8000).")
Key = typer.Option(None, "--admin-key", help="Admin key (default: LLAMAWRAPPER_ADMIN_KEY).")
AsJson = typer.Option(False, "--json", help="Print the server's JSON answer.")


def _call(method: str, path: str, url: Optional[str], key: Optional[str], body: Optional[dict] = None) -> Any:
    import httpx

    base = (url or os.environ.get("LLAMAWRAPPER_URL") or "http://127.0.0.1:8000").rstrip("/")
    key = key or os.environ.get("LLAMAWRAPPER_ADMIN_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.request(method, base + path, json=body, headers=headers, timeout=60)
    except httpx.HTTPError as exc:
        fail(RuntimeError(f"cannot reach {base}: {exc}"))
    try:
        data = r.json()
    except ValueError:
        data = {"error": {"message": r.text}}
    if r.status_code >= 400:
        fail(RuntimeError(f"{r.status_code}: {data.get('error', {}).get('message', data)}"))
    return data


def _print(data: Any, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    else:
        out.print(" ".join(f"{k}={v}" for k, v in data.items()), highlight=False)


@models_app.command("list")
def list_models(url: Optional[str] = Url, admin_key: Optional[str] = Key, as_json: bool = AsJson) -> None:
    """Every name with its versions, status, traffic share, memory and requests in flight."""
    data = _call("GET", "/admin/models", url, admin_key)
    if as_json:
        _print(data, True)
        return
    table = Table(title="Models")
    for col in ("name", "version", "status", "traffic", "source", "sha256", "memory", "in flight", "error"):
        table.add_column(col)
    for m in data["data"]:
        for v in m["versions"]:
            table.add_row(m["name"], v["version"], v["status"], f"{v['traffic']:.2f}", v["source"], (v["sha256"] or "")[:12],
                          f"{v['memory_bytes'] / 1e6:.0f} MB", str(v["in_flight"]), v["error"] or "")
    out.print(table)


@models_app.command("put")
def put(name: str = typer.Argument(..., help="The served name (what requests say in 'model')."),
        source: str = typer.Argument(..., help="Alias, folder, .gguf file or hub id."),
        revision: Optional[str] = typer.Option(None, help="Hub revision."),
        sha256: Optional[str] = typer.Option(None, help="Refuse the source unless its sha256 is this."),
        dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16."),
        quantization: Optional[str] = typer.Option(None, help="int8, int4 or w8a8."),
        traffic: Optional[float] = typer.Option(None, help="Share of requests for this version (a canary) until promoted."),
        keep_alive: Optional[float] = typer.Option(None, "--keep-alive", help="Seconds idle before the name unloads."),
        wait: bool = typer.Option(False, "--wait", help="Wait until the version is ready (or failed)."),
        url: Optional[str] = Url, admin_key: Optional[str] = Key, as_json: bool = AsJson) -> None:
    """Load a new version of NAME (the first creates it); it takes the traffic once ready."""
    body = {k: v for k, v in dict(source=source, revision=revision, sha256=sha256, dtype=dtype, quantization=quantization,
                                  traffic=traffic, keep_alive=keep_alive).items() if v is not None}
    data = _call("PUT", f"/admin/models/{name}", url, admin_key, body)
    while wait and data.get("status") == "loading":
        time.sleep(0.5)
        info = _call("GET", f"/admin/models/{name}", url, admin_key)
        version = next(v for v in info["versions"] if v["version"] == data["version"])
        data = {"name": name, "version": version["version"], "status": version["status"], "error": version["error"]}
    _print(data, as_json)
    if data.get("status") == "failed":
        err.print(f"[bold red]error:[/] {data.get('error')}", highlight=False)
        raise typer.Exit(1)


@models_app.command("promote")
def promote(name: str, url: Optional[str] = Url, admin_key: Optional[str] = Key, as_json: bool = AsJson) -> None:
    """The canary of NAME takes all traffic."""
    _print(_call("POST", f"/admin/models/{name}/promote", url, admin_key), as_json)


@models_app.command("rollback")
def rollback(name: str, url: Optional[str] = Url, admin_key: Optional[str] = Key, as_json: bool = AsJson) -> None:
    """Drop NAME's canary, or go back to the version served before."""
    _print(_call("POST", f"/admin/models/{name}/rollback", url, admin_key), as_json)


@models_app.command("delete")
def delete(name: str, url: Optional[str] = Url, admin_key: Optional[str] = Key, as_json: bool = AsJson) -> None:
    """Stop serving NAME: in-flight requests finish, then its versions unload."""
    _print(_call("DELETE", f"/admin/models/{name}", url, admin_key), as_json)
