"""How many replicas, of what size, taking how many requests: the deployment's shape derived
from ``RaySettings`` and ``EngineSettings``, checked before anything starts (no Ray import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..config import EngineSettings, RaySettings
from ..errors import InvalidRequestError, LlamaWrapperError

EXTRA_HINT = "pip install 'llamawrapper[ray]'"


class RayUnavailableError(LlamaWrapperError):
    """Ray Serve is not installed, or the cluster cannot be reached or cannot place the replicas."""


def require_ray() -> Any:
    """``ray.serve``, or an error naming the extra to install."""
    try:
        from ray import serve
    except ImportError as exc:
        raise RayUnavailableError(f"--ray needs Ray Serve, which is not installed ({exc}); install the extra: {EXTRA_HINT}") from exc
    return serve


@dataclass(frozen=True)
class DeploymentPlan:
    replicas: Optional[int]          # fixed count, or None when autoscaling
    min_replicas: Optional[int]
    max_replicas: Optional[int]
    target_ongoing_requests: float
    max_ongoing_requests: int        # one engine batch: more waits in Ray's router, free to go elsewhere
    max_queued_requests: int         # beyond this many waiting in a router, Ray refuses at once
    cpus_per_replica: float          # the replica's torch threads

    @property
    def autoscaling(self) -> bool:
        return self.replicas is None

    @property
    def replicas_at_start(self) -> int:
        return self.replicas if self.replicas is not None else (self.min_replicas or 1)

    def deployment_options(self) -> dict:
        """Keyword arguments of ``serve.deployment`` for the replica count and admission."""
        # every replica full and the router's queue full: 429 with Retry-After, as the single
        # server answers a full queue (Ray's default is a bare 503)
        out: dict[str, Any] = {"max_ongoing_requests": self.max_ongoing_requests,
                               "max_queued_requests": self.max_queued_requests,
                               "backpressure_config": {"status_code": 429, "retry_after_s": 1}}
        if self.autoscaling:
            out["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                         "initial_replicas": self.min_replicas,
                                         "target_ongoing_requests": self.target_ongoing_requests}
        else:
            out["num_replicas"] = self.replicas
        return out


def make_plan(ray: RaySettings, engine: EngineSettings) -> DeploymentPlan:
    """The deployment's shape; an ``InvalidRequestError`` naming the flag when it makes no sense."""
    fixed, low, high = ray.replicas, ray.min_replicas, ray.max_replicas
    if fixed is not None and (low is not None or high is not None):
        raise InvalidRequestError("Give either --replicas (a fixed count) or --min-replicas/--max-replicas (autoscaling), not both.",
                                  param="replicas")
    for name, value in (("replicas", fixed), ("min_replicas", low), ("max_replicas", high)):
        if value is not None and value < 1:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be at least 1, got {value}.", param=name)
    if fixed is None and low is None and high is None:
        fixed = 1
    if fixed is None:
        low = low or 1
        high = high or low
        if high < low:
            raise InvalidRequestError(f"--max-replicas ({high}) is below --min-replicas ({low}).", param="max_replicas")
    target = ray.target_ongoing_requests or max(1.0, engine.max_batch_size / 2)
    return DeploymentPlan(replicas=fixed, min_replicas=low, max_replicas=high, target_ongoing_requests=float(target),
                          max_ongoing_requests=engine.max_batch_size, max_queued_requests=max(engine.max_queue, 1),
                          cpus_per_replica=float(engine.threads or 1))
