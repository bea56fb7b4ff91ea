"""Fast checks of the server's pieces that need no model: settings from flags, env vars and the
config file (one definition, flags win); ``serve --help`` lists a flag for every setting; errors
mapped to statuses by exception type; API keys compared correctly; the app's OpenAPI schema
has no FastAPI 422 shapes."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from llamawrapper.cli import app as cli_app
from llamawrapper.config import EngineSettings, ServerSettings
from llamawrapper.errors import (
    ContextLengthExceededError,
    GenerationError,
    InvalidRequestError,
    ModelNotFoundError,
    QueueFullError,
)
from llamawrapper.server.command import settings_from_flags
from llamawrapper.server.errors import from_exception, validation_error
from llamawrapper.models.modelsfile import split_serve_spec


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    import os

    for key in list(os.environ):
        if key.startswith("LLAMAWRAPPER_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("LLAMAWRAPPER_HOME", str(tmp_path))
    return tmp_path


def test_settings_precedence_flag_over_env_over_file(clean_env, monkeypatch):
    config = clean_env / "config.toml"
    config.write_text('[server]\nport = 9001\nhost = "0.0.0.0"\napi_keys = ["from-file"]\n[engine]\nmax_queue = 3\n')
    server, engine = settings_from_flags({})
    assert (server.port, server.host, server.api_keys, engine.max_queue) == (9001, "0.0.0.0", ["from-file"], 3)
    monkeypatch.setenv("LLAMAWRAPPER_PORT", "9002")
    monkeypatch.setenv("LLAMAWRAPPER_API_KEYS", "a, b")
    server, engine = settings_from_flags({"max_queue": 5})
    assert (server.port, server.api_keys, engine.max_queue) == (9002, ["a", "b"], 5)
    server, _ = settings_from_flags({"port": 9003, "api_keys": ["flag"], "models": ["x=/some/dir"]})
    assert (server.port, server.api_keys, server.models) == (9003, ["flag"], ["x=/some/dir"])


def test_defaults_come_from_the_settings_class(clean_env):
    server, engine = settings_from_flags({"port": None, "api_keys": []})
    assert server == ServerSettings() and engine == EngineSettings()
    assert server.models == ["smollm2"] and server.api_keys == []
    assert "api_keys" not in repr(server)  # keys never end up in logs through a repr


def test_serve_help_has_a_flag_for_every_setting():
    result = CliRunner().invoke(cli_app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in [*ServerSettings.model_fields, *EngineSettings.model_fields]:
        if name == "models":
            continue
        flag = "--api-key" if name == "api_keys" else "--" + name.replace("_", "-")
        assert flag in result.output, flag


def test_a_yes_no_setting_is_turned_on_and_off_from_the_command_line(clean_env, monkeypatch):
    """A boolean engine setting has ``--x`` and ``--no-x`` (``--no-fuse-projections`` turns off
    what is on by default), and neither given leaves the setting to env and config."""
    from llamawrapper.server import run

    seen = []
    monkeypatch.setattr(run, "serve", lambda server, engine, security: seen.append(engine))
    for args, fuse, pin in ((["--no-fuse-projections", "--pin-threads"], False, True),
                            (["--fuse-projections", "--no-pin-threads"], True, False), ([], True, None)):
        result = CliRunner().invoke(cli_app, ["serve", "smollm2", *args])
        assert result.exit_code == 0, result.output
        assert (seen[-1].fuse_projections, seen[-1].pin_threads) == (fuse, pin)


def test_serve_rejects_a_bad_flag_value(clean_env):
    result = CliRunner().invoke(cli_app, ["serve", "--port", "70000"])
    assert result.exit_code == 2 and "port" in result.output


@pytest.mark.parametrize("exc, status, code, param", [
    (InvalidRequestError("bad", param="temperature"), 400, "invalid_value", "temperature"),
    (ContextLengthExceededError(9000, 10, 8192), 400, "context_length_exceeded", "messages"),
    (ModelNotFoundError("nope"), 404, "model_not_found", "model"),
    (QueueFullError(retry_after=2.5), 429, "queue_full", None),
    (GenerationError("boom"), 500, "generation_failed", None),
    (RuntimeError("internal detail"), 500, None, None),
])
def test_errors_map_by_type(exc, status, code, param):
    err = from_exception(exc)
    body = err.body()["error"]
    assert (err.status, body["code"], body["param"]) == (status, code, param)
    assert set(body) == {"message", "type", "param", "code"}
    if status == 429:
        assert err.headers["Retry-After"] == "3"
    if isinstance(exc, RuntimeError):
        assert "internal detail" not in body["message"]


def test_validation_errors_name_the_parameter():
    err = validation_error([{"loc": ("body", "messages", 0, "content"), "msg": "bad", "type": "x"}])
    assert err.status == 400 and err.param == "messages[0].content"


def test_unparseable_body_is_called_invalid_json():
    err = validation_error([{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error",
                             "ctx": {"error": "Expecting property name enclosed in double quotes"}}])
    assert (err.status, err.code, err.param) == (400, "invalid_json", None)
    assert "not valid JSON" in err.message


def test_model_specs():
    def pair(spec):
        name, model = split_serve_spec(spec)
        return name, model.source

    assert pair("smollm2") == ("smollm2", "smollm2")
    assert pair("tiny=/tmp/model") == ("tiny", "/tmp/model")
    assert pair("org/model@rev") == ("org/model@rev", "org/model@rev")


def test_openapi_has_no_fastapi_422_shapes(clean_env):
    from llamawrapper.server import create_app

    schema = create_app(ServerSettings(models=["unused"])).openapi()
    for path, ops in schema["paths"].items():
        for op in ops.values():
            assert "422" not in op["responses"], path
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert "400" in schema["paths"]["/v1/chat/completions"]["post"]["responses"]


def test_http_layer_never_imports_torch():
    import ast
    from pathlib import Path

    import llamawrapper.server as server_pkg

    for path in Path(server_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "torch" or n.startswith("torch.") for n in names), path.name


def test_log_records_follow_sys_stderr_after_it_is_swapped_and_closed(monkeypatch):
    """``logs.configure()`` without a stream writes each record to the ``sys.stderr`` of that
    moment: after a caller swaps it and closes the old one (as pytest's capture does after a test
    that ran the CLI in process), records from any thread still land, with no logging error."""
    import io
    import logging
    import sys
    import threading

    from llamawrapper import logs

    root = logging.getLogger("llamawrapper")
    saved = (root.handlers[:], root.level, root.propagate)
    errors: list = []
    monkeypatch.setattr(logging.Handler, "handleError", lambda self, record: errors.append(record))
    try:
        first = io.StringIO()
        monkeypatch.setattr(sys, "stderr", first)
        logs.configure("INFO", "text")
        logging.getLogger("llamawrapper.engine").warning("one")
        assert "one" in first.getvalue()
        first.close()
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        t = threading.Thread(target=lambda: logging.getLogger("llamawrapper.engine").warning("two"))
        t.start()
        t.join()
        assert "WARNING llamawrapper.engine: two" in second.getvalue() and not errors
    finally:
        root.handlers[:], root.level, root.propagate = saved
