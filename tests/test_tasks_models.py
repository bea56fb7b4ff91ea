"""Classifiers from examples (fit, save, load; parity with scikit-learn), text-to-image (seeded,
equal to plain diffusers, progress per step, bad sizes, chat decoding between its steps), load_served's choices, and the minilm
zip extracted once into the cache and again when the hash changes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llamawrapper import InvalidRequestError, pipeline
from llamawrapper.tasks import load_served
import tasks_fixtures

# the shared fixtures, bound here so pytest finds them (an unused import would be a lint error)
minilm_folder = tasks_fixtures.minilm_folder
tiny_diffusers_dir = tasks_fixtures.tiny_diffusers_dir
tiny_encoder_dir = tasks_fixtures.tiny_encoder_dir
tiny_nli_dir = tasks_fixtures.tiny_nli_dir

EXAMPLES = [(f"the {w} was {a}", "good" if a in ("great", "lovely", "superb") else "bad")
            for w in ("film", "meal", "hotel", "phone", "trip") for a in ("great", "lovely", "superb", "awful", "dreadful", "broken")]


def test_classifier_from_examples_matches_sklearn_and_survives_save_load(tiny_encoder_dir, tmp_path):
    from sklearn.linear_model import LogisticRegression

    with pipeline("text-classification", model=str(tiny_encoder_dir), examples=EXAMPLES) as clf:
        probe = ["the car was great", "the car was awful", "a lovely day"]
        got = clf(probe, top_k=None)
        folder = clf.save(tmp_path / "my-classifier")
        vectors = clf.model.encoder.embed([t for t, _ in EXAMPLES])
        probe_vectors = clf.model.encoder.embed(probe)
    reference = LogisticRegression(C=10.0, max_iter=2000).fit(vectors, [lab for _, lab in EXAMPLES])
    expected = reference.predict_proba(probe_vectors)
    for row, probs in zip(got, expected):
        by_label = {d["label"]: d["score"] for d in row}
        assert [by_label[c] for c in reference.classes_] == pytest.approx(list(probs), abs=1e-6)
    saved = json.loads((folder / "classifier.json").read_text())
    assert saved["classes"] == ["bad", "good"] and saved["info"]["n_examples"] == len(EXAMPLES)
    with pipeline("text-classification", model=str(folder)) as again:
        assert again(probe, top_k=None) == got
        assert again.model.task == "classification"


def test_examples_need_two_labels_with_two_examples_each(tiny_encoder_dir):
    with pytest.raises(InvalidRequestError, match="two different labels") as info:
        pipeline("text-classification", model=str(tiny_encoder_dir), examples=[("a", "x"), ("b", "x")])
    assert info.value.param == "examples"
    with pytest.raises(InvalidRequestError, match="at least two examples per label"):
        pipeline("text-classification", model=str(tiny_encoder_dir), examples=[("a", "x"), ("b", "x"), ("c", "y")])


def test_text_to_image_is_seeded_reports_steps_and_equals_plain_diffusers(tiny_diffusers_dir):
    import torch
    from diffusers import DiffusionPipeline

    steps: list[tuple[int, int]] = []
    with pipeline("text-to-image", model=str(tiny_diffusers_dir)) as gen:
        a = gen("a blue circle", num_inference_steps=3, seed=5, progress=False)
        b = gen("a blue circle", num_inference_steps=3, seed=5, progress=False)
        c = gen("a blue circle", num_inference_steps=3, seed=6, progress=False)
        gen.model.generate("a blue circle", num_inference_steps=4, progress=lambda s, t: steps.append((s, t)))
        with pytest.raises(InvalidRequestError) as info:
            gen("x", width=30)
        assert info.value.param == "size"
        with pytest.raises(InvalidRequestError) as info:
            gen("x", num_images=0)
        assert info.value.param == "n"
    assert a[0].size == (64, 64)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    plain = DiffusionPipeline.from_pretrained(str(tiny_diffusers_dir), dtype=torch.float32)
    plain.set_progress_bar_config(disable=True)
    ref = plain("a blue circle", num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(5)).images[0]
    tasks_fixtures.assert_same_image(a[0], ref)


def test_load_served_takes_task_models_and_leaves_chat_models(tiny_encoder_dir, tiny_nli_dir, tiny_diffusers_dir, tiny_model_dir):
    assert load_served("smollm2") is None  # a GGUF chat model: not even converted here
    assert load_served(str(tiny_model_dir)) is None
    for folder, task in ((tiny_encoder_dir, "embedding"), (tiny_nli_dir, "zero-shot-classification"),
                         (tiny_diffusers_dir, "text-to-image")):
        model = load_served(str(folder))
        try:
            assert model.task == task and model.name == folder.name
        finally:
            model.close()


@pytest.mark.slow
def test_minilm_is_extracted_once_and_again_when_the_zip_changes(lw_home, caplog):
    from llamawrapper.models import registry
    from llamawrapper.models.loading import file_sha256
    from llamawrapper.tasks.extract import extract_zip

    source = registry.resolve("minilm")
    folder = extract_zip(source, progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert folder.parent == lw_home / "models" and manifest["source_sha256"] == file_sha256(source.path)
    assert (folder / "model.safetensors").is_file() and "1_Pooling/config.json" in manifest["files"]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert extract_zip(source, progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not extracted again
    manifest["source_sha256"] = "0" * 64  # as if the package had shipped another zip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert extract_zip(source, progress=False) == folder
    assert json.loads((folder / "manifest.json").read_text())["source_sha256"] == file_sha256(source.path)
    assert "does not match" in caplog.text
    served = load_served("minilm")
    try:
        assert served.task == "embedding" and served.dimensions == 384 and served.name == "minilm"
    finally:
        served.close()


def test_chat_keeps_decoding_while_an_image_is_generated(tiny_diffusers_dir, tiny_model_dir):
    """An image generation runs one denoising step per executor step, so a chat request submitted
    during it is decoded between its steps and finishes first (one job per generation would hold
    every chat engine until the image is done). Read from the engine's counters at each image step
    on the executor thread itself: events, not timings."""
    import threading

    from llamawrapper import LlamaWrapper
    from llamawrapper.types import SamplingParams

    llm = LlamaWrapper.load(str(tiny_model_dir), progress=False)
    first_step, chat_queued = threading.Event(), threading.Event()
    seen: list[tuple[int, int, int]] = []  # (image step, engine decode steps, chat requests finished)

    def on_step(step: int, total: int) -> None:
        snap = llm.engine.snapshot()
        seen.append((step, snap["decode_steps"], snap["finished"]))
        if step == 1:  # hold the executor (and the image) until the chat request is in the engine's queue
            first_step.set()
            assert chat_queued.wait(60)

    try:
        with pipeline("text-to-image", model=str(tiny_diffusers_dir)) as gen:
            before = llm.engine.snapshot()
            image = gen.model.generate_future("a red square", num_inference_steps=40, seed=1, width=64, height=64,
                                              progress=on_step)
            assert first_step.wait(120)
            handle = llm.submit(llm.tokenize("Tell me a story"), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
            chat_queued.set()
            text_events = [e for e in handle]
            assert len(image.result(timeout=300)) == 1
    finally:
        llm.close()
    assert sum(len(e.token_ids) for e in text_events) == 8
    steps_at = {step: (decodes, finished) for step, decodes, finished in seen}
    assert len(steps_at) == 40
    assert steps_at[1][1] == before["finished"]  # the chat request came after the first step...
    assert steps_at[40][1] == before["finished"] + 1  # ...and was finished before the image's last step
    finishing = min(step for step, (_, finished) in steps_at.items() if finished > before["finished"])
    assert finishing < 40 and steps_at[finishing][0] - steps_at[1][0] >= 7  # its decodes ran between image steps
