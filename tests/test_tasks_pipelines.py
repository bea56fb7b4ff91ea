"""pipeline(): outputs equal transformers.pipeline's and sentence-transformers' on tiny
random-weight models (and on the real minilm), the task/model mismatches raise typed errors that
say what is needed, a task model given as a chat model names the pipeline to use."""

from __future__ import annotations

import numpy as np
import pytest

from llamawrapper import InvalidModelError, InvalidRequestError, pipeline
import tasks_fixtures

# the shared fixtures, bound here so pytest finds them (an unused import would be a lint error)
minilm_folder = tasks_fixtures.minilm_folder
tiny_encoder_dir = tasks_fixtures.tiny_encoder_dir
tiny_nli_dir = tasks_fixtures.tiny_nli_dir
tiny_sentiment_dir = tasks_fixtures.tiny_sentiment_dir

TEXTS = ["I love this phone, the battery lasts for days.", "Terrible service.", "ok",
         "The committee will vote on the new budget proposal next week after a long debate in parliament."]


@pytest.fixture(scope="module")
def hf_sentiment(tiny_sentiment_dir):
    from transformers import pipeline as hf_pipeline

    return hf_pipeline("text-classification", model=str(tiny_sentiment_dir), device="cpu")


def test_sentiment_matches_transformers_pipeline(tiny_sentiment_dir, hf_sentiment):
    with pipeline("sentiment-analysis", model=str(tiny_sentiment_dir)) as clf:
        one = clf(TEXTS[0])
        many = clf(TEXTS)
        all_labels = clf(TEXTS, top_k=None)
    expected_one, expected_many = hf_sentiment(TEXTS[0]), hf_sentiment(TEXTS)
    assert [d["label"] for d in one] == [d["label"] for d in expected_one]
    assert one[0]["score"] == pytest.approx(expected_one[0]["score"], abs=1e-5)
    assert [d["label"] for d in many] == [d["label"] for d in expected_many]
    assert [d["score"] for d in many] == pytest.approx([d["score"] for d in expected_many], abs=1e-5)
    expected_all = hf_sentiment(TEXTS, top_k=None)
    for mine, theirs in zip(all_labels, expected_all):
        assert [d["label"] for d in mine] == [d["label"] for d in theirs]
        assert [d["score"] for d in mine] == pytest.approx([d["score"] for d in theirs], abs=1e-5)


@pytest.mark.parametrize("multi_label", [False, True])
def test_nli_zero_shot_matches_transformers_pipeline(tiny_nli_dir, multi_label):
    from transformers import pipeline as hf_pipeline

    labels = ["politics", "sports", "technology"]
    hf = hf_pipeline("zero-shot-classification", model=str(tiny_nli_dir), device="cpu")
    with pipeline("zero-shot-classification", model=str(tiny_nli_dir)) as zs:
        mine = zs(TEXTS, candidate_labels=labels, multi_label=multi_label)
        single = zs(TEXTS[3], candidate_labels=["politics"])
    theirs = hf(TEXTS, candidate_labels=labels, multi_label=multi_label)
    for m, t in zip(mine, theirs):
        assert m["sequence"] == t["sequence"]
        assert m["labels"] == t["labels"]
        assert m["scores"] == pytest.approx(t["scores"], abs=1e-5)
    one = hf(TEXTS[3], candidate_labels=["politics"])
    assert single["labels"] == ["politics"] and single["scores"] == pytest.approx(one["scores"], abs=1e-5)


def test_embeddings_match_sentence_transformers(tiny_encoder_dir):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tiny_encoder_dir), device="cpu")
    expected = st.encode(TEXTS, normalize_embeddings=True)
    with pipeline("feature-extraction", model=str(tiny_encoder_dir)) as emb:
        got = emb(TEXTS)
        one = emb(TEXTS[1])
        assert emb.similarity(TEXTS[0], TEXTS[0]) == pytest.approx(1.0, abs=1e-5)
        sims = emb.similarity(TEXTS[:2], TEXTS)
    assert got.shape == expected.shape == (4, 32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(one, expected[1], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert sims.shape == (2, 4)
    np.testing.assert_allclose(sims, expected[:2] @ expected.T, atol=1e-5)


def test_minilm_embeddings_equal_sentence_transformers_on_the_same_folder(minilm_folder):
    """The offline default against sentence-transformers reading the same extracted folder (its
    modules.json: mean pooling, max_seq_length 256, normalization), one call and one text."""
    from sentence_transformers import SentenceTransformer

    texts = TEXTS + ["a much longer sentence " * 80]  # beyond 256 tokens: both truncate the same way
    expected = SentenceTransformer(str(minilm_folder), device="cpu").encode(texts, normalize_embeddings=True)
    with pipeline("feature-extraction") as emb:
        assert emb.dimensions == 384
        np.testing.assert_allclose(emb(texts), expected, atol=2e-5)
        np.testing.assert_allclose(emb(texts[2]), expected[2], atol=2e-5)


def test_unknown_task_lists_the_tasks():
    with pytest.raises(InvalidRequestError) as info:
        pipeline("summarization")
    for task in ("sentiment-analysis", "zero-shot-classification", "feature-extraction", "text-to-image"):
        assert task in str(info.value)
    assert info.value.param == "task"


def test_wrong_head_says_what_the_task_needs(tiny_sentiment_dir, tiny_model_dir):
    with pytest.raises(InvalidModelError, match="entailment"):
        pipeline("zero-shot-classification", model=str(tiny_sentiment_dir))
    with pytest.raises(InvalidModelError, match="sentence encoder"):
        pipeline("feature-extraction", model=str(tiny_sentiment_dir))
    with pytest.raises(InvalidModelError, match="chat model.*sentence encoder"):
        pipeline("feature-extraction", model=str(tiny_model_dir))
    with pytest.raises(InvalidRequestError, match="no offline default"):
        pipeline("text-to-image")


def test_task_models_given_as_chat_models_name_the_pipeline_to_use(tiny_sentiment_dir, tiny_nli_dir, tiny_model_dir):
    from llamawrapper import UnsupportedModelError
    from llamawrapper.models import registry
    from llamawrapper.tasks import NotAChatModelError, refuse_task_model

    with pytest.raises(NotAChatModelError) as info:
        pipeline("text-generation", model="minilm")
    assert info.value.task == "feature-extraction" and isinstance(info.value, UnsupportedModelError)
    assert 'llamawrapper.pipeline("feature-extraction", model="minilm")' in str(info.value)
    for folder, task in ((tiny_sentiment_dir, "text-classification"), (tiny_nli_dir, "zero-shot-classification")):
        with pytest.raises(NotAChatModelError, match=f'pipeline\\("{task}"') as info:
            refuse_task_model(registry.resolve(str(folder)))
        assert info.value.task == task
    refuse_task_model(registry.resolve(str(tiny_model_dir)))  # a chat model passes
    refuse_task_model(registry.resolve("smollm2"))


@pytest.mark.parametrize("where", ["this process", "loader process"])
def test_llamawrapper_load_of_a_task_model_names_the_pipeline(where, tiny_sentiment_dir, tiny_llm, monkeypatch):
    """Refused by the chat loader wherever it runs (beside ``tiny_llm`` loads go to the loader
    process unless LLAMAWRAPPER_LOAD_PROCESS=0): the error arrives typed, naming the pipeline."""
    from llamawrapper import LlamaWrapper
    from llamawrapper.tasks import NotAChatModelError

    monkeypatch.setenv("LLAMAWRAPPER_LOAD_PROCESS", "0" if where == "this process" else "1")
    with pytest.raises(NotAChatModelError, match='pipeline\\("feature-extraction", model="minilm"\\)'):
        LlamaWrapper.load("minilm", progress=False)
    with pytest.raises(NotAChatModelError) as info:
        LlamaWrapper.load(str(tiny_sentiment_dir), progress=False)
    assert info.value.task in ("sentiment-analysis", "text-classification")


def test_bad_inputs_name_the_parameter(tiny_nli_dir):
    with pipeline("zero-shot-classification", model=str(tiny_nli_dir)) as zs:
        with pytest.raises(InvalidRequestError) as info:
            zs("text", candidate_labels=[])
        assert info.value.param == "candidate_labels"
        with pytest.raises(InvalidRequestError) as info:
            zs([], candidate_labels=["a"])
        assert info.value.param == "sequences"
        with pytest.raises(InvalidRequestError) as info:
            zs(["fine", 3], candidate_labels=["a"])
        assert info.value.param == "sequences"
        assert zs("x", candidate_labels="a, b")["labels"] in (["a", "b"], ["b", "a"])


def test_hub_id_offline_says_so(monkeypatch, lw_home):
    from llamawrapper import ModelNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(lw_home / "hf"))
    with pytest.raises(ModelNotFoundError, match="offline"):
        pipeline("sentiment-analysis", model="someone/not-downloaded-model")


def test_chat_model_zero_shot_scores_are_label_logprobs(tiny_model_dir):
    """Each label's score comes from its log-probability as the reply, computed here one label at a
    time without padding; the pipeline batches the labels in one padded forward."""
    import torch

    from llamawrapper.tasks.chat_choice import QUESTION

    labels = ["sports", "politics", "a much longer label about cooking"]
    with pipeline("zero-shot-classification", model=str(tiny_model_dir)) as zs:
        got = zs("The striker scored twice.", candidate_labels=labels)
        multi = zs("The striker scored twice.", candidate_labels=labels, multi_label=True)
        llm = zs.model.llm
        prompt = llm.chat_prompt_ids([{"role": "user", "content": QUESTION.format(text="The striker scored twice.",
                                                                                  labels=", ".join(labels))}])
        sums = []
        for label in labels:
            answer = llm.tokenize(label)
            with torch.inference_mode():
                logits = llm.loaded.model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            sums.append(sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(answer)))
    expected = np.exp(np.array(sums) - max(sums))
    expected /= expected.sum()
    by_label = dict(zip(got["labels"], got["scores"]))
    assert [by_label[lab] for lab in labels] == pytest.approx(list(expected), abs=1e-4)
    assert got["scores"] == sorted(got["scores"], reverse=True)
    assert dict(zip(multi["labels"], multi["scores"]))["sports"] == pytest.approx(float(np.exp(sums[0])), rel=1e-3)


def test_text_generation_is_the_chat_wrapper(tiny_model_dir):
    from llamawrapper import LlamaWrapper

    with pipeline("text-generation", model=str(tiny_model_dir), progress=False) as llm:
        assert isinstance(llm, LlamaWrapper)
        assert llm.chat("hi", max_tokens=3, temperature=0).usage.completion_tokens <= 3
