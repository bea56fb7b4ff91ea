"""Where keys and their usage live: SQLite under the cache folder (the default) or Redis for
``state_url=redis://...``, so several server processes share keys and revocations.

Both stores keep the same records (``ApiKey.to_record()``, JSON) and the same usage counters
(requests, prompt and completion tokens); secrets never reach them, only their hashes. Redis
errors become ``StateUnavailableError`` so callers can fail closed."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

from ..errors import InvalidRequestError, KeyNotFoundError, StateUnavailableError
from .keys import ApiKey

USAGE_FIELDS = ("requests", "prompt_tokens", "completion_tokens")


class KeyStore(Protocol):
    url: str

    def add(self, key: ApiKey) -> None: ...
    def get(self, key_id: str) -> Optional[ApiKey]: ...
    def by_hash(self, secret_hash: str) -> Optional[ApiKey]: ...
    def list(self) -> list[ApiKey]: ...
    def revoke(self, key_id: str, now: float) -> ApiKey: ...
    def has_keys(self) -> bool: ...
    def add_usage(self, deltas: dict[str, dict[str, float]]) -> None: ...
    def usage(self, key_id: str) -> dict[str, Any]: ...
    def close(self) -> None: ...


class SQLiteKeyStore:
    """One SQLite file (WAL), safe across threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, secret_hash TEXT UNIQUE NOT NULL, "
                         "record TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS usage (id TEXT PRIMARY KEY, requests INTEGER NOT NULL DEFAULT 0, "
                         "prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0, "
                         "last_used_at REAL)")
        try:
            self.path.chmod(0o600)
        except OSError:
            pass

    def _one(self, sql: str, args: tuple) -> Optional[ApiKey]:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return self._key(row[0], row[1]) if row else None

    def _key(self, record: str, last_used: Optional[float]) -> ApiKey:
        key = ApiKey.from_record(json.loads(record))
        key.last_used_at = last_used
        return key

    _SELECT = "SELECT k.record, u.last_used_at FROM keys k LEFT JOIN usage u ON u.id = k.id"

    def add(self, key: ApiKey) -> None:
        with self._lock:
            self._db.execute("INSERT INTO keys VALUES (?, ?, ?)", (key.id, key.secret_hash, json.dumps(key.to_record())))

    def get(self, key_id: str) -> Optional[ApiKey]:
        return self._one(self._SELECT + " WHERE k.id = ?", (key_id,))

    def by_hash(self, secret_hash: str) -> Optional[ApiKey]:
        return self._one(self._SELECT + " WHERE k.secret_hash = ?", (secret_hash,))

    def list(self) -> list[ApiKey]:
        with self._lock:
            rows = self._db.execute(self._SELECT + " ORDER BY json_extract(k.record, '$.created_at')").fetchall()
        return [self._key(r, u) for r, u in rows]

    def revoke(self, key_id: str, now: float) -> ApiKey:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT record FROM keys WHERE id = ?", (key_id,)).fetchone()
                if row is None:
                    raise KeyNotFoundError(f"No key with id '{key_id}'.")
                record = json.loads(row[0])
                record["revoked_at"] = record.get("revoked_at") or now
                self._db.execute("UPDATE keys SET record = ? WHERE id = ?", (json.dumps(record), key_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return ApiKey.from_record(record)

    def has_keys(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM keys LIMIT 1").fetchone() is not None

    def add_usage(self, deltas: dict[str, dict[str, float]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for key_id, d in deltas.items():
                    self._db.execute(
                        "INSERT INTO usage (id, requests, prompt_tokens, completion_tokens, last_used_at) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT(id) DO UPDATE SET requests = requests + excluded.requests, "
                        "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                        "completion_tokens = completion_tokens + excluded.completion_tokens, "
                        "last_used_at = MAX(COALESCE(last_used_at, 0), excluded.last_used_at)",
                        (key_id, int(d.get("requests", 0)), int(d.get("prompt_tokens", 0)), int(d.get("completion_tokens", 0)),
                         d.get("last_used_at")))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def usage(self, key_id: str) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute("SELECT requests, prompt_tokens, completion_tokens FROM usage WHERE id = ?", (key_id,)).fetchone()
        return dict(zip(USAGE_FIELDS, row or (0, 0, 0)))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RedisKeyStore:
    """Keys as JSON strings (``key:<id>``), an index from hash to id, usage as Redis hashes."""

    def __init__(self, url: str, prefix: str = "llamawrapper:sec:") -> None:
        import redis

        self.url, self.prefix = url, prefix
        self._redis_errors = (redis.ConnectionError, redis.TimeoutError)
        self._r = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=5)

    def _call(self, fn, *args: Any) -> Any:
        try:
            return fn(*args)
        except self._redis_errors as exc:
            raise StateUnavailableError(f"The key store (Redis) is unreachable: {exc}") from None

    def _k(self, kind: str, ident: str) -> str:
        return f"{self.prefix}{kind}:{ident}"

    def _decode(self, raw: Optional[bytes], last_used: Optional[bytes] = None) -> Optional[ApiKey]:
        if raw is None:
            return None
        key = ApiKey.from_record(json.loads(raw))
        key.last_used_at = float(last_used) if last_used else None
        return key

    def add(self, key: ApiKey) -> None:
        def run() -> None:
            pipe = self._r.pipeline()
            pipe.set(self._k("key", key.id), json.dumps(key.to_record()))
            pipe.set(self._k("hash", key.secret_hash), key.id)
            pipe.sadd(self.prefix + "ids", key.id)
            pipe.execute()
        self._call(run)

    def get(self, key_id: str) -> Optional[ApiKey]:
        raw, last = self._call(lambda: self._r.pipeline().get(self._k("key", key_id))
                               .hget(self._k("usage", key_id), "last_used_at").execute())
        return self._decode(raw, last)

    def by_hash(self, secret_hash: str) -> Optional[ApiKey]:
        key_id = self._call(self._r.get, self._k("hash", secret_hash))
        return self.get(key_id.decode()) if key_id else None

    def _ids(self) -> Iterator[str]:
        return (i.decode() for i in self._call(self._r.smembers, self.prefix + "ids"))

    def list(self) -> list[ApiKey]:
        keys = [k for k in (self.get(i) for i in self._ids()) if k is not None]
        return sorted(keys, key=lambda k: k.created_at)

    def revoke(self, key_id: str, now: float) -> ApiKey:
        key = self.get(key_id)
        if key is None:
            raise KeyNotFoundError(f"No key with id '{key_id}'.")
        key.revoked_at = key.revoked_at or now
        record = key.to_record()
        record["last_used_at"] = None
        self._call(self._r.set, self._k("key", key_id), json.dumps(record))
        return key

    def has_keys(self) -> bool:
        return bool(self._call(self._r.scard, self.prefix + "ids"))

    def add_usage(self, deltas: dict[str, dict[str, float]]) -> None:
        def run() -> None:
            pipe = self._r.pipeline()
            for key_id, d in deltas.items():
                name = self._k("usage", key_id)
                for f in USAGE_FIELDS:
                    if d.get(f):
                        pipe.hincrby(name, f, int(d[f]))
                if d.get("last_used_at"):
                    pipe.hset(name, "last_used_at", d["last_used_at"])
            pipe.execute()
        self._call(run)

    def usage(self, key_id: str) -> dict[str, Any]:
        raw = self._call(self._r.hgetall, self._k("usage", key_id))
        return {f: int(raw.get(f.encode(), 0)) for f in USAGE_FIELDS}

    def close(self) -> None:
        self._r.close()


def open_key_store(state_url: Optional[str], folder: Path) -> KeyStore:
    """``None``/``sqlite://`` → ``folder/keys.sqlite``; ``sqlite:///path`` → that file; ``redis://`` → Redis."""
    if not state_url or state_url == "sqlite://":
        return SQLiteKeyStore(Path(folder) / "keys.sqlite")
    if state_url.startswith("sqlite:///"):
        return SQLiteKeyStore(Path(state_url[len("sqlite:///") - 1:]))
    if state_url.startswith(("redis://", "rediss://", "unix://")):
        return RedisKeyStore(state_url)
    raise InvalidRequestError(f"state_url must be sqlite:///path or redis://host:port/db; got {state_url!r}.", param="state_url")
