"""The response cache: exact-match answers for deterministic requests (temperature 0, or a
fixed seed), replayed event by event so a cached stream is still a stream.

Key: sha256 over the model's weights hash (manifest ``source_sha256``, else its folder), its
revision, dtype/quantization, adapter, the chat template, the rendered prompt's token ids, every
sampling parameter and the output constraint (grammar, tools). Value: the engine's raw events
(text, token ids, finish reason, usage), so plugins' post-processing still runs on a hit.

Backends: SQLite under the cache folder (WAL journal; each put is one transaction, so a killed
process leaves either the old or the new row, never a torn one) and Redis for
``redis://`` URLs. Both honour a TTL and a size bound (entries and bytes; oldest use evicted).
A Redis that cannot be reached (stopped, 2 s without an answer) does not fail the request: the
lookup is skipped (the request runs on the engine, ``x-cache: miss``) and so is the store,
until Redis answers again (counted in ``stats()["skipped"]``, logged once per outage).

Encryption at rest: with an encryption key (``llamawrapper.security.crypto``) every value is
sealed with AES-GCM, its cache key as associated data; the store keeps an encrypted marker, so
opening it without the key, or with another key, fails at once with ``EncryptionKeyError``
instead of serving wrong data. Plaintext entries found when encryption is first switched on are
dropped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import sqlite3
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Protocol

from ..errors import InvalidRequestError, StateUnavailableError
from ..types import SamplingParams, StreamEvent, Usage

KEY_VERSION = 1
log = logging.getLogger("llamawrapper.cache")


def is_deterministic(params: SamplingParams) -> bool:
    # log-probabilities are not stored with the events: such requests always run
    return (params.temperature == 0.0 or params.seed is not None) and not params.logprobs


def cache_key(model_identity: dict[str, Any], prompt_ids: list[int], params: SamplingParams, constraint: Any = None) -> str:
    """A stable hex key over everything that decides the answer."""
    payload = {"v": KEY_VERSION, "model": model_identity, "prompt": list(prompt_ids), "params": asdict(params),
               "constraint": constraint}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def encode_events(events: list[StreamEvent]) -> bytes:
    rows = []
    for e in events:
        row: dict[str, Any] = {"t": e.text, "ids": e.token_ids}
        if e.finish_reason is not None:
            row["f"] = e.finish_reason
        if e.usage is not None:
            row["u"] = [e.usage.prompt_tokens, e.usage.completion_tokens, e.usage.cached_tokens]
        rows.append(row)
    return json.dumps(rows, separators=(",", ":")).encode()


def decode_events(blob: bytes) -> list[StreamEvent]:
    return [StreamEvent(r["t"], r["ids"], r.get("f"), Usage(*r["u"]) if "u" in r else None) for r in json.loads(blob)]


class CacheBackend(Protocol):
    def get(self, key: str) -> Optional[bytes]: ...
    def put(self, key: str, value: bytes) -> None: ...
    def clear(self) -> None: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...
    def get_meta(self, name: str) -> Optional[bytes]: ...
    def put_meta(self, name: str, value: bytes) -> None: ...


class SQLiteCache:
    """One SQLite file, safe across threads and processes."""

    def __init__(self, path: Path, ttl: Optional[float] = None, max_entries: int = 10000, max_bytes: int = 256 << 20) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ttl, self.max_entries, self.max_bytes = ttl, max_entries, max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value BLOB NOT NULL, "
                         "created REAL NOT NULL, used REAL NOT NULL, size INTEGER NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS responses_used ON responses(used)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
        if self.ttl is not None:  # expired rows go at open too (the retention setting caps the TTL)
            self._db.execute("DELETE FROM responses WHERE created < ?", (time.time() - self.ttl,))

    def get_meta(self, name: str) -> Optional[bytes]:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return bytes(row[0]) if row else None

    def put_meta(self, name: str, value: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def get(self, key: str) -> Optional[bytes]:
        now = time.time()
        with self._lock:
            row = self._db.execute("SELECT value, created FROM responses WHERE key=?", (key,)).fetchone()
            if row is None:
                return None
            if self.ttl is not None and now - row[1] > self.ttl:
                self._db.execute("DELETE FROM responses WHERE key=?", (key,))
                return None
            self._db.execute("UPDATE responses SET used=? WHERE key=?", (now, key))
            return bytes(row[0])

    def put(self, key: str, value: bytes) -> None:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)", (key, value, now, now, len(value)))
                if self.ttl is not None:
                    self._db.execute("DELETE FROM responses WHERE created < ?", (now - self.ttl,))
                count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM responses").fetchone()
                while count > self.max_entries or size > self.max_bytes:
                    oldest = self._db.execute("SELECT key, size FROM responses ORDER BY used LIMIT 1").fetchone()
                    if oldest is None:
                        break
                    self._db.execute("DELETE FROM responses WHERE key=?", (oldest[0],))
                    count, size = count - 1, size - oldest[1]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def clear(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM responses")

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _redis_reachable(method: Any) -> Any:
    """For ``RedisCache``'s methods: Redis errors become ``StateUnavailableError`` (``ResponseCache``
    then skips the cache for that request)."""
    @functools.wraps(method)
    def call(self: "RedisCache", *args: Any) -> Any:
        try:
            return method(self, *args)
        except self._errors as exc:
            raise StateUnavailableError(f"The response cache (Redis) is unreachable: {exc}") from None
    return call


class RedisCache:
    """Entries as Redis strings with an expiry; a sorted set by last use bounds their number."""

    def __init__(self, url: str, ttl: Optional[float] = None, max_entries: int = 10000, prefix: str = "llamawrapper:rc:") -> None:
        try:
            import redis
        except ImportError as exc:
            raise InvalidRequestError("cache_url=redis://... needs the 'redis' package (pip install redis).", param="cache_url") from exc
        self.ttl, self.max_entries, self.prefix = ttl, max_entries, prefix
        self._r = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=5)
        self._index = prefix + "index"
        self._errors = (redis.ConnectionError, redis.TimeoutError)

    @_redis_reachable
    def get_meta(self, name: str) -> Optional[bytes]:
        return self._r.get(self.prefix + "meta:" + name)

    @_redis_reachable
    def put_meta(self, name: str, value: bytes) -> None:
        self._r.set(self.prefix + "meta:" + name, value)

    @_redis_reachable
    def get(self, key: str) -> Optional[bytes]:
        value = self._r.get(self.prefix + key)
        if value is None:
            self._r.zrem(self._index, key)
            return None
        self._r.zadd(self._index, {key: time.time()})
        return value

    @_redis_reachable
    def put(self, key: str, value: bytes) -> None:
        ttl_ms = int(self.ttl * 1000) if self.ttl else None
        pipe = self._r.pipeline()
        pipe.set(self.prefix + key, value, px=ttl_ms)
        pipe.zadd(self._index, {key: time.time()})
        pipe.zcard(self._index)
        count = pipe.execute()[-1]
        if count > self.max_entries:
            old = self._r.zrange(self._index, 0, count - self.max_entries - 1)
            if old:
                self._r.delete(*[self.prefix + k.decode() for k in old])
                self._r.zrem(self._index, *old)

    @_redis_reachable
    def clear(self) -> None:
        keys = [self.prefix + k.decode() for k in self._r.zrange(self._index, 0, -1)]
        if keys:
            self._r.delete(*keys)
        self._r.delete(self._index)

    @_redis_reachable
    def __len__(self) -> int:
        return int(self._r.zcard(self._index))

    def close(self) -> None:
        self._r.close()


def open_backend(url: Optional[str], folder: Path, ttl: Optional[float], max_entries: int, max_bytes: int) -> CacheBackend:
    """``None``/``sqlite://`` → SQLite under ``folder``; ``sqlite:///path`` → that file; ``redis://`` → Redis."""
    if not url or url == "sqlite://":
        return SQLiteCache(Path(folder) / "responses.sqlite", ttl, max_entries, max_bytes)
    if url.startswith("sqlite:///"):
        return SQLiteCache(Path(url[len("sqlite:///") - 1 :]), ttl, max_entries, max_bytes)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisCache(url, ttl, max_entries)
    raise InvalidRequestError(f"cache_url must be sqlite:///path or redis://host:port/db; got {url!r}.", param="cache_url")


class ResponseCache:
    """A backend plus hit/miss counters (read by ``/metrics``), sealing values with ``cipher``
    when one is given."""

    def __init__(self, backend: CacheBackend, cipher: Any = None, where: str = "The response cache") -> None:
        from ..security.crypto import check_marker

        self.backend = backend
        self.cipher = cipher
        self.hits = 0
        self.misses = 0
        self.stores = 0
        self.skipped = 0  # lookups and stores skipped while the backend (Redis) was unreachable
        self._unreachable = False
        new_marker = check_marker(backend.get_meta("encryption"), cipher, where)
        if new_marker is not None:
            if len(backend):
                backend.clear()  # plaintext entries must not stay at rest once encryption is on
            backend.put_meta("encryption", new_marker)

    def _open(self, key: str, blob: bytes) -> Optional[bytes]:
        if self.cipher is None:
            return blob
        from ..errors import EncryptionKeyError

        try:
            return self.cipher.decrypt(blob, key.encode())
        except EncryptionKeyError:
            return None  # changed or foreign bytes: a miss, never wrong data

    def _skip(self, exc: StateUnavailableError) -> None:
        self.skipped += 1
        if not self._unreachable:
            self._unreachable = True
            log.warning("response cache skipped until its backend answers again: %s", exc)

    def _reached(self) -> None:
        if self._unreachable:
            self._unreachable = False
            log.warning("response cache reachable again (%d lookups and stores skipped so far)", self.skipped)

    def lookup(self, key: str) -> Optional[list[StreamEvent]]:
        try:
            blob = self.backend.get(key)
        except StateUnavailableError as exc:
            self._skip(exc)
            return None
        self._reached()
        blob = None if blob is None else self._open(key, blob)
        if blob is None:
            self.misses += 1
            return None
        self.hits += 1
        return decode_events(blob)

    def store(self, key: str, events: list[StreamEvent]) -> None:
        if events and events[-1].finish_reason in ("stop", "length"):
            blob = encode_events(events)
            try:
                self.backend.put(key, blob if self.cipher is None else self.cipher.encrypt(blob, key.encode()))
            except StateUnavailableError as exc:
                self._skip(exc)
                return
            self._reached()
            self.stores += 1

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "stores": self.stores, "skipped": self.skipped}

    def close(self) -> None:
        self.backend.close()
