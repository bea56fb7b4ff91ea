"""The model host in-process (``ModelHost``), on tiny random-weight models: versions, hot swap
with requests in flight, failed loads, canary shares, promote, rollback, remove, keep-alive,
LRU eviction, sha256 pins and the models file."""

from __future__ import annotations

import json
import threading
import time

import pytest

from llamawrapper import InvalidRequestError, ModelNotFoundError
from llamawrapper.errors import ModelConflictError, ModelHashMismatchError, ModelUnavailableError
from llamawrapper.models.host import ModelHost
from llamawrapper.models.loaders import default_loader
from llamawrapper.models.modelsfile import lock_models_file, read_models_file
from llamawrapper.models.versions import folder_sha256


@pytest.fixture
def host():
    h = ModelHost(default_loader(), drain_timeout=30)
    yield h
    h.close()


@pytest.fixture
def broken_dir(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "not a number"}))
    return d


def _answer(host, model="chat", **kw):
    with host.acquire(model) as lease:
        handle = lease.model.submit_prompt("Hello there", _params(max_tokens=kw.get("max_tokens", 4)))
        version = lease.version
    return version, handle.result()


def _params(**kw):
    from llamawrapper import SamplingParams

    return SamplingParams(temperature=0, **kw)


def test_put_serves_and_describes_the_version(host, tiny_model_dir):
    assert host.put("chat", {"source": str(tiny_model_dir)}, wait=True) == {"name": "chat", "version": "v1", "status": "ready"}
    version, result = _answer(host)
    assert version == "v1" and result.finish_reason == "length" and result.usage.completion_tokens == 4
    info = host.describe("chat")
    v1 = info["versions"][0]
    assert info["active"] == "v1" and v1["status"] == "ready" and v1["traffic"] == 1.0
    assert v1["memory_bytes"] > 100_000 and v1["loaded_at"] and v1["source"] == str(tiny_model_dir)


def test_swap_finishes_requests_in_flight_on_the_old_version(host, tiny_model_dir):
    host.put("chat", str(tiny_model_dir), wait=True)
    with host.acquire("chat") as lease:
        old_engine = lease.model.engine
        long = lease.model.submit_prompt("Once upon a time", _params(max_tokens=200, ignore_eos=True))
    host.put("chat", {"source": str(tiny_model_dir), "dtype": "bfloat16"}, wait=True)
    assert _answer(host)[0] == "v2"
    result = long.result()  # the old version drained: its request finished whole
    assert result.finish_reason == "length" and result.usage.completion_tokens == 200
    deadline = time.monotonic() + 10
    while old_engine in old_engine.executor._workers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert old_engine not in old_engine.executor._workers  # its engine left the executor
    assert host.describe("chat")["versions"][0]["status"] == "unloaded"


def test_a_broken_version_fails_alone(host, tiny_model_dir, broken_dir):
    host.put("chat", str(tiny_model_dir), wait=True)
    host.put("chat", str(broken_dir), wait=True)
    versions = host.describe("chat")["versions"]
    assert versions[1]["status"] == "failed" and "config" in versions[1]["error"].lower()
    assert _answer(host)[0] == "v1"
    with pytest.raises(ModelNotFoundError, match=r"v1 \(ready\)"):
        host.acquire("chat@v2")


def test_unknown_source_and_bad_fields_are_refused_before_loading(host, tiny_model_dir):
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        host.put("chat", "no-such-model")
    with pytest.raises(InvalidRequestError) as exc:
        host.put("chat", str(tiny_model_dir), traffic=1.5)
    assert exc.value.param == "traffic"
    with pytest.raises(InvalidRequestError) as exc:
        host.put("chat", {"source": str(tiny_model_dir), "colour": "red"})
    assert exc.value.param == "colour"
    assert host.names() == []


def test_a_second_put_while_loading_conflicts(tiny_model_dir):
    gate = threading.Event()
    loader = default_loader()
    host = ModelHost(lambda spec: (gate.wait(30), loader(spec))[1])
    try:
        host.put("chat", str(tiny_model_dir))
        with pytest.raises(ModelConflictError, match="v1.*still loading"):
            host.put("chat", str(tiny_model_dir))
        with pytest.raises(ModelUnavailableError, match="loading"):
            host.acquire("chat")
        gate.set()
        assert host.wait("chat", timeout=60)
    finally:
        gate.set()
        host.close()


def test_canary_share_promote_and_rollback(host, tiny_model_dir):
    host.put("chat", str(tiny_model_dir), wait=True)
    host.put("chat", {"source": str(tiny_model_dir), "dtype": "bfloat16"}, traffic=0.25, wait=True)
    picks = []
    for _ in range(400):
        with host.acquire("chat") as lease:
            picks.append(lease.version)
    share = picks.count("v2") / len(picks)
    assert 0.15 <= share <= 0.35, share
    host.promote("chat")
    assert {_answer(host)[0] for _ in range(5)} == {"v2"}
    assert host.rollback("chat")["version"] == "v1"  # back to v1, loaded again if it was unloaded
    assert host.wait("chat", "v1", timeout=60)
    assert {_answer(host)[0] for _ in range(5)} == {"v1"}
    host.put("chat", str(tiny_model_dir), traffic=0.5, wait=True)
    assert host.rollback("chat")["version"] == "v1"  # drops the canary
    assert host.describe("chat")["canary"] is None
    with pytest.raises(ModelConflictError):
        host.promote("chat")


def test_pinned_versions(host, tiny_model_dir):
    host.put("chat", str(tiny_model_dir), wait=True)
    host.put("chat", str(tiny_model_dir), traffic=0.0, wait=True)  # reachable only when pinned
    assert {_answer(host)[0] for _ in range(10)} == {"v1"}
    assert _answer(host, "chat@v2")[0] == "v2"
    with pytest.raises(ModelNotFoundError, match="no version 'v7'.*v1 \\(ready\\), v2 \\(ready\\)"):
        host.acquire("chat@v7")


def test_remove_drains_then_refuses(host, tiny_model_dir):
    host.put("chat", str(tiny_model_dir), wait=True)
    with host.acquire("chat") as lease:
        handle = lease.model.submit_prompt("Hi", _params(max_tokens=64, ignore_eos=True))
    host.remove("chat")
    assert handle.result().usage.completion_tokens == 64
    with pytest.raises(ModelNotFoundError, match="'chat' does not exist"):
        host.acquire("chat")


def test_keep_alive_unloads_and_the_next_request_reloads(tiny_model_dir):
    """An idle model unloads, and its weights (and their oneDNN packed copies) are freed then, not
    held by the executor's last step; the next request loads it again."""
    import gc
    import weakref

    host = ModelHost(default_loader(), keep_alive=0.5)
    try:
        host.put("chat", str(tiny_model_dir), wait=True)
        with host.acquire("chat") as lease:
            weights = weakref.ref(lease.model.loaded.model)
            packed = weakref.ref(lease.model.engine.runner.lm_head)
        del lease
        _answer(host)
        deadline = time.monotonic() + 10
        while host.statuses()["chat"] != "unloaded" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert host.statuses()["chat"] == "unloaded" and host.ready
        while (weights() is not None or packed() is not None) and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.1)
        assert weights() is None and packed() is None
        assert host.describe("chat")["versions"][0]["memory_bytes"] >= 0
        version, result = _answer(host)  # waits for the reload
        assert version == "v1" and result.usage.completion_tokens == 4
        assert host.statuses()["chat"] == "ready"
    finally:
        host.close()


def test_max_loaded_models_evicts_the_least_recently_used(tiny_model_dir):
    host = ModelHost(default_loader(), max_loaded_models=1)
    try:
        host.put("a", str(tiny_model_dir), wait=True)
        _answer(host, "a")
        host.put("b", str(tiny_model_dir), wait=True)
        assert host.statuses() == {"a": "unloaded", "b": "ready"}
        assert _answer(host, "a")[1].usage.completion_tokens == 4  # reloaded on demand, b evicted
        assert host.statuses() == {"a": "ready", "b": "unloaded"}
    finally:
        host.close()


def test_sha256_pin(host, tiny_model_dir):
    actual = folder_sha256(tiny_model_dir)
    with pytest.raises(ModelHashMismatchError) as exc:
        host.put("chat", {"source": str(tiny_model_dir), "sha256": "0" * 64})
    assert actual in str(exc.value) and "0" * 64 in str(exc.value)
    host.put("chat", {"source": str(tiny_model_dir), "sha256": actual}, wait=True)
    assert host.describe("chat")["versions"][0]["sha256"] == actual


def test_models_file_lock_and_pin(tmp_path, tiny_model_dir):
    path = tmp_path / "models.toml"
    path.write_text(f'# our models\n[chat]\nsource = "{tiny_model_dir}"\nkeep_alive = 60\n')
    locked = lock_models_file(str(path))
    text = path.read_text()
    assert "# our models" in text and f'sha256 = "{locked["chat"]}"' in text
    [(name, spec, options)] = read_models_file(str(path))
    assert name == "chat" and spec.sha256 == folder_sha256(tiny_model_dir) and options == {"keep_alive": 60}
    path.write_text(text.replace(locked["chat"], "f" * 64))
    host = ModelHost(default_loader())
    try:
        [(name, spec, options)] = read_models_file(str(path))
        with pytest.raises(ModelHashMismatchError, match="f" * 64):
            host.put(name, spec, **options)
    finally:
        host.close()


def test_two_names_put_at_once_both_load(host, tiny_model_dir):
    host.put("a", str(tiny_model_dir))
    host.put("b", str(tiny_model_dir))
    assert host.wait(timeout=120) and host.statuses() == {"a": "ready", "b": "ready"}
    assert _answer(host, "a")[1].usage.completion_tokens == 4 and _answer(host, "b")[1].usage.completion_tokens == 4


def test_a_failed_reload_answers_unavailable(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    host = ModelHost(default_loader(), keep_alive=0.3)
    try:
        host.put("chat", str(folder), wait=True)
        deadline = time.monotonic() + 10
        while host.statuses()["chat"] != "unloaded" and time.monotonic() < deadline:
            time.sleep(0.1)
        (folder / "config.json").write_text("{broken")
        with pytest.raises(ModelUnavailableError, match="failed to load"):
            host.acquire("chat")
    finally:
        host.close()


def test_a_name_whose_only_version_failed_says_why_in_one_sentence(tiny_model_dir, lw_home, tmp_path):
    """The 503's message quotes the load error once, ending in one period (it ended in '..'
    when the error had its own)."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").write_text("{broken")
    host = ModelHost(default_loader())
    try:
        host.put("chat", str(folder), wait=True)
        assert host.statuses()["chat"].startswith("failed")
        with pytest.raises(ModelUnavailableError) as err:
            host.acquire("chat")
        message = str(err.value)
        assert message.startswith("The model 'chat' failed to load: ") and message.endswith(".")
        assert not message.endswith("..") and len(message) > len("The model 'chat' failed to load: .")
    finally:
        host.close()


def test_versions_show_what_they_run_as_with_the_servers_defaults(tiny_model_dir, lw_home):
    """``serve --quantization w8a8`` (the loader's default) applies to a version whose spec names
    none, and the admin view says so: its quantization and the dtype its activations run in."""
    h = ModelHost(default_loader(quantization="w8a8"), drain_timeout=30)
    try:
        h.put("chat", {"source": str(tiny_model_dir)}, wait=True)
        h.put("plain", {"source": str(tiny_model_dir), "quantization": "int8"}, wait=True)
        (chat,), (plain,) = h.describe("chat")["versions"], h.describe("plain")["versions"]
        assert (chat["quantization"], chat["dtype"]) == ("w8a8", "float32")
        assert (plain["quantization"], plain["dtype"]) == ("int8", "bfloat16")  # int8 runs bfloat16 activations
    finally:
        h.close()
