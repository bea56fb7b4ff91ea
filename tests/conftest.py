"""Shared fixtures: the real default model (session-wide) and a tiny random-weight Llama that
uses the real tokenizer, for fast unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The decode-attention kernel is built once for the session (make test builds it first), in the
# home the suite starts with: tests that give a server an empty home must not compile it again.
if not os.environ.get("TORCH_EXTENSIONS_DIR"):
    from llamawrapper.config import home_dir

    os.environ["TORCH_EXTENSIONS_DIR"] = str(home_dir() / "cache" / "extensions")


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The converted smollm2 folder in the user's cache (converted once if needed)."""
    from llamawrapper.models import loading, registry

    return loading.convert_gguf(registry.resolve("smollm2"), progress=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_folder) -> Path:
    """A 4-layer, hidden-64 Llama with random weights and smollm2's tokenizer and template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smollm2_folder)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, smollm2_folder) -> Path:
    """A 2-layer Llama GGUF (float32, random) with a 1,024-token cut of smollm2's vocabulary and its
    chat template: converts in seconds where smollm2's GGUF takes half a minute."""
    from gguf_helpers import write_tiny_gguf

    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    return write_tiny_gguf(out, smollm2_folder / "tokenizer.json", (smollm2_folder / "chat_template.jinja").read_text())


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir):
    from llamawrapper import LlamaWrapper

    llm = LlamaWrapper.load(str(tiny_model_dir), progress=False)
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def smollm2():
    """The real default model, loaded once for the whole session."""
    from llamawrapper import LlamaWrapper

    llm = LlamaWrapper.load("smollm2", progress=False)
    yield llm
    llm.close()


@pytest.fixture
def lw_home(tmp_path, monkeypatch) -> Path:
    """An empty LLAMAWRAPPER_HOME for tests that write to the cache."""
    monkeypatch.setenv("LLAMAWRAPPER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    """Two LoRA adapters made with peft on the tiny model (random, non-zero B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for i, (name, targets) in enumerate([("sql", ["q_proj", "v_proj"]), ("poet", ["q_proj", "o_proj", "down_proj", "up_proj"])]):
        torch.manual_seed(10 + i)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, lora_dropout=0.0)
        peft_model = get_peft_model(base, cfg)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.5)
        folder = tmp_path_factory.mktemp(f"lora-{name}")
        peft_model.save_pretrained(folder)
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A real redis-server on loopback for one test module (skipped where none is installed)."""
    from security_helpers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    if server.binary is None:
        pytest.skip("redis-server is not installed")
    yield server.start()
    server.stop()


@pytest.fixture(scope="module")
def restartable_redis(tmp_path_factory):
    """A real redis-server whose data survives ``stop()`` and ``start()`` on the same port (an
    append-only file): for tests that stop Redis mid-load and expect keys back afterwards."""
    from security_helpers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis-aof"), persist=True)
    if server.binary is None:
        pytest.skip("redis-server is not installed")
    yield server.start()
    server.stop()


# Tests written before the reliability suite that are part of it (`pytest -m reliability`
# runs them too); the suite's own tests carry the marker in their modules.
RELIABILITY_ALSO = (
    "test_server_lifecycle.py::test_burst_beyond_queue_gets_429_never_5xx",
    "test_server_lifecycle.py::test_sigterm_drains_in_flight_then_exits_0",
    "test_response_cache.py::test_sqlite_survives_a_killed_writer",
    "test_security_server.py::test_redis_down_fails_closed_and_recovers",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("/")[-1] in RELIABILITY_ALSO:
            item.add_marker(pytest.mark.reliability)
