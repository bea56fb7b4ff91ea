"""Model admin calls for replicas that start later. ``fanout.py`` replays a model admin call on
the replicas running at the time; a replica Ray starts afterwards (the replacement of a killed
one, an autoscaled one) would start from the deployment's models only. With a Redis
``--state-url``, the replica that answered a call appends it to a list in Redis, the
deployment's admin log (``llamawrapper:deploy:<deployment id>:admin-log``), and every replica
applies the whole log, in order, after loading its models and before it reports itself
started: Ray sends it no request until it serves what the others serve, under the same version
names (a host names versions in order: ``v2``, ``v3``...).

The log belongs to one deployment: ``build_app`` draws a new id each time, so a redeploy (new
settings, ``serve --ray`` started again) starts from its own models and an empty log. Entries
hold what the host needs (name, action, the request's JSON body), never a request's headers,
so no key reaches Redis. Applying a call here goes to the ``ModelHost`` directly, as the admin
routes do after their checks (the call was checked and answered once already). A fanned-out
call carries its log index, so a replica that has replayed it at start does not apply it twice.

Left open: a call recorded after a starting replica's last read of the log and fanned out
before Ray lists that replica as running reaches neither way (a window of about a second
around a replica's start); a replay that fails on one replica (a source missing on its node)
is logged and the replica starts anyway, like a fan-out that fails on one replica."""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Optional
from urllib.parse import unquote

from ..errors import InvalidRequestError, StateUnavailableError

log = logging.getLogger("llamawrapper.deploy")
_ROUTE = re.compile(r"^/admin/models/(?P<name>[^/]+)(?:/(?P<action>promote|rollback)|/adapters/(?P<adapter>[^/]+))?$")
_HOST_FIELDS = ("traffic", "keep_alive")


def call_of(method: str, path: str, body: bytes) -> Optional[dict]:
    """The log entry of a successful model admin call (None for a path that is not one)."""
    match = _ROUTE.match(path)
    if match is None:
        return None
    name, action, adapter = unquote(match["name"]), match["action"], match["adapter"]
    if action and method == "POST":
        return {"action": action, "name": name}
    if adapter is not None and method in ("PUT", "DELETE"):
        path_ = json.loads(body or b"{}").get("path") if method == "PUT" else None
        return {"action": "adapter", "name": name, "adapter": unquote(adapter), "path": path_}
    if action is None and adapter is None and method == "PUT":
        return {"action": "put", "name": name, "body": json.loads(body or b"{}")}
    if action is None and adapter is None and method == "DELETE":
        return {"action": "remove", "name": name}
    return None


def apply_call(host: Any, call: dict, load_timeout: float = 1800) -> None:
    """Apply one log entry to ``host`` and wait for the version it loads (the next entry may
    need it ready: a promote, a put after a put)."""
    name, action = call["name"], call["action"]
    result: Optional[dict] = None
    if action == "put":
        body = dict(call["body"])
        options = {k: body.pop(k) for k in _HOST_FIELDS if k in body}
        result = host.put(name, body, **options)
    elif action == "adapter":
        current = host.current_spec(name)
        adapters = dict(current.adapters)
        if call["path"] is None:
            adapters.pop(call["adapter"], None)
        else:
            adapters[call["adapter"]] = call["path"]
        result = host.put(name, {**current.to_dict(), "adapters": adapters})
    elif action == "promote":
        host.promote(name)
    elif action == "rollback":
        result = host.rollback(name)
    elif action == "remove":
        host.remove(name)
    else:
        raise InvalidRequestError(f"Unknown admin-log action {action!r}.")
    if result and result.get("version") and not host.wait(name, result["version"], load_timeout):
        log.warning("admin log: %s of '%s' left version %s not ready: %s", action, name, result["version"],
                    host.describe(name))


class AdminLog:
    """The deployment's admin log in Redis, and how far this replica has replayed it."""

    def __init__(self, url: str, deployment_id: str) -> None:
        import redis

        self.key = f"llamawrapper:deploy:{deployment_id}:admin-log"
        self.replayed = 0  # entries 1..replayed were applied at start: a fan-out of one of them is skipped
        self._errors = (redis.ConnectionError, redis.TimeoutError)
        self._r = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    def append(self, call: dict) -> int:
        """Record a call; its 1-based index in the log."""
        try:
            return int(self._r.rpush(self.key, json.dumps(call)))
        except self._errors as exc:
            raise StateUnavailableError(f"The admin log (Redis) is unreachable: {exc}") from None

    def entries(self, start: int) -> list[dict]:
        """Entries ``start+1``... (``start`` already applied)."""
        try:
            return [json.loads(raw) for raw in self._r.lrange(self.key, start, -1)]
        except self._errors as exc:
            raise StateUnavailableError(f"The admin log (Redis) is unreachable: {exc}") from None

    def replay(self, host: Any, load_timeout: float = 1800) -> int:
        """Apply every entry, in order, until a read finds no new one; the number applied."""
        while True:
            batch = self.entries(self.replayed)
            if not batch:
                return self.replayed
            for call in batch:
                self.replayed += 1
                try:
                    apply_call(host, call, load_timeout)
                    log.info("admin log: replayed #%d %s '%s'", self.replayed, call["action"], call["name"])
                except Exception:  # the others applied it; say so and go on, as a failed fan-out does
                    log.exception("admin log: replaying #%d (%s) failed", self.replayed, call)

    def close(self) -> None:
        self._r.close()


def open_admin_log(state_url: Optional[str], deployment_id: Optional[str]) -> Optional[AdminLog]:
    """An ``AdminLog`` for a Redis state URL; None otherwise (no shared place to keep it)."""
    if not deployment_id or not state_url or not state_url.startswith(("redis://", "rediss://", "unix://")):
        return None
    return AdminLog(state_url, deployment_id)
