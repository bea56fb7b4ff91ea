"""``serve --ray`` refusing bad input clearly and before anything starts: the plan's checks
(units), Ray missing, an unreachable ``RAY_ADDRESS``, more replicas than a real local cluster
can place."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from llamawrapper.config import EngineSettings, RaySettings
from llamawrapper.deploy import make_plan
from llamawrapper.errors import InvalidRequestError
from server_helpers import free_port


def _serve(*flags: str, env: dict | None = None, timeout: float = 120, block_ray: bool = False) -> subprocess.CompletedProcess:
    code = "import sys; sys.modules['ray'] = None\n" if block_ray else ""
    code += "from llamawrapper.cli import main; main()"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMAWRAPPER_", "RAY_")) or k == "LLAMAWRAPPER_HOME"}
    full_env.update({"RAY_USAGE_STATS_ENABLED": "0", **(env or {})})
    return subprocess.run([sys.executable, "-c", code, "serve", "smollm2", "--port", str(free_port()), *flags],
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def test_plan_from_batch_size_and_flags():
    engine = EngineSettings(max_batch_size=6, max_queue=10, threads=1)
    fixed = make_plan(RaySettings(replicas=3), engine)
    assert fixed.deployment_options() == {"num_replicas": 3, "max_ongoing_requests": 6, "max_queued_requests": 10,
                                          "backpressure_config": {"status_code": 429, "retry_after_s": 1}}
    assert fixed.cpus_per_replica == 1 and fixed.replicas_at_start == 3
    auto = make_plan(RaySettings(min_replicas=1, max_replicas=4), engine)
    scaling = auto.deployment_options()["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (1, 4, 3.0)
    assert make_plan(RaySettings(), EngineSettings(threads=2)).replicas == 1
    assert make_plan(RaySettings(), EngineSettings(threads=2)).cpus_per_replica == 2


@pytest.mark.parametrize("settings, param", [
    (RaySettings(replicas=2, max_replicas=3), "replicas"),
    (RaySettings(min_replicas=3, max_replicas=2), "max_replicas"),
])
def test_plan_refuses_contradictions(settings, param):
    with pytest.raises(InvalidRequestError) as info:
        make_plan(settings, EngineSettings())
    assert info.value.param == param


def test_flags_refused_before_anything_starts():
    zero = _serve("--ray", "--replicas", "0")
    assert zero.returncode == 2 and "--replicas" in zero.stderr and "1" in zero.stderr
    alone = _serve("--replicas", "2")
    assert alone.returncode == 2 and "--ray" in alone.stderr
    both = _serve("--ray", "--replicas", "2", "--min-replicas", "1")
    assert both.returncode == 1 and "not both" in both.stderr


def test_ray_missing_names_the_extra():
    result = _serve("--ray", block_ray=True)
    assert result.returncode == 1 and "llamawrapper[ray]" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_unreachable_ray_address_is_named_within_30_s():
    pytest.importorskip("ray.serve")
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = _serve("--ray", env={"RAY_ADDRESS": address}, timeout=60)
    assert time.monotonic() - start < 30
    assert result.returncode == 1 and f"RAY_ADDRESS={address}" in result.stderr


@pytest.mark.slow
def test_more_replicas_than_the_cluster_can_place():
    pytest.importorskip("ray.serve")
    cpus = os.cpu_count() or 1
    result = _serve("--ray", "--replicas", str(cpus + 1), "--threads", "1")
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"need {cpus + 1} CPUs" in result.stderr and "Traceback" not in result.stderr
