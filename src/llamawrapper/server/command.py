"""The ``serve`` command, its flags derived from ``ServerSettings`` and ``EngineSettings``
fields (name, type, description, default), so flags, ``LLAMAWRAPPER_*`` variables and the
config file's ``[server]``/``[engine]`` tables can never disagree. A flag left out means
"whatever env/config/default say": every generated option defaults to ``None``.

Importing this module is cheap (no FastAPI, no torch); ``serve`` imports the app lazily."""

from __future__ import annotations

import inspect
import os
import typing
from typing import Any, List, Optional

import typer
from pydantic.fields import FieldInfo

from ..config import EngineSettings, RaySettings, SecuritySettings, ServerSettings
from ..errors import LlamaWrapperError

_FLAG_NAMES = {"api_keys": "--api-key"}  # repeatable flags read better in the singular
_POSITIONAL = "models"


def _base_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Annotated:
        return _base_type(args[0])
    if typing.get_origin(annotation) in (list, List):
        return List[str]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return _base_type(args[0])
    return annotation


def _default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return ", ".join(value) if isinstance(value, list) and value else ("none" if not value else str(value))
    return str(field.default)


def _parameter(name: str, field: FieldInfo, group: str) -> inspect.Parameter:
    kind = _base_type(field.annotation)
    env = f"LLAMAWRAPPER_{name.upper()}"
    if name == _POSITIONAL:
        info = typer.Argument(None, help=f"{field.description} (default: {_default_text(field)}; env {env})",
                              show_default=False, metavar="MODEL...")
    else:
        flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        if kind is bool:  # on and off from the command line, whichever the default
            flag = f"{flag}/--no-{flag[2:]}"
        shown = _default_text(field)
        info = typer.Option(None, flag, help=f"{field.description} (default: {shown}; env {env})",
                            show_default=False, rich_help_panel=group)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=Optional[kind])


def _parameters() -> list[inspect.Parameter]:
    params = [_parameter(n, f, "Server") for n, f in ServerSettings.model_fields.items()]
    params += [_parameter(n, f, "Engine") for n, f in EngineSettings.model_fields.items()]
    params += [_parameter(n, f, "Security") for n, f in SecuritySettings.model_fields.items()]
    params += [_parameter(n, f, "Ray Serve") for n, f in RaySettings.model_fields.items() if n != "ray"]
    params.append(inspect.Parameter("ray", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[bool], default=typer.Option(
        None, "--ray/--no-ray", help=f"{RaySettings.model_fields['ray'].description} (env LLAMAWRAPPER_RAY)",
        show_default=False, rich_help_panel="Ray Serve")))
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
        None, "--config", help="TOML config file with server and engine tables (env LLAMAWRAPPER_CONFIG).",
        show_default=False)))
    models = next(p for p in params if p.name == _POSITIONAL)
    return [models] + [p for p in params if p.name != _POSITIONAL]


def settings_from_flags(flags: dict[str, Any]) -> tuple[ServerSettings, EngineSettings]:
    """Settings where flags given on the command line win over env vars and the config file."""
    given = {k: v for k, v in flags.items() if v is not None and v != []}
    if given.get("models_file") and "models" not in given:
        given["models"] = []  # a models file alone serves just what it lists
    server = ServerSettings(**{k: v for k, v in given.items() if k in ServerSettings.model_fields})
    engine = EngineSettings(**{k: v for k, v in given.items() if k in EngineSettings.model_fields})
    return server, engine


def security_from_flags(flags: dict[str, Any]) -> SecuritySettings:
    """``SecuritySettings`` where flags given on the command line win over env vars and the config file."""
    return SecuritySettings(**{k: v for k, v in flags.items() if v is not None and k in SecuritySettings.model_fields})


def ray_from_flags(flags: dict[str, Any]) -> RaySettings:
    """``RaySettings`` (``--ray``, ``--replicas``, ...) where flags win over env vars and the config file."""
    return RaySettings(**{k: v for k, v in flags.items() if v is not None and k in RaySettings.model_fields})


def serve_command(**flags: Any) -> None:
    """Serve models over the OpenAI HTTP API (chat, completions, models, tokenize, metrics)."""
    from pydantic import ValidationError

    config = flags.pop("config", None)
    if config:
        os.environ["LLAMAWRAPPER_CONFIG"] = config
    try:
        server, engine = settings_from_flags(flags)
        security = security_from_flags(flags)
        ray = ray_from_flags(flags)
    except ValidationError as exc:
        first = exc.errors()[0]
        typer.echo(f"error: --{'-'.join(str(p) for p in first['loc']).replace('_', '-')}: {first['msg']}", err=True)
        raise typer.Exit(2)
    scaled = [n for n in ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests")
              if getattr(ray, n) is not None] + (["routing"] if ray.routing != "pow2" else [])
    if scaled and not ray.ray:
        typer.echo(f"error: --{scaled[0].replace('_', '-')} needs --ray (replicas are Ray Serve's).", err=True)
        raise typer.Exit(2)
    try:
        if ray.ray:
            from ..deploy import serve_on_ray

            serve_on_ray(server, engine, security, ray)
            return
        from .run import serve

        serve(server, engine, security)
    except LlamaWrapperError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)


serve_command.__signature__ = inspect.Signature(_parameters())  # type: ignore[attr-defined]
