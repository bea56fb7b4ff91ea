"""The per-request security decisions, free of HTTP: who is calling (a stored key, a key given
by flag or env, the bootstrap admin key, or nobody on an open server), whether their scopes
allow a model, whether their limits admit one more request, and what goes in the audit log.

Lookups of stored keys are cached for ``KEY_CACHE_SECONDS`` (a revocation reaches every process
within that time, also across processes sharing Redis); usage counters are summed in memory and
written to the store once a second by a background thread, so a request costs no store write."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from ..errors import AuthenticationError, PermissionDeniedError, RateLimitError, StateUnavailableError
from .audit import AuditLog
from .keys import ApiKey, hash_secret, make_key
from .limits import Admission, Limiter
from .stores import KeyStore

log = logging.getLogger("llamawrapper.security")

KEY_CACHE_SECONDS = 0.5
FLUSH_SECONDS = 1.0
PRUNE_SECONDS = 6 * 3600.0
FAILURES_PER_SECOND = 10  # audit lines for refused keys, per process; the rest are counted


@dataclass
class Principal:
    """Who a request acts as. ``key`` is the stored key (scopes, limits) when there is one."""

    kind: str  # stored | flag | admin | open
    key_id: Optional[str]
    admin: bool
    key: Optional[ApiKey] = None

    def allows_model(self, model: Optional[str]) -> bool:
        return self.key is None or self.key.allows_model(model)


OPEN = Principal("open", None, True)


@dataclass
class _Pending:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_used_at: float = 0.0


@dataclass
class _FailureBudget:
    second: int = 0
    written: int = 0
    suppressed: int = 0


class Gate:
    """Authentication, scopes, limits, usage and audit for one server process."""

    def __init__(self, store: KeyStore, limiter: Limiter, audit: AuditLog, *, api_keys: Iterable[str] = (),
                 admin_key: Optional[str] = None, audit_requests: bool = True, retention_days: Optional[float] = None,
                 background: bool = True) -> None:
        self.store, self.limiter, self.audit = store, limiter, audit
        self.audit_requests = audit_requests
        self.retention_days = retention_days
        # flag/env keys: unscoped and unlimited; admins too unless a bootstrap admin key is set
        self._fixed: dict[str, Principal] = {}
        # their audit ids are positions, not fingerprints: a short hash of a weak flag key could be guessed
        for i, secret in enumerate(api_keys, 1):
            self._fixed[hash_secret(secret)] = Principal("flag", f"flag:{i}", admin_key is None)
        if admin_key:
            self._fixed[hash_secret(admin_key)] = Principal("admin", "admin:bootstrap", True)
        self._cache: dict[str, tuple[float, Optional[ApiKey]]] = {}
        self._stored_active: tuple[float, bool] = (0.0, False)
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._failures = _FailureBudget()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if background:
            self._thread = threading.Thread(target=self._background, name="llamawrapper-security", daemon=True)
            self._thread.start()

    # -- who ------------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """Keys are required once any exists (flag, env, bootstrap admin or stored, even revoked or
        expired: revoking the last key must not open the server)."""
        if self._fixed:
            return True
        at, active = self._stored_active
        now = time.monotonic()
        if now - at > KEY_CACHE_SECONDS:
            try:
                active = self.store.has_keys()
            except StateUnavailableError:
                active = True  # fail closed: with the store away, a stored key may exist
            self._stored_active = (now, active)
        return active

    def authenticate(self, authorization: Optional[str]) -> Principal:
        """The principal for an ``Authorization`` header value; raises ``AuthenticationError``."""
        if not authorization:
            raise AuthenticationError("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", missing=True)
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise AuthenticationError("Malformed Authorization header; expected 'Authorization: Bearer <key>'.")
        digest = hash_secret(token)
        fixed = self._fixed.get(digest)
        if fixed is not None:  # looked up by the secret's hash: timing reveals nothing about the secret
            return fixed
        key = self._lookup(digest)
        if key is None:
            raise AuthenticationError("Incorrect API key provided.")
        state = key.state()
        if state != "active":
            raise AuthenticationError(f"This API key is {state}.")
        return Principal("stored", key.id, key.admin, key)

    def _lookup(self, digest: str) -> Optional[ApiKey]:
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[0] < KEY_CACHE_SECONDS:
            return cached[1]
        key = self.store.by_hash(digest)  # StateUnavailableError propagates: fail closed
        if len(self._cache) > 10000:
            self._cache.clear()
        self._cache[digest] = (now, key)
        return key

    def require_admin(self, principal: Principal) -> None:
        if not principal.admin:
            raise PermissionDeniedError("This route needs an admin key.")

    # -- limits ---------------------------------------------------------------------------------------
    def admit(self, principal: Principal, ticket: str) -> dict[str, str]:
        """Rate-limit headers for an admitted request; ``RateLimitError`` (429) when over a limit,
        ``StateUnavailableError`` (503) when the shared state is away and the key is limited."""
        key = principal.key
        if key is None or not key.limited:
            return {}
        admission = self.limiter.admit(key, ticket)
        headers = rate_headers(key, admission)
        if not admission.admitted:
            wait = {"rpm": admission.requests_reset, "tpm": admission.tokens_reset}.get(admission.reason, 1.0)
            seconds = max(1, int(wait + 0.999))
            what = {"rpm": f"{key.rpm} requests", "tpm": f"{key.tpm} tokens"}.get(admission.reason)
            message = (f"Rate limit reached for this key: {what} per minute. Retry after {seconds} s." if what
                       else f"This key already has {key.max_parallel} requests in flight; retry when one finishes.")
            raise RateLimitError(message, seconds, {**headers, "Retry-After": str(seconds)})
        return headers

    def charge(self, principal: Principal, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        if principal.key is not None:
            self.limiter.charge(principal.key, prompt_tokens + completion_tokens)
            with self._lock:
                p = self._pending.setdefault(principal.key.id, _Pending())
                p.prompt_tokens += prompt_tokens
                p.completion_tokens += completion_tokens

    def release(self, principal: Principal, ticket: str) -> None:
        if principal.key is not None:
            self.limiter.release(principal.key, ticket)

    # -- audit ----------------------------------------------------------------------------------------
    def record_request(self, principal: Principal, **fields: Any) -> None:
        if principal.key is not None:
            with self._lock:
                p = self._pending.setdefault(principal.key.id, _Pending())
                p.requests += 1
                p.last_used_at = time.time()
        if self.audit_requests:
            self.audit.submit("request", key_id=principal.key_id, **fields)

    def record_failure(self, reason: str, **fields: Any) -> None:
        """An audit line for a refused key, at most ``FAILURES_PER_SECOND`` a second: a flood of
        bad keys is counted (``suppressed``) on the next line written, not written line by line."""
        now = int(time.time())
        with self._lock:
            b = self._failures
            if b.second != now:
                b.second, b.written = now, 0
            if b.written >= FAILURES_PER_SECOND:
                b.suppressed += 1
                return
            b.written += 1
            suppressed, b.suppressed = b.suppressed, 0
        self.audit.submit("auth.failed", reason=reason, suppressed_before=suppressed or None, **fields)

    def record_admin(self, principal: Principal, action: str, **details: Any) -> None:
        self.audit.append("admin", action=action, key_id=principal.key_id, **details)

    # -- keys -----------------------------------------------------------------------------------------
    def create_key(self, spec: dict[str, Any]) -> tuple[ApiKey, str]:
        key, secret = make_key(spec)
        self.store.add(key)
        self._stored_active = (0.0, False)
        return key, secret

    def revoke_key(self, key_id: str) -> ApiKey:
        key = self.store.revoke(key_id, time.time())
        self._cache = {d: v for d, v in self._cache.items() if v[1] is None or v[1].id != key_id}
        return key

    def usage(self, key_id: str) -> dict[str, Any]:
        self.flush()
        return self.store.usage(key_id)

    # -- background -----------------------------------------------------------------------------------
    def flush(self) -> None:
        with self._flush_lock:  # one flush at a time: a reader's flush waits for the background one's write
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            self.store.add_usage({k: vars(p) for k, p in pending.items()})
        except StateUnavailableError as exc:
            log.warning("usage not recorded (will retry): %s", exc)
            with self._lock:
                for k, p in pending.items():
                    q = self._pending.setdefault(k, _Pending())
                    q.requests += p.requests
                    q.prompt_tokens += p.prompt_tokens
                    q.completion_tokens += p.completion_tokens
                    q.last_used_at = max(q.last_used_at, p.last_used_at)

    def prune(self) -> int:
        from .retention import prune_audit

        return prune_audit(self.audit, self.retention_days)

    def _background(self) -> None:
        last_prune = time.monotonic()
        self.prune()
        while not self._stop.wait(FLUSH_SECONDS):
            self.flush()
            if time.monotonic() - last_prune > PRUNE_SECONDS:
                last_prune = time.monotonic()
                self.prune()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()
        self.audit.close()
        self.store.close()
        close = getattr(self.limiter, "close", None)
        if close is not None:
            close()


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``1m0s``, ``6s``, ``250ms``."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    minutes, secs = divmod(int(seconds + 0.999), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rate_headers(key: ApiKey, a: Admission) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the limits the key has."""
    headers: dict[str, str] = {}
    if key.rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(key.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, key.rpm - a.requests))
        headers["x-ratelimit-reset-requests"] = _duration(a.requests_reset)
    if key.tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(key.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, key.tpm - a.tokens))
        headers["x-ratelimit-reset-tokens"] = _duration(a.tokens_reset)
    return headers


def open_gate(security: Any, api_keys: Iterable[str] = (), folder: Any = None, background: bool = True) -> Gate:
    """The gate for ``SecuritySettings``: the key store and limiter of ``state_url`` (SQLite and
    in-process limits by default, Redis shared), the audit log file."""
    from pathlib import Path

    from ..config import home_dir
    from .limits import LocalLimiter, RedisLimiter
    from .stores import open_key_store

    folder = Path(folder) if folder is not None else home_dir()
    store = open_key_store(security.state_url, folder)
    url = security.state_url or ""
    limiter: Limiter = RedisLimiter(url) if url.startswith(("redis://", "rediss://", "unix://")) else LocalLimiter()
    audit = AuditLog(Path(security.audit_file).expanduser() if security.audit_file else folder / "audit" / "audit.jsonl")
    return Gate(store, limiter, audit, api_keys=api_keys, admin_key=security.admin_key,
                audit_requests=security.audit_requests, retention_days=security.retention_days, background=background)
