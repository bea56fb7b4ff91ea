"""API keys as records: what a key may do (``models`` allow-list, ``admin``), its limits (``rpm``,
``tpm``, ``max_parallel``), its life (``expires_at``, ``revoked_at``) and its usage.

A secret is ``lw-`` + 32 random bytes in base64url, shown once when the key is made; only its
sha256 is ever stored. A plain sha256 is enough here (no slow password hash): the secret has 256
bits of entropy, so no dictionary or brute force can find a preimage, and a fast hash keeps the
per-request lookup cheap."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..errors import InvalidRequestError

SECRET_PREFIX = "lw-"
SECRET_BYTES = 32
CREATE_FIELDS = ("name", "models", "rpm", "tpm", "max_parallel", "expires_at", "admin", "metadata")
LIMIT_FIELDS = ("rpm", "tpm", "max_parallel")


def new_secret() -> str:
    return SECRET_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=").decode()


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


@dataclass
class ApiKey:
    """One stored key. ``models`` None = every model; a limit None = unlimited."""

    id: str
    name: str
    secret_hash: str
    hint: str  # the secret's first characters, so an operator can tell keys apart; never enough to use
    models: Optional[list[str]] = None
    admin: bool = False
    rpm: Optional[int] = None
    tpm: Optional[int] = None
    max_parallel: Optional[int] = None
    expires_at: Optional[float] = None
    created_at: float = field(default_factory=time.time)
    last_used_at: Optional[float] = None
    revoked_at: Optional[float] = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def limited(self) -> bool:
        return any(getattr(self, f) is not None for f in LIMIT_FIELDS)

    def state(self, now: Optional[float] = None) -> str:
        """``active``, ``revoked`` or ``expired``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and (now or time.time()) >= self.expires_at:
            return "expired"
        return "active"

    def allows_model(self, model: Optional[str]) -> bool:
        """A ``name:adapter`` or ``name@version`` request is allowed when its full name or its base
        name is on the list."""
        if self.models is None:
            return True
        if model is None:
            return False
        base = model.rpartition(":")[0] if ":" in model else model
        return model in self.models or base in self.models or base.partition("@")[0] in self.models

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "ApiKey":
        return cls(**{k: v for k, v in record.items() if k in cls.__dataclass_fields__})

    def public(self, usage: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """What the admin routes and CLI show: everything but the hash."""
        out = {k: v for k, v in asdict(self).items() if k != "secret_hash"}
        out["object"] = "api_key"
        out["state"] = self.state()
        if usage is not None:
            out["usage"] = usage
        return out


def _int_limit(name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequestError(f"Invalid value for '{name}': a positive integer or null, got {value!r}.", param=name)
    return value


def _timestamp(value: Any, now: float) -> Optional[float]:
    """``expires_at`` as epoch seconds or an ISO 8601 time (UTC when no offset is given)."""
    if value is None:
        return None
    if isinstance(value, str):
        from datetime import datetime, timezone

        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidRequestError(f"Invalid value for 'expires_at': not an ISO 8601 time: {value!r}.", param="expires_at") from None
        seconds = (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise InvalidRequestError("Invalid value for 'expires_at': epoch seconds or an ISO 8601 time.", param="expires_at")
    if seconds <= now:
        raise InvalidRequestError("Invalid value for 'expires_at': it is in the past.", param="expires_at")
    return seconds


def make_key(spec: dict[str, Any], now: Optional[float] = None) -> tuple[ApiKey, str]:
    """A new key and its secret from a create request (``POST /admin/keys``, ``keys create``);
    every field is checked and a bad one is named."""
    now = time.time() if now is None else now
    unknown = sorted(set(spec) - set(CREATE_FIELDS))
    if unknown:
        raise InvalidRequestError(f"Unknown field '{unknown[0]}'; keys take: {', '.join(CREATE_FIELDS)}.", param=unknown[0])
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise InvalidRequestError("Invalid value for 'name': a non-empty string of at most 200 characters.", param="name")
    models = spec.get("models")
    if models is not None and (not isinstance(models, list) or not models
                               or not all(isinstance(m, str) and m.strip() for m in models)):
        raise InvalidRequestError("Invalid value for 'models': a non-empty list of model names, or null for every model.",
                                  param="models")
    admin = spec.get("admin", False)
    if not isinstance(admin, bool):
        raise InvalidRequestError("Invalid value for 'admin': true or false.", param="admin")
    metadata = spec.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InvalidRequestError("Invalid value for 'metadata': a JSON object.", param="metadata")
    secret = new_secret()
    key = ApiKey(id=new_key_id(), name=name.strip(), secret_hash=hash_secret(secret), hint=secret[:7],
                 models=[m.strip() for m in models] if models is not None else None, admin=admin,
                 rpm=_int_limit("rpm", spec.get("rpm")), tpm=_int_limit("tpm", spec.get("tpm")),
                 max_parallel=_int_limit("max_parallel", spec.get("max_parallel")),
                 expires_at=_timestamp(spec.get("expires_at"), now), created_at=now, metadata=metadata)
    return key, secret
