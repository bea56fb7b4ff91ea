"""The loader process: a load beside loaded models runs in a low-priority child and its weights
arrive as views of one shared-memory mapping; the answers are those of a load in this process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from llamawrapper import LlamaWrapper
from llamawrapper.errors import InvalidModelError, ModelUnavailableError
from llamawrapper.models import load_process, loading, registry

PROMPT = [{"role": "user", "content": "Name three colours."}]


def _mapped_from_memfd(model: torch.nn.Module) -> bool:
    """Whether every weight of ``model`` lies inside a ``memfd:llamawrapper-weights`` mapping."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "memfd:llamawrapper-weights" in line:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                spans.append((lo, hi))
    ptrs = [t.data_ptr() for t in model.state_dict().values() if t.numel()]
    return bool(spans) and all(any(lo <= p < hi for lo, hi in spans) for p in ptrs)


def test_pack_unpack_keeps_weights_ties_and_answers(tiny_model_dir):
    loaded = loading.load(registry.resolve(str(tiny_model_dir)), progress=False)
    data, offsets, size, fd = load_process.pack(loaded)
    back = load_process.unpack(data, offsets, size, fd)
    assert _mapped_from_memfd(back.model)
    assert back.model.lm_head.weight is back.model.model.embed_tokens.weight  # the tie survives
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.inference_mode():
        assert torch.equal(back.model(ids).logits, loaded.model(ids).logits)
    assert back.tokenizer("blue sky")["input_ids"] == loaded.tokenizer("blue sky")["input_ids"]
    assert back.folder == loaded.folder and back.manifest == loaded.manifest


def test_tokenizer_sent_by_reference_is_a_copy_with_the_same_backend(tiny_model_dir):
    loaded = loading.load(registry.resolve(str(tiny_model_dir)), progress=False)
    key = load_process.tokenizer_key(loaded.folder, loaded.tokenizer)
    data, offsets, size, fd = load_process.pack(loaded, {id(loaded.tokenizer): key})
    back = load_process.unpack(data, offsets, size, fd, {key: loaded.tokenizer})
    assert back.tokenizer is not loaded.tokenizer and back.tokenizer._tokenizer is loaded.tokenizer._tokenizer
    back.tokenizer.chat_template = "{{ 'changed' }}"
    assert loaded.tokenizer.chat_template != back.tokenizer.chat_template  # one model's change stays its own


def test_load_beside_a_loaded_model_runs_in_the_child_and_answers_the_same(tiny_llm, tiny_model_dir, monkeypatch):
    expected = tiny_llm.chat(PROMPT, max_tokens=12, temperature=0).text
    other = LlamaWrapper.load(str(tiny_model_dir), progress=False)
    try:
        assert load_process.get_load_process().pid is not None
        assert _mapped_from_memfd(other.loaded.model)
        assert other.chat(PROMPT, max_tokens=12, temperature=0).text == expected
        child = load_process.get_load_process().pid
        out = subprocess.run(["ps", "-o", "ni=", "-p", str(child)], capture_output=True, text=True).stdout.strip()
        assert int(out) == load_process.nice_level()
    finally:
        other.close()
    monkeypatch.setenv("LLAMAWRAPPER_LOAD_PROCESS", "0")
    inproc = LlamaWrapper.load(str(tiny_model_dir), progress=False)
    try:
        assert not _mapped_from_memfd(inproc.loaded.model)
        assert inproc.chat(PROMPT, max_tokens=12, temperature=0).text == expected
    finally:
        inproc.close()


def test_child_uses_the_environment_of_each_load(tiny_llm, tiny_model_dir, lw_home):
    quantized = LlamaWrapper.load(str(tiny_model_dir), progress=False, quantization="int8")
    try:
        assert _mapped_from_memfd(quantized.loaded.model)
        assert list((lw_home / "models" / "quantized").glob("*/quant-int8/model.safetensors"))
        assert quantized.chat(PROMPT, max_tokens=4, temperature=0).finish_reason in ("length", "stop")
    finally:
        quantized.close()


def test_a_broken_model_fails_with_a_typed_error_from_the_child(tiny_llm, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(InvalidModelError, match="broken"):
        LlamaWrapper.load(str(broken), progress=False)
    assert load_process.get_load_process().pid is not None  # the child lives on for the next load


@pytest.mark.slow
def test_a_child_killed_mid_load_is_a_typed_error_and_the_next_load_works(tiny_llm, tiny_model_dir, lw_home):
    proc, pid, t, errors = _converting_smollm2_in_the_child()
    os.kill(pid, 9)
    t.join(60)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ModelUnavailableError), errors
    assert "loader process died" in str(errors[0])
    again = LlamaWrapper.load(str(tiny_model_dir), progress=False)
    try:
        assert load_process.get_load_process().pid not in (None, pid)
        assert again.chat(PROMPT, max_tokens=4, temperature=0).text
    finally:
        again.close()


def _converting_smollm2_in_the_child() -> tuple:
    """Ask the loader process for smollm2 from a thread (with an empty home the child first
    converts the GGUF); return once the child has the file open: (process, pid, thread, errors)."""
    gguf = registry.resolve("smollm2").path
    proc = load_process.get_load_process()
    proc.start()
    pid = proc.pid
    errors: list[BaseException] = []

    def load() -> None:
        try:
            LlamaWrapper.load("smollm2", progress=False)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=load)
    t.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _has_open(pid, gguf):
        time.sleep(0.05)
    assert _has_open(pid, gguf), "the child never started converting"
    return proc, pid, t, errors


def _has_open(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


@pytest.mark.slow
def test_an_unguarded_script_loading_two_models_runs_once(tiny_model_dir, tmp_path):
    """The child is started with ``python -c``, so a user's script without a ``__main__``
    guard is not run again inside it."""
    script = tmp_path / "two_models.py"
    script.write_text(textwrap.dedent(f"""
        from llamawrapper import LlamaWrapper
        print("script body ran", flush=True)
        a = LlamaWrapper.load({str(tiny_model_dir)!r}, progress=False)
        b = LlamaWrapper.load({str(tiny_model_dir)!r}, progress=False)
        msgs = [{{"role": "user", "content": "hi"}}]
        print("same:", a.chat(msgs, max_tokens=6, temperature=0).text == b.chat(msgs, max_tokens=6, temperature=0).text)
    """))
    env = {k: v for k, v in os.environ.items() if k != "LLAMAWRAPPER_LOAD_PROCESS"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("script body ran") == 1
    assert "same: True" in out.stdout


def test_a_reused_tokenizer_is_the_one_loaded_not_a_later_change(tiny_llm, tiny_model_dir):
    """A model's own tokenizer may be changed after loading (a plugin's chat template): a later
    load of the same files gets the tokenizer as loaded."""
    first = LlamaWrapper.load(str(tiny_model_dir), progress=False)
    original = first.tokenizer.chat_template
    first.tokenizer.chat_template = "{{ 'changed after loading' }}"
    second = LlamaWrapper.load(str(tiny_model_dir), progress=False)
    try:
        assert _mapped_from_memfd(second.loaded.model)
        assert second.tokenizer.chat_template == original
        assert second.tokenizer("blue sky")["input_ids"] == first.tokenizer("blue sky")["input_ids"]
    finally:
        first.close()
        second.close()


@pytest.mark.slow
def test_shutdown_mid_conversion_is_quick_and_the_load_fails_typed(tiny_llm, lw_home):
    """At exit (or a server's stop) the loader process is ended, not waited for: a conversion in
    the child is cut short (SIGTERM, handled as SystemExit), nothing is left in the cache, and the
    load that asked for it fails with a typed error (not the child's SystemExit, which it once
    re-raised in the caller). The cache check is weak: a conversion creates its temporary folder
    only when it writes, at the end, so a cut this early leaves none either way."""
    proc, pid, t, errors = _converting_smollm2_in_the_child()
    time.sleep(1)  # into the conversion
    started = time.monotonic()
    proc.shutdown()
    assert time.monotonic() - started < 6  # the conversion alone takes ~25 s
    t.join(30)
    assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], ModelUnavailableError), errors
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    models = lw_home / "models"
    assert not models.exists() or [p.name for p in models.iterdir() if p.is_dir()] == []
