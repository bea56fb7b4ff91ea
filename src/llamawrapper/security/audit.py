"""The audit log: JSON lines, one per request or admin action, each carrying the hash of the
line before it (``prev``) and its own (``hash`` = sha256 of ``prev`` and the line's other
fields), so an edited line fails its own hash and a deleted one breaks the chain.

Several processes may append to one file: an exclusive ``flock`` on a lock file beside it orders
the appends, and a writer that sees the file grew (another process wrote) re-reads the last
line's hash before adding its own. Retention rewrites the file without its oldest lines and
records the hash of the last removed line in ``<file>.anchor``, where the chain now starts.

Request lines are handed to a writer thread (``submit``), so the event loop only pays for a queue
put; the thread writes whatever has queued in one locked batch. ``append`` (admin actions) waits
until its line is on disk, and ``read``/``verify``/``close`` first wait for the queue to drain.

What an audit line never holds: a key's secret (only its id), and prompt or answer text unless
``log_content`` is on."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

GENESIS = "0" * 64


def _line_hash(prev: str, entry: dict[str, Any]) -> str:
    body = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256((prev + body).encode("utf-8")).hexdigest()


def iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: Any) -> float:
    """Epoch seconds from a number or an ISO 8601 string (UTC unless an offset is given)."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


@dataclass
class Verification:
    ok: bool
    lines: int
    head: str  # the last line's hash: record it elsewhere to detect a rewritten tail
    bad_line: Optional[int] = None  # 1-based
    problem: Optional[str] = None

    def describe(self) -> str:
        if self.ok:
            return f"ok: {self.lines} lines, chain intact, head {self.head}"
        return f"line {self.bad_line}: {self.problem}"


class AuditLog:
    """Append-only, hash-chained JSON lines at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.anchor_path = self.path.with_name(self.path.name + ".anchor")
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._thread_lock = threading.Lock()
        self._file = None
        self._known = (-1, -1)  # (inode, size) after our last write
        self._prev = GENESIS
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._writer: Optional[threading.Thread] = None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _open(self) -> Any:
        st = os.stat(self.path) if self.path.exists() else None
        if self._file is None or st is None or os.fstat(self._file.fileno()).st_ino != st.st_ino:
            if self._file is not None:
                self._file.close()
            self._file = open(self.path, "ab")
            os.chmod(self.path, 0o600)
        st = os.fstat(self._file.fileno())
        if (st.st_ino, st.st_size) != self._known:  # someone else wrote (or first use): re-read the tail
            self._prev = self._last_hash()
        return self._file

    def _last_hash(self) -> str:
        size = self.path.stat().st_size if self.path.exists() else 0
        if size == 0:
            return self._anchor()
        with open(self.path, "rb") as f:
            f.seek(max(0, size - 65536))
            tail = f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
        return json.loads(tail)["hash"]

    def _anchor(self) -> str:
        try:
            return json.loads(self.anchor_path.read_text())["hash"]
        except (OSError, ValueError, KeyError):
            return GENESIS

    @staticmethod
    def _entry(event: str, fields: dict[str, Any]) -> dict[str, Any]:
        return {"time": iso_time(time.time()), "event": event, **{k: v for k, v in fields.items() if v is not None}}

    def submit(self, event: str, **fields: Any) -> None:
        """Queue one line for the writer thread (``time`` is now, not when it is written)."""
        if self._writer is None:
            with self._thread_lock:
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_loop, name="llamawrapper-audit", daemon=True)
                    self._writer.start()
        self._queue.put(self._entry(event, fields))

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Add one line now (after any queued ones) and return it."""
        self.flush()
        entry = self._entry(event, fields)
        self._write([entry])
        return entry

    def flush(self) -> None:
        """Wait until every submitted line is written."""
        if self._writer is not None:
            self._queue.join()

    def _write_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < 1000:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(batch)
            except Exception:  # a full disk must not kill the thread; the lines are reported lost
                import logging

                logging.getLogger("llamawrapper.security").exception("audit lines lost: %d", len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _write(self, entries: list[dict[str, Any]]) -> None:
        with self._locked():
            f = self._open()
            out = []
            for entry in entries:
                entry["prev"] = self._prev
                entry["hash"] = self._prev = _line_hash(self._prev, entry)
                out.append(json.dumps(entry, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8") + b"\n")
            f.write(b"".join(out))
            f.flush()
            st = os.fstat(f.fileno())
            self._known = (st.st_ino, st.st_size)

    def lines(self) -> Iterator[dict[str, Any]]:
        self.flush()
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            for raw in f:
                if raw.strip():
                    yield json.loads(raw)

    def read(self, since: Optional[float] = None, key: Optional[str] = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Lines at or after ``since`` (epoch seconds), of key id ``key``; the last ``limit`` of them."""
        out: list[dict[str, Any]] = []
        for entry in self.lines():
            if since is not None and parse_time(entry["time"]) < since:
                continue
            if key is not None and entry.get("key_id") != key:
                continue
            out.append(entry)
            if len(out) > limit:
                out.pop(0)
        return out

    def verify(self) -> Verification:
        self.flush()
        prev, n = self._anchor(), 0
        if not self.path.exists():
            return Verification(True, 0, prev)
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    entry = json.loads(raw)
                    stated = entry.pop("hash")
                except (ValueError, KeyError, AttributeError):
                    return Verification(False, n, prev, n, "not a valid audit line (unparseable or without a hash)")
                if entry.get("prev") != prev:
                    return Verification(False, n, prev, n, "chain broken: a line before it was deleted or edited")
                if _line_hash(prev, entry) != stated:
                    return Verification(False, n, prev, n, "edited: its content does not match its hash")
                prev = stated
        return Verification(True, n, prev)

    def prune(self, older_than: float) -> int:
        """Drop lines from before ``older_than`` (epoch seconds); the chain restarts at the anchor."""
        self.flush()
        with self._locked():
            if not self.path.exists():
                return 0
            kept: list[bytes] = []
            dropped, last_dropped = 0, None
            with open(self.path, "rb") as f:
                for raw in f:
                    if not kept and parse_time(json.loads(raw)["time"]) < older_than:
                        dropped, last_dropped = dropped + 1, json.loads(raw)["hash"]
                    else:
                        kept.append(raw)
            if not dropped:
                return 0
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            previous = json.loads(self.anchor_path.read_text()) if self.anchor_path.exists() else {"pruned": 0}
            self.anchor_path.write_text(json.dumps({"hash": last_dropped, "pruned": previous.get("pruned", 0) + dropped,
                                                    "at": iso_time(time.time())}))
            os.replace(tmp, self.path)
            self._known = (-1, -1)
            return dropped

    def close(self) -> None:
        self.flush()
        with self._thread_lock:
            if self._file is not None:
                self._file.close()
                self._file = None
