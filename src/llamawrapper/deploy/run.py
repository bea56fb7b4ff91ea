"""``llamawrapper serve --ray``: check the flags, connect (or start a local cluster), check the
replicas fit, start Ray Serve's proxy on ``--host``/``--port`` with the lost-replica retry,
deploy, then wait for SIGTERM/SIGINT and drain (Ray lets each replica finish its requests for
up to ``drain_timeout``) before returning."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Optional

from ..config import EngineSettings, RaySettings, SecuritySettings, ServerSettings
from ..errors import InvalidRequestError
from .plan import RayUnavailableError, make_plan, require_ray

log = logging.getLogger("llamawrapper.deploy")
APP_NAME = "llamawrapper"
# Ray Serve's router trusts its cached count of a replica's requests for this long (Ray's default
# is 10 s); after a burst of cancelled streams a stale count kept a free replica unused for the
# whole 10 s (docs/RELIABILITY.md). 2 s bounds that; the cost is a queue-length probe to the
# candidate replicas when the count is older.
QUEUE_LENGTH_CACHE_TIMEOUT_S = "2"


def _port(settings: ServerSettings) -> int:
    if settings.port:
        return settings.port
    with socket.socket() as s:
        s.bind((settings.host, 0))
        return s.getsockname()[1]


def serve_on_ray(settings: ServerSettings, engine: Optional[EngineSettings] = None,
                 security: Optional[SecuritySettings] = None, ray_settings: Optional[RaySettings] = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return; errors before anything starts."""
    engine = engine or EngineSettings()
    ray_settings = ray_settings or RaySettings()
    plan = make_plan(ray_settings, engine)
    if settings.ssl_certfile or settings.ssl_keyfile:
        raise InvalidRequestError("HTTPS is not served with --ray: terminate TLS in front of Ray Serve's proxy.", param="ssl_certfile")
    from ..server.app import served_entries

    served_entries(settings)  # bad model specs or files fail here, before a cluster starts
    serve = require_ray()
    import ray

    from .app import build_app
    from .cluster import check_capacity, connect, ray_address
    from .proxy import PROXY_CALLBACK

    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)  # read by a local cluster's proxy
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S", QUEUE_LENGTH_CACHE_TIMEOUT_S)  # ...and its router
    if ray_address() and os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == PROXY_CALLBACK:
        log.info("a cluster started elsewhere retries lost replicas only when its nodes have "
                 "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=%s", PROXY_CALLBACK)
    local = connect()
    stop = threading.Event()  # after connecting: ray.init installs a SIGTERM handler of its own
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        check_capacity(plan)
        port = _port(settings)
        serve.start(http_options={"host": settings.host, "port": port,
                                   "keep_alive_timeout_s": settings.idle_connection_timeout})
        try:
            serve.run(build_app(settings=settings, engine=engine, security=security, plan=plan,
                                request_router=ray_settings.routing),
                      name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as exc:  # a replica that cannot start (bad model, failed load)
            raise RayUnavailableError(f"The Ray Serve application did not start: {exc}") from exc
        log.info("listening on http://%s:%s (Ray Serve, %s)", settings.host, port,
                 f"{plan.replicas} replica(s)" if plan.replicas else f"{plan.min_replicas}-{plan.max_replicas} replicas",
                 extra={"host": settings.host, "port": port})
        while not stop.wait(0.5):
            pass
        log.info("signal received: draining the Ray Serve application (up to %.0f s)", settings.drain_timeout)
        serve.delete(APP_NAME)
    finally:
        try:
            if local:  # a cluster of our own goes with us; a shared one keeps its Serve and other apps
                serve.shutdown()
        finally:
            ray.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


__all__ = ["serve_on_ray", "RayUnavailableError"]
