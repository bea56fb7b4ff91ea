"""The ``retention_days`` setting: cached answers and audit lines older than it are deleted.
The response cache gets it as a cap on its TTL (its backends already expire by age); the audit
log is pruned when the server starts and then every few hours."""

from __future__ import annotations

import time
from typing import Optional

DAY = 86400.0
_configured: dict[str, Optional[float]] = {}


def configure(days: Optional[float]) -> None:
    """Set the process's retention period (the server does, from its settings and flags)."""
    _configured["days"] = days


def retention_seconds(days: Optional[float] = None) -> Optional[float]:
    if days is None:
        if "days" not in _configured:
            from ..config import SecuritySettings

            _configured["days"] = SecuritySettings().retention_days
        days = _configured["days"]
    return days * DAY if days else None


def capped_ttl(ttl: Optional[float], days: Optional[float] = None) -> Optional[float]:
    """A cache TTL no longer than the retention period."""
    limit = retention_seconds(days)
    if limit is None:
        return ttl
    return limit if ttl is None else min(ttl, limit)


def prune_audit(audit, days: Optional[float], now: Optional[float] = None) -> int:
    """Drop audit lines older than ``days``; returns how many went."""
    limit = retention_seconds(days) if days else None
    if limit is None:
        return 0
    return audit.prune((time.time() if now is None else now) - limit)
