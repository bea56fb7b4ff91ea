"""Logging through the standard ``logging`` module, as text for people or JSON lines for machines."""

from __future__ import annotations

import json
import logging
import sys
import time

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``extra={...}`` fields (e.g. ``request_id``) become keys."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):
    """Writes each record to ``sys.stderr`` as it is at that moment, not as it was when logging
    was set up: a program that swaps ``sys.stderr`` (a test runner capturing output, an app
    redirecting it) and closes the old one would otherwise get "I/O operation on closed file"
    from every later record, from any thread."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def configure(level: str = "INFO", fmt: str = "text", stream=None) -> None:
    """Set up the ``llamawrapper`` loggers once (idempotent); records go to ``stream``, or to
    whatever ``sys.stderr`` is when each is written."""
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("llamawrapper")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
