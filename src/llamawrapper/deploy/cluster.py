"""The Ray cluster under ``serve --ray``: connect to ``RAY_ADDRESS`` (refusing in bounded time
when nothing answers there) or start a local one, and check the replicas fit before deploying."""

from __future__ import annotations

import os
import socket
import threading
from typing import Optional
from urllib.parse import urlparse

from .plan import DeploymentPlan, RayUnavailableError

CONNECT_TIMEOUT = 25.0  # seconds for ray.init on a given address; the probe itself takes at most 10


def ray_address() -> Optional[str]:
    """``RAY_ADDRESS`` when it names a cluster (``host:port`` or ``ray://host:port``); None = start a local one."""
    address = (os.environ.get("RAY_ADDRESS") or "").strip()
    return address if address and address not in ("local",) else None


def _probe(address: str) -> None:
    """Fail fast, naming the address, when no TCP port answers there."""
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port or (10001 if parsed.scheme == "ray" else 6379)
    try:
        with socket.create_connection((host, port), timeout=10):
            pass
    except OSError as exc:
        raise RayUnavailableError(f"Cannot reach the Ray cluster at RAY_ADDRESS={address} ({exc}).") from exc


def connect() -> bool:
    """Connect this process to the cluster; True when a local cluster was started here."""
    import ray

    address = ray_address()
    if address:
        _probe(address)
    outcome: dict = {}

    def init() -> None:
        try:
            ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                     configure_logging=False)
            outcome["ok"] = True
        except Exception as exc:  # raised in the caller below
            outcome["error"] = exc

    if address is None:
        # a local cluster starts on this thread: its processes die with the thread that
        # started them (PR_SET_PDEATHSIG), so never on a helper thread
        init()
    else:
        worker = threading.Thread(target=init, name="ray-init", daemon=True)
        worker.start()
        worker.join(CONNECT_TIMEOUT)
    if "error" in outcome:
        where = f"RAY_ADDRESS={address}" if address else "a local Ray cluster"
        raise RayUnavailableError(f"Cannot connect to {where}: {outcome['error']}") from outcome["error"]
    if not outcome.get("ok"):
        raise RayUnavailableError(f"No Ray cluster answered at RAY_ADDRESS={address} within {CONNECT_TIMEOUT:.0f} s.")
    return address is None


def check_capacity(plan: DeploymentPlan) -> None:
    """Refuse a deployment the cluster cannot place (before anything is deployed)."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 0))
    need = plan.replicas_at_start * plan.cpus_per_replica
    if need > cpus:
        raise RayUnavailableError(
            f"{plan.replicas_at_start} replica(s) x {plan.cpus_per_replica:g} CPU each need {need:g} CPUs, but the Ray "
            f"cluster has {cpus:g}; ask for fewer --replicas (or --threads), or add nodes.")
