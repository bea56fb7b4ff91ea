"""Sampling flags of ``llamawrapper run`` on the tiny model: --logprobs/--top-logprobs,
--logit-bias, penalties, -n; bad values are one-line errors. Through the real entry point where
a new process matters (a seed reproducing in another process), else in process through the
Typer app the entry point calls (``CliRunner``: no ~6 s of imports per run)."""

import json

import pytest

from test_cli import cli, cli_in_process


def run_json(model_dir, *flags, new_process: bool = False):
    args = ("run", str(model_dir), "hello", "--json", "--max-tokens", "4", *flags)
    res = (cli if new_process else cli_in_process)(*args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_logprobs_and_logit_bias_flags(tiny_model_dir, tiny_llm):
    data = run_json(tiny_model_dir, "--temperature", "0", "--top-logprobs", "2")
    assert len(data["logprobs"]) == data["usage"]["completion_tokens"] or data["finish_reason"] == "stop"
    assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in data["logprobs"])
    assert "".join(t["token"] for t in data["logprobs"]) == data["text"]
    forced = tiny_llm.tokenize(" Paris")[0]
    biased = run_json(tiny_model_dir, "--temperature", "1", "--logit-bias", f"{forced}=100", "--frequency-penalty", "1")
    assert biased["text"] == " Paris" * 4


def test_n_choices_flag(tiny_model_dir):
    data = run_json(tiny_model_dir, "--temperature", "1", "--seed", "4", "-n", "3", new_process=True)
    texts = [c["text"] for c in data["choices"]]
    assert len(texts) == 3 and len(set(texts)) > 1
    # the same seed in another process (this one) gives the same three answers
    assert [c["text"] for c in run_json(tiny_model_dir, "--temperature", "1", "--seed", "4", "-n", "3")["choices"]] == texts


@pytest.mark.parametrize("flags, needle", [
    (("--logit-bias", "abc=3"), "logit_bias"),
    (("--logit-bias", "5"), "logit-bias"),
    (("--presence-penalty", "3"), "presence_penalty"),
    (("--top-logprobs", "30"), "top_logprobs"),
])
def test_bad_sampling_flags_are_one_line_errors(tiny_model_dir, flags, needle):
    res = cli("run", str(tiny_model_dir), "hi", *flags)
    assert res.returncode == 1 and "error:" in res.stderr and needle in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
