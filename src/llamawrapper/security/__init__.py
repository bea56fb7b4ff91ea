"""Keys, scopes, rate limits, the audit log and encryption at rest.

- ``keys``: key records, secrets (shown once, stored as hashes) and validation of new keys;
- ``stores``: where keys and usage live (SQLite by default, Redis shared across processes);
- ``limits``: rpm / tpm / max_parallel, in-process or atomic in Redis;
- ``audit``: the hash-chained JSON-lines audit log, verify and read;
- ``crypto``: AES-GCM sealing for data at rest (the response cache);
- ``retention``: deleting cached answers and audit lines older than N days;
- ``gate``: the per-request decisions the HTTP server asks for.

Nothing here imports the HTTP layer or torch."""

from .audit import AuditLog, Verification
from .gate import Gate, Principal, open_gate
from .keys import ApiKey, make_key

__all__ = ["ApiKey", "AuditLog", "Gate", "Principal", "Verification", "make_key", "open_gate"]
