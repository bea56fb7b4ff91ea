"""The task endpoints on a real server process beside a chat model: the official openai client's
embeddings.create and images.generate, raw HTTP for /v1/classify, /v1/models' task field, 400s
naming the parameter, and concurrent requests answered correctly through the micro-batcher."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest

from llamawrapper import pipeline
from server_helpers import ServerProcess, openai_client
import tasks_fixtures

# the shared fixtures, bound here so pytest finds them (an unused import would be a lint error)
minilm_folder = tasks_fixtures.minilm_folder
tiny_diffusers_dir = tasks_fixtures.tiny_diffusers_dir
tiny_nli_dir = tasks_fixtures.tiny_nli_dir
tiny_sentiment_dir = tasks_fixtures.tiny_sentiment_dir

pytestmark = pytest.mark.slow
KEY = "sk-tasks-test"
TEXTS = ["The match ended in a penalty shoot-out.", "Stocks fell after the central bank raised rates.",
         "I really enjoyed this film, the acting was superb.", "A new smartphone chip promises longer battery life."]


@pytest.fixture(scope="module")
def server(tmp_path_factory, minilm_folder, tiny_model_dir, tiny_nli_dir, tiny_sentiment_dir, tiny_diffusers_dir):
    log = tmp_path_factory.mktemp("tasks-server") / "server.log"
    srv = ServerProcess(["minilm", f"chat={tiny_model_dir}", f"nli={tiny_nli_dir}", f"sentiment={tiny_sentiment_dir}",
                         f"sd={tiny_diffusers_dir}"], log_path=log, api_key=KEY)
    try:
        yield srv.wait_ready()
    finally:
        srv.terminate()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, timeout=120)


@pytest.fixture(scope="module")
def local_minilm():
    with pipeline("feature-extraction") as emb:
        yield emb


def test_models_say_their_task(server):
    with server.client() as c:
        data = {m["id"]: m["task"] for m in c.get("/v1/models").json()["data"]}
    assert data == {"minilm": "embedding", "chat": "chat", "nli": "zero-shot-classification",
                    "sentiment": "classification", "sd": "text-to-image"}


def test_openai_embeddings_create_matches_the_library(client, local_minilm):
    res = client.embeddings.create(model="minilm", input=TEXTS)  # the client asks for base64 and decodes it
    got = np.array([d.embedding for d in res.data])
    np.testing.assert_allclose(got, local_minilm(TEXTS), atol=1e-5)
    assert [d.index for d in res.data] == [0, 1, 2, 3]
    assert res.usage.prompt_tokens == res.usage.total_tokens > len(TEXTS) * 3
    one = client.embeddings.create(model="minilm", input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, got[0], atol=1e-5)
    short = client.embeddings.create(model="minilm", input=TEXTS[:2], dimensions=64)
    vec = np.array(short.data[0].embedding)
    assert vec.shape == (64,) and np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)


def test_base64_is_little_endian_float32(server, local_minilm):
    with server.client() as c:
        body = c.post("/v1/embeddings", json={"model": "minilm", "input": "hello", "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, local_minilm("hello"), atol=1e-5)


def test_classify_zero_shot_and_sentiment_over_raw_http(server):
    labels = ["sports", "business", "technology"]
    with pipeline("zero-shot-classification") as zs, server.client() as c:
        body = c.post("/v1/classify", json={"model": "minilm", "input": TEXTS[:2] + TEXTS[3:], "labels": labels}).json()
        expected = zs(TEXTS[:2] + TEXTS[3:], candidate_labels=labels)
        assert [d["label"] for d in body["data"]] == ["sports", "business", "technology"]
        for d, e in zip(body["data"], expected):
            assert d["labels"] == e["labels"] and d["scores"] == pytest.approx(e["scores"], abs=1e-5)
            assert d["score"] == d["scores"][0] and sum(d["scores"]) == pytest.approx(1.0)
        sentiment = c.post("/v1/classify", json={"model": "minilm", "input": TEXTS[2]}).json()["data"][0]
        assert sentiment["label"] == "POSITIVE" and set(sentiment["labels"]) == {"POSITIVE", "NEGATIVE"}
        head = c.post("/v1/classify", json={"model": "sentiment", "input": ["a", "b"]}).json()["data"]
        assert len(head) == 2 and set(head[0]["labels"]) == {"POSITIVE", "NEGATIVE"}
        nli = c.post("/v1/classify", json={"model": "nli", "input": "x", "labels": ["a", "b"], "multi_label": True}).json()
        assert sorted(nli["data"][0]["labels"]) == ["a", "b"]
        chat = c.post("/v1/classify", json={"model": "chat", "input": ["x", "y"], "labels": ["yes", "no"]}).json()["data"]
        assert len(chat) == 2 and sorted(chat[0]["labels"]) == ["no", "yes"] and sum(chat[0]["scores"]) == pytest.approx(1.0)


def test_openai_images_generate_is_seeded_and_matches_the_library(client, tiny_diffusers_dir):
    from PIL import Image

    extra = {"seed": 7, "num_inference_steps": 2}
    res = client.images.generate(model="sd", prompt="a red square", n=2, size="64x64", response_format="b64_json",
                                 extra_body=extra)
    again = client.images.generate(model="sd", prompt="a red square", n=2, size="64x64", extra_body=extra)
    assert len(res.data) == 2 and res.data[0].b64_json == again.data[0].b64_json
    image = Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json)))
    assert image.size == (64, 64) and image.format == "PNG"
    with pipeline("text-to-image", model=str(tiny_diffusers_dir)) as gen:
        local = gen("a red square", num_images=2, num_inference_steps=2, seed=7, width=64, height=64, progress=False)
    tasks_fixtures.assert_same_image(image.convert("RGB"), local[0].convert("RGB"))


@pytest.mark.parametrize("path,body,param", [
    ("/v1/embeddings", {"model": "chat", "input": "x"}, "model"),
    ("/v1/embeddings", {"model": "minilm", "input": []}, "input"),
    ("/v1/embeddings", {"model": "minilm", "input": ["ok", 3]}, "input"),
    ("/v1/embeddings", {"model": "minilm", "input": [[1, 2, 3]]}, "input"),
    ("/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": 999}, "dimensions"),
    ("/v1/embeddings", {"model": "minilm", "input": "x", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/classify", {"model": "minilm", "input": "x", "labels": []}, "labels"),
    ("/v1/classify", {"model": "sentiment", "input": "x", "labels": ["a", "b"]}, "model"),
    ("/v1/classify", {"model": "sd", "input": "x"}, "model"),
    ("/v1/classify", {"model": "chat", "input": "x"}, "model"),
    ("/v1/images/generations", {"model": "minilm", "prompt": "a cat"}, "model"),
    ("/v1/images/generations", {"model": "sd", "prompt": "a cat", "n": 0}, "n"),
    ("/v1/images/generations", {"model": "sd", "prompt": "a cat", "size": "huge"}, "size"),
    ("/v1/images/generations", {"model": "sd", "prompt": "a cat", "size": "63x64"}, "size"),
    ("/v1/images/generations", {"model": "sd", "prompt": "a cat", "response_format": "url"}, "response_format"),
    ("/v1/classify", {"model": "minilm", "input": []}, "input"),
    ("/v1/classify", {"model": "minilm", "input": ["a", 5]}, "input"),
    ("/v1/classify", {"model": "minilm", "input": "x", "labels": ["a", "a"]}, "labels"),
    ("/v1/images/generations", {"model": "chat", "prompt": "a cat"}, "model"),
    ("/v1/images/generations", {"model": "sd", "prompt": 5}, "prompt"),
    ("/v1/images/generations", {"model": "sd", "prompt": "a cat", "n": 11}, "n"),
    ("/v1/images/generations", {"model": "sd", "prompt": "a cat", "size": "4096x4096"}, "size"),
    ("/v1/images/generations", {"model": "sd", "prompt": "a cat", "num_inference_steps": 0}, "num_inference_steps"),
])
def test_bad_requests_are_400_naming_the_parameter(server, path, body, param):
    with server.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_32_concurrent_embedding_requests_get_their_own_answers(server, local_minilm):
    texts = [f"request number {i} is about {'cats' if i % 2 else 'the stock market'}" for i in range(32)]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as c:
            return await asyncio.gather(*[c.post("/v1/embeddings", json={"model": "minilm", "input": t,
                                                                         "encoding_format": "float"}) for t in texts])

    responses = asyncio.run(main())
    got = np.array([r.json()["data"][0]["embedding"] for r in responses])
    np.testing.assert_allclose(got, local_minilm(texts), atol=1e-5)


def test_task_metrics_count_requests_inputs_latency_and_batch_sizes(server):
    """/metrics after real task requests: per served name and version (the labels chat uses),
    requests by task and outcome, inputs, latency, and the micro-batcher's batch sizes."""
    def grab():
        m = server.metrics()
        get = lambda name, **labels: sum(v for (n, ls), v in m.items()  # noqa: E731
                                         if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))
        return get

    before = grab()
    with server.client() as c:
        assert c.post("/v1/embeddings", json={"model": "minilm", "input": TEXTS + ["one more"]}).status_code == 200
    mid = grab()
    minilm = {"model": "minilm", "version": "v1"}
    # one lone request of 5 texts: one forward of 5 on minilm's batcher
    assert mid("llamawrapper_task_batch_size_count", **minilm) - before("llamawrapper_task_batch_size_count", **minilm) == 1
    assert mid("llamawrapper_task_batch_size_sum", **minilm) - before("llamawrapper_task_batch_size_sum", **minilm) == 5
    assert mid("llamawrapper_task_batch_size_bucket", le="4.0", **minilm) == before("llamawrapper_task_batch_size_bucket", le="4.0", **minilm)
    assert mid("llamawrapper_task_batch_size_bucket", le="8.0", **minilm) - before("llamawrapper_task_batch_size_bucket", le="8.0", **minilm) == 1
    embed = {**minilm, "task": "embed"}
    assert mid("llamawrapper_task_requests_total", outcome="ok", **embed) - before("llamawrapper_task_requests_total", outcome="ok", **embed) == 1
    assert mid("llamawrapper_task_inputs_total", **embed) - before("llamawrapper_task_inputs_total", **embed) == 5
    assert mid("llamawrapper_task_request_latency_seconds_count", **embed) - before("llamawrapper_task_request_latency_seconds_count", **embed) == 1
    assert mid("llamawrapper_task_request_latency_seconds_sum", **embed) > before("llamawrapper_task_request_latency_seconds_sum", **embed)

    with server.client() as c:
        assert c.post("/v1/classify", json={"model": "sentiment", "input": ["a", "b", "c"]}).status_code == 200
        assert c.post("/v1/embeddings", json={"model": "minilm", "input": "x", "dimensions": 999}).status_code == 400
        assert c.post("/v1/images/generations", json={"model": "sd", "prompt": "a cat", "n": 2, "size": "64x64",
                                                      "num_inference_steps": 1}).status_code == 200
    after = grab()
    head = {"model": "sentiment", "version": "v1"}
    assert after("llamawrapper_task_requests_total", task="classify", outcome="ok", **head) - \
        mid("llamawrapper_task_requests_total", task="classify", outcome="ok", **head) == 1
    assert after("llamawrapper_task_batch_size_sum", **head) - mid("llamawrapper_task_batch_size_sum", **head) == 3
    assert after("llamawrapper_task_requests_total", outcome="error", **embed) - mid("llamawrapper_task_requests_total", outcome="error", **embed) == 1
    images = {"model": "sd", "version": "v1", "task": "images"}
    assert after("llamawrapper_task_inputs_total", **images) - mid("llamawrapper_task_inputs_total", **images) == 2
    assert after("llamawrapper_task_requests_total", outcome="ok", **images) - mid("llamawrapper_task_requests_total", outcome="ok", **images) == 1
