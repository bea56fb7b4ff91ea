"""LlamaWrapper as a Ray Serve application.

- ``build_app(...)``: the deployment (the ordinary FastAPI server, one model host per replica),
  for users who run it in their own Ray Serve setup (``serve.run(build_app(...))``);
- ``serve_on_ray(...)``: what ``llamawrapper serve --ray`` runs (connect or start a cluster,
  check capacity, deploy, wait for SIGTERM, drain).

Ray is an optional extra (``pip install 'llamawrapper[ray]'``); importing this package does not
import it, and every entry point says so by name when it is missing."""

from __future__ import annotations

from .plan import DeploymentPlan, make_plan, require_ray
from .app import build_app
from .run import serve_on_ray

__all__ = ["DeploymentPlan", "build_app", "make_plan", "require_ray", "serve_on_ray"]
