"""``llamawrapper run`` with output constraints, tools, plugins and the cache on the tiny
random-weight model (only the grammar makes its answers well-formed): through the real entry
point where a new process matters (the cache surviving one), else in process through the same
Typer app the entry point calls (``CliRunner``), which spares ~6 s of imports per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import test_cli

EXE = str(Path(sys.executable).parent / "llamawrapper")


def cli(*args, home: Path):
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "LLAMAWRAPPER_HOME": str(home)}
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300, env=env)


def cli_in_process(*args, home: Path) -> subprocess.CompletedProcess:
    return test_cli.cli_in_process(*args, env={"LLAMAWRAPPER_HOME": str(home)})


def test_run_with_schema_choice_and_cache(tiny_model_dir, tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    args = ("run", str(tiny_model_dir), "hi", "--json", "--temperature", "0", "--max-tokens", "20", "--cache", "--schema", json.dumps(schema))
    first = cli(*args, home=tmp_path)
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert 0 <= json.loads(data["text"])["n"] <= 9 and data["finish_reason"] == "stop" and data["cache"] == "miss"
    again = json.loads(cli(*args, home=tmp_path).stdout)  # a new process: the SQLite cache survived
    assert again["cache"] == "hit" and again["text"] == data["text"]
    res = cli_in_process("run", str(tiny_model_dir), "hi", "-q", "--temperature", "0", "--choice", "red", "--choice", "blue", home=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() in ("red", "blue")


def test_run_tool_call_and_errors(tiny_model_dir, tmp_path):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "b"]}}}]
    res = cli("run", str(tiny_model_dir), "1+2?", "--json", "--temperature", "0", "--max-tokens", "40", "--tools", json.dumps(tools),
              "--tool-choice", "add", home=tmp_path)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    (call,) = data["tool_calls"]
    assert data["finish_reason"] == "tool_calls" and set(json.loads(call["function"]["arguments"])) == {"a", "b"}
    bad = cli_in_process("run", str(tiny_model_dir), "hi", "-q", "--schema", '{"not": {}}', home=tmp_path)
    assert bad.returncode == 1 and "not" in bad.stderr and "Traceback" not in bad.stderr
    guard = cli_in_process("run", str(tiny_model_dir), "x" * 50, "-q", "--plugin", 'input_guard={"max_chars": 10}', home=tmp_path)
    assert guard.returncode == 1 and "input_guard" in guard.stderr
