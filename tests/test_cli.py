"""The command line through its real entry point (a subprocess running ``llamawrapper``);
``cli_in_process`` runs the same Typer app in this process (``CliRunner``) for the checks where a
new process adds nothing but ~6 s of imports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXE = str(Path(sys.executable).parent / "llamawrapper")


def cli(*args, stdin=None, timeout=300):
    return subprocess.run([EXE, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"})


def cli_in_process(*args, env=None) -> subprocess.CompletedProcess:
    """The command through ``CliRunner`` on the app the entry point calls, shaped like ``cli``'s result."""
    from typer.testing import CliRunner

    from llamawrapper.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args], env={"NO_COLOR": "1", "COLUMNS": "200", **(env or {})})
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)


def test_help_lists_commands():
    res = cli("--help")
    assert res.returncode == 0
    for cmd in ("pull", "models", "run", "chat", "tokenize"):
        assert cmd in res.stdout


def test_commands_that_need_no_model_do_not_load_torch(tmp_path):
    """``keys``, ``admin`` and ``--help`` answer without importing torch or transformers (seconds);
    the package's public names still import on first use."""
    code = ("import sys, runpy; sys.argv = ['llamawrapper', 'keys', 'list', '--json']\n"
            "try:\n    runpy.run_module('llamawrapper.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
            "import llamawrapper\n"
            "print(heavy, llamawrapper.LlamaWrapper.__name__, 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LLAMAWRAPPER_HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[] LlamaWrapper True", res.stdout


def test_run_json_prints_result_and_streams_the_same_text(tiny_model_dir):
    res = cli("run", str(tiny_model_dir), "hello", "--json", "--temperature", "0", "--max-tokens", "5")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["finish_reason"] in ("stop", "length")
    assert data["usage"]["completion_tokens"] <= 5 and data["usage"]["prompt_tokens"] > 0
    assert isinstance(data["text"], str)
    streamed = cli_in_process("run", str(tiny_model_dir), "hello", "--temperature", "0", "--max-tokens", "5", "-q")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == data["text"] + "\n"


def test_tokenize_json(tiny_model_dir):
    res = cli("tokenize", str(tiny_model_dir), "Hello world", "--json")
    data = json.loads(res.stdout)
    assert data["count"] == len(data["ids"]) == 2 and "".join(data["pieces"]) == "Hello world"


def test_models_lists_alias_and_cache():
    data = json.loads(cli("models", "--json").stdout)
    assert any(a["alias"] == "smollm2" for a in data["aliases"])
    assert all("source_sha256" in c and c["size_bytes"] > 0 for c in data["cached"])


@pytest.mark.parametrize(
    "args, needle",
    [
        (("run", "no-such-model", "hi"), "not found"),
        (("run", "{tiny}", "hi", "--temperature", "5"), "temperature"),
        (("run", "{tiny}", "hi", "--max-tokens", "-2"), "max_tokens"),
    ],
)
def test_errors_are_one_line_not_tracebacks(tiny_model_dir, args, needle):
    res = cli(*[a.replace("{tiny}", str(tiny_model_dir)) for a in args])
    assert res.returncode == 1
    assert "error:" in res.stderr and needle in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_chat_session_reset_and_exit(tiny_model_dir):
    res = cli("chat", str(tiny_model_dir), "--temperature", "0", "--max-tokens", "4",
              stdin="first\n/reset\nsecond\n/nonsense\n/exit\n")
    assert res.returncode == 0, res.stderr
    assert "(conversation cleared)" in res.stdout and "unknown command" in res.stdout
    assert res.stdout.count(">>> ") == 5


def test_chat_session_keeps_history(tiny_llm):
    import io

    from llamawrapper.chat_session import ChatSession

    out = io.StringIO()
    session = ChatSession(tiny_llm, system="Be brief.", sampling={"max_tokens": 3, "temperature": 0},
                          stdin=io.StringIO("a\nb\n/reset\n"), stdout=out)
    session.loop()  # ends at end of input
    assert [m["role"] for m in session.history] == ["system"]  # reset kept only the system prompt
    session.turn("c")
    assert [m["role"] for m in session.history] == ["system", "user", "assistant"]


@pytest.mark.slow
def test_run_real_model_answers():
    res = cli("run", "smollm2", "What is the capital of France?", "--temperature", "0", "--max-tokens", "32", "-q")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_not_the_session():
    import signal
    import time

    # as from a terminal: SIGINT handled, even when this run inherited it ignored (a background job)
    proc = subprocess.Popen([EXE, "chat", "smollm2", "--max-tokens", "2000", "--temperature", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NO_COLOR": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdin.write("Write a very long essay about the history of Rome.\n")
        proc.stdin.flush()
        seen = ""
        deadline = time.time() + 120
        while time.time() < deadline and seen.count(">>> ") < 1:
            seen += proc.stdout.read(1)
        while time.time() < deadline and len(seen.split(">>> ", 1)[1]) < 40:  # the answer is streaming
            seen += proc.stdout.read(1)
        proc.send_signal(signal.SIGINT)
        proc.stdin.write("/exit\n")
        proc.stdin.flush()
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "[stopped]" in seen + rest
    assert "Traceback" not in err
