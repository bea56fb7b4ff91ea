"""Prefix-aware routing for the Ray app. The proxy's middleware (``proxy.py``) reads each chat
or completion body and states its prompt as chained hashes of fixed-size text blocks in the
``x-lw-prefix`` header (the body itself only reaches a replica after routing).
``PrefixAffinityRouter``, a Ray Serve custom request router running in the proxy, remembers
which replica last received each block and sends a request to the replica holding its longest
known prefix (whose prefix cache most likely holds those tokens), unless that replica has
``imbalance`` more requests in flight than the least busy one: then, and for prefixes never
seen, power of two choices as Ray does by default. The same idea as Ray's
``PrefixCacheAffinityRouter``, without its prefix-tree actor: each proxy keeps its own table."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from collections import OrderedDict
from typing import Any, List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

PREFIX_HEADER = b"x-lw-prefix"
BLOCK_CHARS = 64
MAX_BLOCKS = 64          # the first 4096 characters decide
ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions")


def _prompt_text(body: dict) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if isinstance(m, dict):
                content = m.get("content")
                if isinstance(content, list):
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                parts.append(f"{m.get('role')}:{content if isinstance(content, str) else ''}\n")
        return "".join(parts)
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def prefix_hashes(raw: bytes) -> list[str]:
    """Chained block hashes of a request body's prompt (``[]`` when it has none): the i-th
    names the first i+1 blocks, so two prompts share hashes exactly as long as they share text."""
    try:
        body = json.loads(raw)
    except ValueError:
        return []
    text = _prompt_text(body) if isinstance(body, dict) else ""
    model = str(body.get("model", "")) if isinstance(body, dict) else ""
    out, state = [], hashlib.blake2b(model.encode(), digest_size=8)
    for start in range(0, min(len(text), BLOCK_CHARS * MAX_BLOCKS), BLOCK_CHARS):
        state.update(text[start:start + BLOCK_CHARS].encode())
        out.append(state.copy().hexdigest())
    return out


def with_prefix_header(scope: dict, raw: bytes) -> dict:
    """``scope`` with ``x-lw-prefix`` set for a generation request (any client-sent one replaced)."""
    if scope.get("path") not in ROUTED_PATHS:
        return scope
    headers = [(k, v) for k, v in scope.get("headers", []) if k != PREFIX_HEADER]
    hashes = prefix_hashes(raw)
    if hashes:
        headers.append((PREFIX_HEADER, ",".join(hashes).encode()))
    return {**scope, "headers": headers}


def _hashes_of(request: Optional[PendingRequest]) -> list[str]:
    """The ``x-lw-prefix`` hashes of a request from Ray's HTTP proxy, whose one argument is the
    pickled ``StreamingHTTPRequest`` (its ASGI scope holds the headers)."""
    if request is None:
        return []
    for arg in request.args or []:
        if isinstance(arg, bytes) and PREFIX_HEADER in arg:
            arg = pickle.loads(arg)  # written by Ray's own proxy in this process, never by a client
        scope = getattr(arg, "asgi_scope", None)
        if isinstance(scope, dict):
            for key, value in scope.get("headers", []):
                if key == PREFIX_HEADER:
                    return value.decode().split(",")
    return []


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, imbalance: int = 4, max_entries: int = 200_000, **_: Any) -> None:
        self._imbalance = imbalance
        self._max_entries = max_entries
        self._owner: "OrderedDict[str, ReplicaID]" = OrderedDict()
        self.routed_by_prefix = 0  # counters, for tests and logs
        self.routed_by_load = 0

    def _load(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id: r for r in candidate_replicas}
        for h in reversed(_hashes_of(pending_request)):
            owner = by_id.get(self._owner.get(h))
            if owner is not None:
                if self._load(owner) - min(self._load(r) for r in candidate_replicas) <= self._imbalance:
                    self.routed_by_prefix += 1
                    return [[owner]]
                break
        self.routed_by_load += 1
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        for h in _hashes_of(pending_request):
            self._owner[h] = replica_id
            self._owner.move_to_end(h)
        while len(self._owner) > self._max_entries:
            self._owner.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for h in [h for h, owner in self._owner.items() if owner == replica_id]:
            del self._owner[h]
