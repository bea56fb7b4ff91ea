"""Commands about keys and the audit log: ``keys create|list|show|revoke|encryption-key`` and
``audit verify``. Key commands work on the local store (``state_url``: SQLite under the cache
folder, or Redis) or, with ``--server URL``, through a running server's ``/admin`` routes with
an admin key (``--admin-key`` or ``LLAMAWRAPPER_ADMIN_KEY``)."""

from __future__ import annotations

import json
from typing import Any, List, Optional

import typer
from rich.table import Table

from . import app
from .common import LlamaWrapperError, err, fail, out

keys_app = typer.Typer(help="API keys: create (the secret is shown once), list, show, revoke.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log: verify its hash chain.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")

Server = typer.Option(None, "--server", help="A server's base URL: manage keys through its /admin routes (default: the local store).")
AdminKey = typer.Option(None, "--admin-key", envvar="LLAMAWRAPPER_ADMIN_KEY", show_envvar=True, help="Admin key for --server.")
AsJson = typer.Option(False, "--json", help="Print JSON.")


class _Remote:
    def __init__(self, url: str, admin_key: Optional[str]) -> None:
        import httpx

        self.client = httpx.Client(base_url=url.rstrip("/"), timeout=30,
                                   headers={"Authorization": f"Bearer {admin_key}"} if admin_key else {})

    def call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.client.request(method, path, **kw)
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text
            raise LlamaWrapperError(f"{r.status_code}: {message}")
        return r.json()


def _local() -> Any:
    from ..config import SecuritySettings
    from ..security.gate import open_gate

    return open_gate(SecuritySettings(), background=False)


def _print_keys(keys: list[dict], as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(keys))
        return
    table = Table("id", "name", "state", "models", "admin", "rpm", "tpm", "max_parallel", "hint")
    for k in keys:
        table.add_row(k["id"], k["name"], k["state"], ",".join(k["models"]) if k["models"] else "all", str(k["admin"]).lower(),
                      *(str(k[f]) if k[f] is not None else "-" for f in ("rpm", "tpm", "max_parallel")), k["hint"] + "…")
    out.print(table)


@keys_app.command("create")
def create(name: str = typer.Argument(..., help="A name for the key (who or what uses it)."),
           model: Optional[List[str]] = typer.Option(None, "--model", help="Allow only this model (repeatable; default: every model)."),
           rpm: Optional[int] = typer.Option(None, help="Requests per minute."),
           tpm: Optional[int] = typer.Option(None, help="Tokens (prompt + completion) per minute."),
           max_parallel: Optional[int] = typer.Option(None, "--max-parallel", help="Requests in flight at once."),
           expires_at: Optional[str] = typer.Option(None, "--expires-at", help="Expiry: ISO 8601 time or epoch seconds."),
           admin: bool = typer.Option(False, "--admin", help="May use the /admin routes."),
           server: Optional[str] = Server, admin_key: Optional[str] = AdminKey, as_json: bool = AsJson) -> None:
    """Create a key; its secret is printed once and never stored."""
    spec: dict[str, Any] = {"name": name, "models": model or None, "rpm": rpm, "tpm": tpm, "max_parallel": max_parallel,
                            "admin": admin}
    if expires_at is not None:
        spec["expires_at"] = float(expires_at) if expires_at.replace(".", "", 1).isdigit() else expires_at
    try:
        if server:
            result = _Remote(server, admin_key).call("POST", "/admin/keys", json=spec)
        else:
            gate = _local()
            try:
                key, secret = gate.create_key(spec)
                gate.audit.append("admin", action="key.create", key_id="cli:local", target=key.id, name=key.name,
                                  admin=key.admin, models=key.models)
            finally:
                gate.close()
            result = {**key.public(), "key": secret}
    except LlamaWrapperError as exc:
        fail(exc)
    if as_json:
        out.print_json(json.dumps(result))
    else:
        out.print(f"created {result['id']} ({result['name']})")
        out.print(result["key"], highlight=False, markup=False, soft_wrap=True)
        err.print("This secret is shown once; store it now.")


@keys_app.command("list")
def list_keys(server: Optional[str] = Server, admin_key: Optional[str] = AdminKey, as_json: bool = AsJson) -> None:
    """List keys (never their secrets)."""
    try:
        if server:
            keys = _Remote(server, admin_key).call("GET", "/admin/keys")["data"]
        else:
            gate = _local()
            try:
                keys = [k.public() for k in gate.store.list()]
            finally:
                gate.close()
    except LlamaWrapperError as exc:
        fail(exc)
    _print_keys(keys, as_json)


@keys_app.command("show")
def show(key_id: str, server: Optional[str] = Server, admin_key: Optional[str] = AdminKey) -> None:
    """One key with its usage so far."""
    from ..errors import KeyNotFoundError

    try:
        if server:
            result = _Remote(server, admin_key).call("GET", f"/admin/keys/{key_id}")
        else:
            gate = _local()
            try:
                usage = gate.usage(key_id)
                key = gate.store.get(key_id)
                if key is None:
                    raise KeyNotFoundError(f"No key with id '{key_id}'.")
                result = key.public(usage)
            finally:
                gate.close()
    except LlamaWrapperError as exc:
        fail(exc)
    out.print_json(json.dumps(result))


@keys_app.command("revoke")
def revoke(key_id: str, server: Optional[str] = Server, admin_key: Optional[str] = AdminKey) -> None:
    """Revoke a key (every server sharing the store refuses it within a second)."""
    try:
        if server:
            _Remote(server, admin_key).call("DELETE", f"/admin/keys/{key_id}")
        else:
            gate = _local()
            try:
                key = gate.revoke_key(key_id)
                gate.audit.append("admin", action="key.revoke", key_id="cli:local", target=key_id, name=key.name)
            finally:
                gate.close()
    except LlamaWrapperError as exc:
        fail(exc)
    out.print(f"revoked {key_id}")


@keys_app.command("encryption-key")
def encryption_key() -> None:
    """Print a new random 32-byte encryption key (base64) for encryption_key / encryption_key_file."""
    from ..security.crypto import new_key

    out.print(new_key(), highlight=False, markup=False)


@audit_app.command("verify")
def verify(file: Optional[str] = typer.Option(None, "--file", help="The audit log (default: the audit_file setting).")) -> None:
    """Check the audit log's hash chain; exit 1 naming the first bad line."""
    from pathlib import Path

    from ..config import SecuritySettings, home_dir
    from ..security.audit import AuditLog

    path = Path(file or SecuritySettings().audit_file or home_dir() / "audit" / "audit.jsonl").expanduser()
    result = AuditLog(path).verify()
    if result.ok:
        out.print(f"{path}: {result.describe()}", highlight=False, soft_wrap=True)
        return
    err.print(f"[bold red]audit log tampered:[/] {path}: {result.describe()}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)
