"""The task commands through the real entry point (a subprocess): classify, embed, imagine; a
second run of a command in a test goes through the same app in process (``cli_in_process``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llamawrapper import pipeline
import tasks_fixtures
from test_cli import cli_in_process

# the shared fixtures, bound here so pytest finds them (an unused import would be a lint error)
minilm_folder = tasks_fixtures.minilm_folder
tiny_diffusers_dir = tasks_fixtures.tiny_diffusers_dir
tiny_encoder_dir = tasks_fixtures.tiny_encoder_dir
tiny_sentiment_dir = tasks_fixtures.tiny_sentiment_dir


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "llamawrapper.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"})


def test_classify_with_a_head_prints_json_lines_equal_to_the_pipeline(tiny_sentiment_dir):
    res = cli("classify", str(tiny_sentiment_dir), "first text", "second text", "--json")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    with pipeline("text-classification", model=str(tiny_sentiment_dir)) as clf:
        expected = clf(["first text", "second text"], top_k=None)
    assert [r["text"] for r in rows] == ["first text", "second text"]
    for row, exp in zip(rows, expected):
        assert row["labels"] == [d["label"] for d in exp]
        assert row["scores"] == pytest.approx([d["score"] for d in exp], abs=1e-6)


def test_classify_errors_are_one_line(tiny_sentiment_dir):
    res = cli("classify", str(tiny_sentiment_dir), "some text", "--labels", "a,b")
    assert res.returncode == 1
    assert "entailment" in res.stderr and "Traceback" not in res.stderr


def test_embed_prints_json_equal_to_the_pipeline(tiny_encoder_dir):
    res = cli("embed", str(tiny_encoder_dir), "hello world", "another one")
    assert res.returncode == 0, res.stderr
    body = json.loads(res.stdout)
    assert body["dimensions"] == 32 and [d["text"] for d in body["data"]] == ["hello world", "another one"]
    with pipeline("feature-extraction", model=str(tiny_encoder_dir)) as emb:
        expected = emb(["hello world", "another one"])
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], expected, atol=1e-6)


def test_imagine_writes_png_with_a_progress_bar(tiny_diffusers_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "cat.png"
    res = cli("imagine", str(tiny_diffusers_dir), "a cat", "-o", str(out), "--steps", "3", "--seed", "1")
    assert res.returncode == 0, res.stderr
    assert Image.open(out).size == (64, 64)
    assert "denoising" in res.stderr and "3/3" in res.stderr
    res = cli_in_process("imagine", str(tiny_diffusers_dir), "a cat", "-o", str(out), "--width", "50")
    assert res.returncode == 1 and "multiple of 8" in res.stderr


@pytest.mark.slow
def test_default_model_classifies_sentiment_and_topics(minilm_folder):
    res = cli("classify", "What a wonderful, delightful evening!", "The food was cold and the staff were rude.")
    assert res.returncode == 0, res.stderr
    assert [line.split("\t")[0] for line in res.stdout.splitlines()] == ["POSITIVE", "NEGATIVE"]
    res = cli_in_process("classify", "minilm", "The striker scored a hat-trick in the derby.", "--labels", "sports,politics,cooking", "--json")
    assert json.loads(res.stdout)["label"] == "sports"
