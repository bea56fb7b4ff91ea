"""Model sources and the conversion cache: aliases, paths, hub ids, bad files, manifests,
hash-checked reuse and atomic writes."""

import json
import os
import shutil

import pytest

from llamawrapper import (
    InvalidModelError,
    LlamaWrapper,
    ModelNotFoundError,
    UnsupportedModelError,
)
from llamawrapper.models import loading, registry


def test_unknown_alias_names_it():
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        registry.resolve("no-such-model")


def test_missing_path():
    with pytest.raises(ModelNotFoundError, match="missing.gguf"):
        registry.resolve("/nowhere/missing.gguf")


def test_hub_id_parses_revision():
    src = registry.resolve("HuggingFaceTB/SmolLM2-135M-Instruct@main")
    assert (src.kind, src.repo_id, src.revision) == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct", "main")


def test_hub_offline_and_uncached_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelNotFoundError, match="(?i)offline|cannot be reached"):
        LlamaWrapper.load("some-org/some-model@v1", progress=False)


def test_file_that_is_not_a_model(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("this is not a model")
    with pytest.raises(InvalidModelError, match="not a GGUF"):
        LlamaWrapper.load(str(bad), progress=False)


def test_truncated_gguf(tmp_path, lw_home):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 10)
    with pytest.raises(InvalidModelError):
        LlamaWrapper.load(str(bad), progress=False)


def test_folder_without_config(tmp_path):
    with pytest.raises(InvalidModelError, match="config.json"):
        LlamaWrapper.load(str(tmp_path), progress=False)


def test_unsupported_architecture_folder(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        LlamaWrapper.load(str(tmp_path), progress=False)


def test_bad_dtype_is_named(tiny_model_dir):
    from llamawrapper import InvalidRequestError

    with pytest.raises(InvalidRequestError) as info:
        LlamaWrapper.load(str(tiny_model_dir), dtype="float8", progress=False)
    assert info.value.param == "dtype"


def test_bfloat16_load(tiny_model_dir):
    with LlamaWrapper.load(str(tiny_model_dir), dtype="bfloat16", progress=False) as llm:
        assert llm.info()["dtype"] == "bfloat16"
        assert llm.chat("hi", max_tokens=3, temperature=0).usage.completion_tokens >= 1


@pytest.mark.slow
def test_conversion_cache_is_reused_and_detects_changed_source(lw_home, tmp_path, tiny_gguf):
    gguf = tmp_path / "copy.gguf"
    shutil.copy(tiny_gguf, gguf)
    src = registry.resolve(str(gguf))
    folder = loading.convert_gguf(src, progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source_sha256"] == loading.file_sha256(gguf)
    assert {"torch", "transformers", "llamawrapper"} <= set(manifest["versions"]) and manifest["dtype"] == "float32"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert loading.convert_gguf(src, progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted again
    llm = LlamaWrapper.load(str(gguf), progress=False)
    try:
        assert llm.info()["source_sha256"] == manifest["source_sha256"] and llm.tokenize("<|im_end|>") == [2]
    finally:
        llm.close()
    # change a weight's bytes (same size): the hash differs, so it is converted again
    with open(gguf, "r+b") as f:
        f.seek(os.path.getsize(gguf) - 16)
        f.write(b"\x00" * 16)
    folder2 = loading.convert_gguf(src, progress=False)
    assert (folder2 / "model.safetensors").stat().st_mtime_ns != stamp  # written anew
    assert json.loads((folder2 / "manifest.json").read_text())["source_sha256"] != manifest["source_sha256"]
    assert registry.cached_models()[0]["source_sha256"] == loading.file_sha256(gguf)


def test_failed_conversion_leaves_no_cache_entry(lw_home, tmp_path, monkeypatch, tiny_gguf):
    gguf = tmp_path / "copy.gguf"
    shutil.copy(tiny_gguf, gguf)

    def crash(path, out, bar):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "_write_conversion", crash)
    with pytest.raises(KeyboardInterrupt):
        loading.convert_gguf(registry.resolve(str(gguf)), progress=False)
    models = lw_home / "models"
    assert [p.name for p in models.iterdir() if p.is_dir()] == []
    assert registry.cached_models() == []


def test_a_conversion_parses_the_gguf_metadata_once(lw_home, tmp_path, tiny_gguf, monkeypatch):
    """transformers opens the file for the config, the tokenizer and the weights, and the
    architecture check once more; each reader would parse every token and merge in Python."""
    import gguf

    real, opened = gguf.GGUFReader, []

    def counting(path, mode="r"):
        opened.append(str(path))
        return real(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    copy = tmp_path / "once.gguf"
    shutil.copy(tiny_gguf, copy)
    folder = loading.convert_gguf(registry.resolve(str(copy)), progress=False)
    assert opened == [str(copy)] and (folder / "model.safetensors").is_file()
    assert gguf.GGUFReader is counting  # put back after the conversion


def test_conversions_in_two_threads_leave_the_gguf_module_as_it_was(lw_home, tmp_path, tiny_gguf):
    import threading

    import gguf

    real = gguf.GGUFReader
    copies = [tmp_path / f"t{i}.gguf" for i in range(2)]
    for i, copy in enumerate(copies):
        shutil.copy(tiny_gguf, copy)
        with open(copy, "r+b") as f:  # different bytes, so two cache entries
            f.seek(os.path.getsize(copy) - 4)
            f.write(bytes([i + 1]) * 4)
    folders, errors = [], []

    def convert(path):
        try:
            folders.append(loading.convert_gguf(registry.resolve(str(path)), progress=False))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=convert, args=(c,)) for c in copies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(set(folders)) == 2 and all((f / "model.safetensors").is_file() for f in folders)
    assert gguf.GGUFReader is real
