"""Config overrides and LoRA adapters on the tiny random model."""

from __future__ import annotations

import pytest
import torch

from llamawrapper import LlamaWrapper
from llamawrapper.models.adapters import namespace_for, split_model_name
from llamawrapper.errors import InvalidRequestError, ModelNotFoundError


# -- overrides ------------------------------------------------------------------------------------
def test_keep_first_layers(tiny_model_dir):
    llm = LlamaWrapper.load(str(tiny_model_dir), overrides={"num_hidden_layers": 2}, progress=False)
    try:
        info = llm.info()
        assert info["config"]["num_hidden_layers"] == 2 and llm.engine.runner.n_layers == 2
        assert info["overrides"] == {"num_hidden_layers": 2}
        assert llm.generate("Hi", max_tokens=3, temperature=0).usage.completion_tokens == 3
    finally:
        llm.close()


@pytest.mark.parametrize("overrides, key", [
    ({"num_hiden_layers": 2}, "num_hiden_layers"),
    ({"num_hidden_layers": 99}, "num_hidden_layers"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"attn_implementation": "flash"}, "attn_implementation"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0.5}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "max_position_embeddings": 128}, "max_position_embeddings"),
])
def test_bad_overrides_name_the_key(tiny_model_dir, overrides, key):
    with pytest.raises(InvalidRequestError) as info:
        LlamaWrapper.load(str(tiny_model_dir), overrides=overrides, progress=False)
    assert info.value.param == key and key in str(info.value)


def test_longer_context_with_rope_scaling(tiny_model_dir):
    llm = LlamaWrapper.load(str(tiny_model_dir), progress=False,
                            overrides={"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "max_position_embeddings": 1024})
    try:
        assert llm.context_length == 1024
        cfg = llm.info()["config"]
        assert cfg["rope_parameters"]["rope_type"] == "linear" and cfg["rope_parameters"]["factor"] == 2.0
        assert llm.generate("x " * 600, max_tokens=2, temperature=0).usage.completion_tokens == 2
    finally:
        llm.close()


# -- adapters --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_llm(tiny_model_dir, adapter_dirs):
    llm = LlamaWrapper.load(str(tiny_model_dir), adapters={k: str(v) for k, v in adapter_dirs.items()}, progress=False)
    yield llm
    llm.close()


def _peft_greedy(tiny_model_dir, adapter_dir, ids, n):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter_dir)).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist(), model


def test_adapter_matches_peft_and_differs_from_base(tiny_model_dir, adapter_dirs, lora_llm):
    prompt = "The lighthouse keeper wrote in her ledger"
    ids = lora_llm.tokenize(prompt, add_special_tokens=True)
    base = lora_llm.generate(ids, max_tokens=8, temperature=0).token_ids
    for name, folder in adapter_dirs.items():
        ours = lora_llm.generate(ids, max_tokens=8, temperature=0, adapter=name).token_ids
        expected, model = _peft_greedy(tiny_model_dir, folder, ids, len(ours))
        assert ours == expected, name
        assert ours != base, name
        # logits of the prompt's last position agree with peft's own forward
        runner = lora_llm.engine.runner
        from llamawrapper.engine.kv_cache import SequenceKV

        kv = SequenceKV(runner.n_layers, runner.n_kv_heads, runner.head_dim, runner.dtype, capacity=len(ids))
        n = len(ids)
        mask = torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n)

        def forward(name=name, kv=kv, mask=mask):  # on the executor thread, between two engine steps
            runner.bind_rows([namespace_for(name)])
            return runner.forward(torch.tensor([ids]), torch.arange(n)[None], kv.chunk(0, n), mask)[0]

        ours_logits = lora_llm.engine.executor.call(forward).result()
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1]
        assert torch.allclose(ours_logits, ref, atol=1e-4, rtol=1e-4)


def test_mixed_adapters_share_one_batch(lora_llm):
    prompts = ["Tell me about rivers", "Bread needs flour", "Count in tens", "A small garden"]
    adapters = [None, "sql", "poet", "sql"]
    solo = [lora_llm.generate(p, max_tokens=6, temperature=0, adapter=a).token_ids for p, a in zip(prompts, adapters)]
    steps_before = lora_llm.engine.stats.decode_steps
    from llamawrapper.api import sampling_params

    params = sampling_params(max_tokens=6, temperature=0)
    handles = [lora_llm.submit_prompt(p, params, adapter=a) for p, a in zip(prompts, adapters)]
    together = [h.result().token_ids for h in handles]
    assert together == solo
    # four requests of 6 tokens in far fewer than 4 * 5 decode steps: they shared batches
    assert lora_llm.engine.stats.decode_steps - steps_before < 4 * 5


def test_adapter_kwarg_everywhere(lora_llm):
    assert lora_llm.chat("Hi", max_tokens=3, temperature=0, adapter="sql").usage.completion_tokens == 3
    events = list(lora_llm.stream("Hi", max_tokens=3, temperature=0, adapter="poet"))
    assert events[-1].finish_reason is not None
    results = lora_llm.batch(["Hi", "Hello"], max_tokens=3, temperature=0, adapter="sql")
    assert len(results) == 2
    with pytest.raises(ModelNotFoundError, match="nope"):
        lora_llm.chat("Hi", max_tokens=3, adapter="nope")
    assert lora_llm.info()["adapters"] == ["poet", "sql"]


def test_prefix_cache_is_per_adapter(lora_llm):
    prompt = "Shared prefix " * 20
    base = lora_llm.generate(prompt, max_tokens=1, temperature=0)
    with_adapter = lora_llm.generate(prompt, max_tokens=1, temperature=0, adapter="sql")
    assert with_adapter.usage.cached_tokens == 0 or with_adapter.usage.cached_tokens < base.usage.prompt_tokens - 1
    again = lora_llm.generate(prompt, max_tokens=1, temperature=0, adapter="sql")
    assert again.usage.cached_tokens > 0 and again.token_ids == with_adapter.token_ids


def test_bad_adapter_folder(tiny_model_dir, tmp_path):
    with pytest.raises(InvalidRequestError):
        LlamaWrapper.load(str(tiny_model_dir), adapters={"x": str(tmp_path / "missing")}, progress=False)


def test_split_model_name():
    assert split_model_name("smollm2:sql") == ("smollm2", "sql")
    assert split_model_name("smollm2") == ("smollm2", None)
    assert split_model_name("HuggingFaceTB/SmolLM2@main:poet") == ("HuggingFaceTB/SmolLM2@main", "poet")
    assert split_model_name("C:model") == ("C:model", None)


@pytest.mark.slow
def test_server_picks_adapter_from_model_name(tiny_model_dir, adapter_dirs, lora_llm, tmp_path):
    """``model: "tiny:sql"`` over HTTP answers with the sql adapter; an unknown adapter is a 404."""
    import json as _json

    import openai

    from server_helpers import ServerProcess

    table = "\n".join(f'{name} = {_json.dumps(str(path))}' for name, path in adapter_dirs.items())
    config = tmp_path / "config.toml"
    config.write_text(f'[models.{_json.dumps(str(tiny_model_dir))}.adapters]\n{table}\n')
    server = ServerProcess([f"tiny={tiny_model_dir}"], log_path=tmp_path / "server.log",
                           env={"LLAMAWRAPPER_CONFIG": str(config)})
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        msgs = [{"role": "user", "content": "hello"}]
        for adapter in ("sql", "poet"):
            got = client.chat.completions.create(model=f"tiny:{adapter}", messages=msgs, max_tokens=8, temperature=0)
            want = lora_llm.chat(msgs, max_tokens=8, temperature=0, adapter=adapter)
            assert got.choices[0].message.content == want.text
        base = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
        assert base.choices[0].message.content == lora_llm.chat(msgs, max_tokens=8, temperature=0).text
        with pytest.raises(openai.NotFoundError, match="nope"):
            client.chat.completions.create(model="tiny:nope", messages=msgs, max_tokens=4)
    finally:
        server.terminate()
