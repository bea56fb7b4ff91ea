"""Running the app under uvicorn, with a graceful drain: on SIGTERM (or Ctrl-C) the server
stops accepting connections, reports 503 on ``/ready``, lets in-flight requests finish for
up to ``drain_timeout`` seconds, closes the engines and returns, so the process exits 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Optional

import uvicorn

from ..config import EngineSettings, SecuritySettings, ServerSettings
from ..errors import InvalidRequestError
from .app import create_app

log = logging.getLogger("llamawrapper.server")


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self.lw_state = state

    def handle_exit(self, sig, frame) -> None:
        if not self.lw_state.draining:
            log.info("signal %s: draining in-flight requests (up to %.0f s)", signal.Signals(sig).name,
                     self.lw_state.settings.drain_timeout)
        self.lw_state.draining = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        closer = asyncio.ensure_future(self._drop_tls_connections_waiting_for_close_notify())
        try:
            await super().shutdown(sockets)
        finally:
            closer.cancel()

    async def _drop_tls_connections_waiting_for_close_notify(self, grace: float = 1.0) -> None:
        """uvicorn closes idle keep-alive connections when it shuts down and waits until they
        are gone. A TLS connection, once closed, sends its close_notify and then waits for the
        client's (asyncio and uvloop wait up to 30 s), which an idle client never sends: an open
        keep-alive connection held every HTTPS shutdown for the whole drain timeout. A closing
        TLS connection with nothing left to write is dropped after ``grace`` seconds."""
        closing_since: dict[int, float] = {}
        while True:
            now = time.monotonic()
            for conn in list(self.server_state.connections):
                transport = getattr(conn, "transport", None)
                if (transport is None or not transport.is_closing() or transport.get_extra_info("sslcontext") is None
                        or transport.get_write_buffer_size()):
                    continue
                if now - closing_since.setdefault(id(conn), now) >= grace:
                    transport.abort()
            await asyncio.sleep(0.1)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                scheme = "https" if self.config.ssl_certfile else "http"
                log.info("listening on %s://%s:%s", scheme, host, port, extra={"host": host, "port": port})


def _share_logging() -> None:
    """uvicorn's own messages go through LlamaWrapper's handler (text or JSON lines)."""
    ours = logging.getLogger("llamawrapper")
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = list(ours.handlers)
        logger.setLevel(ours.level or logging.INFO)
        logger.propagate = False


def _tls(settings: ServerSettings) -> dict:
    """uvicorn's TLS options: HTTPS when both a certificate and its key are given."""
    from pathlib import Path

    given = {"ssl_certfile": settings.ssl_certfile, "ssl_keyfile": settings.ssl_keyfile}
    if not any(given.values()):
        return {}
    for name, path in given.items():
        if not path:
            raise InvalidRequestError(f"HTTPS needs both --ssl-certfile and --ssl-keyfile; '{name}' is missing.", param=name)
        if not Path(path).expanduser().is_file():
            raise InvalidRequestError(f"The {name} '{path}' is not a readable file.", param=name)
    return {k: str(Path(v).expanduser()) for k, v in given.items()}


def serve(settings: ServerSettings, engine: Optional[EngineSettings] = None, security: Optional[SecuritySettings] = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return."""
    tls = _tls(settings)
    app = create_app(settings, engine, security=security)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=settings.drain_timeout, timeout_keep_alive=settings.idle_connection_timeout,
                            lifespan="on", **tls)
    _share_logging()
    server = _DrainingServer(config, app.state.lw)
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler in place
    # then makes a drained SIGTERM end in a normal return (exit 0), not death by signal.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn already drained; re-raised SIGINT lands here
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise SystemExit(1)
