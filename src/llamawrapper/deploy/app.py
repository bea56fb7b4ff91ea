"""``build_app``: the Ray Serve application of LlamaWrapper's server, one model host per
replica, with the replica count, admission and CPUs from a ``DeploymentPlan``."""

from __future__ import annotations

import os
import uuid
from typing import Any, Optional, Sequence

from ..config import EngineSettings, RaySettings, SecuritySettings, ServerSettings
from .plan import DeploymentPlan, make_plan, require_ray

DEPLOYMENT_NAME = "LlamaWrapper"
# what a replica must see as the driver does: settings read from the environment inside the
# replica (the response cache, logging, the cache folder) and the code's location
_FORWARDED_PREFIXES = ("LLAMAWRAPPER_", "HF_", "TRANSFORMERS_")
_FORWARDED_NAMES = ("PYTHONPATH",)


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_PREFIXES) or k in _FORWARDED_NAMES}


def build_app(models: Optional[Sequence[str]] = None, *, settings: Optional[ServerSettings] = None,
              engine: Optional[EngineSettings] = None, security: Optional[SecuritySettings] = None,
              ray: Optional[RaySettings] = None, plan: Optional[DeploymentPlan] = None,
              request_router: Optional[str] = None) -> Any:
    """A Ray Serve ``Application`` serving ``models`` (or ``settings.models``) through the same
    FastAPI app as ``llamawrapper serve``, for ``serve.run(...)``. Settings left out are read as
    the CLI reads them (env vars, config file). ``request_router``: ``"prefix"`` routes requests
    that share a prompt prefix to the same replica (``llamawrapper.deploy.routing``); default is
    Ray Serve's power-of-two-choices. Each call names a new deployment id: the admin log of
    model admin calls that replicas started later replay (``adminlog.py``) starts empty."""
    serve = require_ray()
    if settings is None:
        settings = ServerSettings(**({"models": list(models)} if models else {}))
    elif models:
        settings = settings.model_copy(update={"models": list(models)})
    engine = engine or EngineSettings()
    security = security or SecuritySettings()
    plan = plan or make_plan(ray or RaySettings(), engine)
    from .replica import LlamaWrapperReplica

    options = plan.deployment_options()
    if request_router == "prefix":
        from ray.serve.config import RequestRouterConfig

        options["request_router_config"] = RequestRouterConfig(
            request_router_class="llamawrapper.deploy.routing:PrefixAffinityRouter")
    elif request_router not in (None, "pow2"):
        raise ValueError(f"unknown request_router {request_router!r}: 'prefix' or None")
    deployment = serve.deployment(
        LlamaWrapperReplica, name=DEPLOYMENT_NAME,
        ray_actor_options={"num_cpus": plan.cpus_per_replica, "runtime_env": {"env_vars": forwarded_env()}},
        graceful_shutdown_timeout_s=max(settings.drain_timeout, 1.0), graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=5, health_check_timeout_s=30, **options)
    return deployment.bind(settings, engine, security, uuid.uuid4().hex[:12])
