"""The ``llamawrapper`` command line, one module per command group: models (pull, models,
models lock, eval-ppl), generate (run, chat, tokenize), the server's serve, admin (a running
server's model versions), bench.

Every command loads models through the Python API and reports ``LlamaWrapperError``s as one
line on stderr with exit status 1, never a traceback."""

from __future__ import annotations

from typing import Optional

import typer

from ..config import LogSettings

app = typer.Typer(help="LlamaWrapper: chat models on a plain CPU, as a library, a CLI and an OpenAI-compatible server.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _main(
    log_level: Optional[str] = typer.Option(None, help="Logging level (default: INFO, or LLAMAWRAPPER_LOG_LEVEL)."),
    log_format: Optional[str] = typer.Option(None, help="'text' or 'json' (one JSON object per line)."),
) -> None:
    from .. import logs

    settings = LogSettings(**{k: v for k, v in (("log_level", log_level), ("log_format", log_format)) if v})
    logs.configure(settings.log_level, settings.log_format)


from . import models, generate  # noqa: E402,F401  (each registers its commands on ``app``, in this order)
from ..server.command import serve_command  # noqa: E402  (flags derived from ServerSettings/EngineSettings)

app.command("serve")(serve_command)
from . import tasks  # noqa: E402,F401  (classify, embed, imagine)
from . import admin, bench, keys  # noqa: E402,F401  (keys: the keys and audit command groups)


def main() -> None:
    app()
