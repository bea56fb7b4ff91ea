"""Rate limits per key: requests per minute (``rpm``), tokens per minute (``tpm``) and requests in
flight (``max_parallel``), in this process or shared by every process using one Redis.

- requests: a sliding log (the start times of the last minute's requests), so "at most ``rpm`` in
  any 60 seconds" holds exactly, with no burst at a minute boundary;
- tokens: a sliding-window counter (this minute's tokens plus the previous minute's weighted by
  how much of it still overlaps the window), cheap for large counts; a request is admitted while
  the estimate is under ``tpm``, then its prompt and completion tokens are charged as they happen;
- parallel: the set of tickets in flight; a ticket a crashed process never released expires.

In Redis one Lua script checks and records all three atomically in one round trip; a Redis error
becomes ``StateUnavailableError`` so a limited key fails closed."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional, Protocol

from ..errors import StateUnavailableError
from .keys import ApiKey

WINDOW = 60.0
STALE_TICKET = 600.0  # a ticket older than this is from a process that died mid-request


@dataclass
class Admission:
    """The outcome of one admission: ``reason`` is None when admitted, else rpm/tpm/parallel."""

    reason: Optional[str]
    requests: int = 0  # requests in the window, this one included when admitted
    requests_reset: float = 0.0  # seconds until a request slot frees
    tokens: int = 0  # estimated tokens used in the window
    tokens_reset: float = 0.0  # seconds until the token estimate drops

    @property
    def admitted(self) -> bool:
        return self.reason is None


class Limiter(Protocol):
    def admit(self, key: ApiKey, ticket: str, now: Optional[float] = None) -> Admission: ...
    def charge(self, key: ApiKey, tokens: int, now: Optional[float] = None) -> None: ...
    def release(self, key: ApiKey, ticket: str) -> None: ...


def _bucket(now: float) -> tuple[int, float]:
    """The minute bucket of ``now`` and how far into it ``now`` is (0..1)."""
    index = math.floor(now / WINDOW)
    return index, now / WINDOW - index


class LocalLimiter:
    """Limits for one process (the default with the SQLite store)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, dict[int, int]] = {}
        self._parallel: dict[str, dict[str, float]] = {}

    def _token_estimate(self, key_id: str, now: float) -> tuple[int, float]:
        index, frac = _bucket(now)
        buckets = self._tokens.get(key_id, {})
        for old in [i for i in buckets if i < index - 1]:
            del buckets[old]
        used = math.floor(buckets.get(index - 1, 0) * (1 - frac) + buckets.get(index, 0))
        return used, (1 - frac) * WINDOW

    def admit(self, key: ApiKey, ticket: str, now: Optional[float] = None) -> Admission:
        now = time.time() if now is None else now
        with self._lock:
            log = self._requests.setdefault(key.id, deque())
            while log and log[0] <= now - WINDOW:
                log.popleft()
            reset = log[0] + WINDOW - now if log else 0.0
            used, tokens_reset = self._token_estimate(key.id, now) if key.tpm is not None else (0, 0.0)
            if key.rpm is not None and len(log) >= key.rpm:
                return Admission("rpm", len(log), reset, used, tokens_reset)
            if key.tpm is not None and used >= key.tpm:
                return Admission("tpm", len(log), reset, used, tokens_reset)
            if key.max_parallel is not None:
                tickets = self._parallel.setdefault(key.id, {})
                for t in [t for t, at in tickets.items() if at <= now - STALE_TICKET]:
                    del tickets[t]
                if len(tickets) >= key.max_parallel:
                    return Admission("parallel", len(log), reset, used, tokens_reset)
                tickets[ticket] = now
            if key.rpm is not None:
                log.append(now)
                reset = log[0] + WINDOW - now
            return Admission(None, len(log), reset, used, tokens_reset)

    def charge(self, key: ApiKey, tokens: int, now: Optional[float] = None) -> None:
        if key.tpm is None or tokens <= 0:
            return
        index, _ = _bucket(time.time() if now is None else now)
        with self._lock:
            buckets = self._tokens.setdefault(key.id, {})
            buckets[index] = buckets.get(index, 0) + tokens

    def release(self, key: ApiKey, ticket: str) -> None:
        if key.max_parallel is not None:
            with self._lock:
                self._parallel.get(key.id, {}).pop(ticket, None)


_ADMIT = """
local now, rpm, tpm, maxpar = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ticket, window, frac, stale = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local reqs, req_reset, used, tok_reset = 0, 0, 0, 0
if tpm > 0 then
  local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
  local prev = tonumber(redis.call('GET', KEYS[3]) or '0')
  used = math.floor(prev * (1 - frac) + cur)
  tok_reset = math.ceil((1 - frac) * window)
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  reqs = redis.call('ZCARD', KEYS[1])
  if reqs > 0 then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    req_reset = tonumber(oldest[2]) + window - now
  end
  if reqs >= rpm then return {'rpm', reqs, req_reset, used, tok_reset} end
end
if tpm > 0 and used >= tpm then return {'tpm', reqs, req_reset, used, tok_reset} end
if maxpar > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - stale)
  if redis.call('ZCARD', KEYS[4]) >= maxpar then return {'parallel', reqs, req_reset, used, tok_reset} end
  redis.call('ZADD', KEYS[4], now, ticket)
  redis.call('PEXPIRE', KEYS[4], stale)
end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, ticket)
  redis.call('PEXPIRE', KEYS[1], window)
  reqs = reqs + 1
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  req_reset = tonumber(oldest[2]) + window - now
end
return {'ok', reqs, req_reset, used, tok_reset}
"""


class RedisLimiter:
    """Limits shared by every process using the same Redis (keys carry the key id as a hash tag,
    so they stay on one node of a cluster)."""

    def __init__(self, url: str, prefix: str = "llamawrapper:lim:") -> None:
        import redis

        self.prefix = prefix
        self._errors = (redis.ConnectionError, redis.TimeoutError)
        self._r = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=5)
        self._admit = self._r.register_script(_ADMIT)

    def _names(self, key_id: str, index: int) -> list[str]:
        p = f"{self.prefix}{{{key_id}}}:"
        return [p + "req", f"{p}tok:{index}", f"{p}tok:{index - 1}", p + "par"]

    def admit(self, key: ApiKey, ticket: str, now: Optional[float] = None) -> Admission:
        now = time.time() if now is None else now
        index, frac = _bucket(now)
        args = [int(now * 1000), key.rpm or 0, key.tpm or 0, key.max_parallel or 0, ticket, int(WINDOW * 1000), frac,
                int(STALE_TICKET * 1000)]
        try:
            reason, reqs, req_reset, used, tok_reset = self._admit(keys=self._names(key.id, index), args=args)
        except self._errors as exc:
            raise StateUnavailableError(f"The rate limiter (Redis) is unreachable: {exc}") from None
        reason = reason.decode() if isinstance(reason, bytes) else reason
        return Admission(None if reason == "ok" else reason, int(reqs), req_reset / 1000, int(used), tok_reset / 1000)

    def charge(self, key: ApiKey, tokens: int, now: Optional[float] = None) -> None:
        if key.tpm is None or tokens <= 0:
            return
        index, _ = _bucket(time.time() if now is None else now)
        name = self._names(key.id, index)[1]
        try:
            self._r.pipeline().incrby(name, tokens).pexpire(name, int(2 * WINDOW * 1000)).execute()
        except self._errors:
            pass  # the request is already admitted; losing its charge is better than failing it now

    def release(self, key: ApiKey, ticket: str) -> None:
        if key.max_parallel is not None:
            try:
                self._r.zrem(self._names(key.id, 0)[3], ticket)
            except self._errors:
                pass  # the ticket expires after STALE_TICKET

    def close(self) -> None:
        self._r.close()
