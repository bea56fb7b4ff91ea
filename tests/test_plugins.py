"""Plugins: in-process and entry-point registration, per-model switching in the config file, the
order hooks run in, built-ins (system prompt, PII redaction in prompts, answers and split
streams, input guard), and failing hooks that fail only their own request, naming the hook."""

from __future__ import annotations

import random
import sys
import textwrap
import time

import pytest

from llamawrapper import LlamaWrapper, SamplingParams
from llamawrapper.errors import InvalidRequestError, PluginError, PluginRejectedError
from llamawrapper.plugins import hookimpl, manager, register, unregister
from llamawrapper.plugins.redaction import RedactingStream, redact


class Recorder:
    """Sees the messages after the plugins before it in the list."""

    def __init__(self) -> None:
        self.seen: list[list[dict]] = []

    @hookimpl
    def before_request(self, messages, params):
        self.seen.append([dict(m) for m in messages])
        params.max_tokens = min(params.max_tokens or 4, 4)  # hooks may change sampling too


class Shout:
    @hookimpl
    def after_response(self, text):
        return text.upper()

    @hookimpl
    def stream_filter(self):
        class Upper:
            def feed(self, text):
                return text.upper()

            def flush(self):
                return ""
        return Upper()


class Broken:
    @hookimpl
    def before_request(self, messages):
        if any("boom" in m["content"] for m in messages):
            raise RuntimeError("kaboom")


@pytest.fixture
def plugins_registered():
    rec = Recorder()
    register(rec, "recorder")
    register(Shout(), "shout")
    register(Broken(), "broken")
    yield rec
    for name in ("recorder", "shout", "broken"):
        unregister(name)


@pytest.fixture(scope="module")
def plain_llm(tiny_model_dir):
    llm = LlamaWrapper.load(str(tiny_model_dir), progress=False)
    yield llm
    llm.close()


def _load(tiny_model_dir, plugins):
    return LlamaWrapper.load(str(tiny_model_dir), progress=False, plugins=plugins)


# -- redaction ---------------------------------------------------------------------------------------
SAMPLES = [
    "Write to jane.doe@example.co.uk or call +44 20 7946 0958 before noon.",
    "My card is 4111 1111 1111 1111, expiry 12/29, and my phone (555) 123-4567.",
    "Order 12345 shipped; reference 2024-05-01. Contact: ops-team@corp.example.",
    "Numbers like 4242424242424242 and 06 12 34 56 78 are private; 3.14159 is not.",
]


def test_redaction_of_emails_phones_cards_keeps_other_numbers():
    out = redact(SAMPLES[1])
    assert "[CARD]" in out and "[PHONE]" in out and "4111" not in out and "12/29" in out
    out = redact(SAMPLES[2])
    assert "[EMAIL]" in out and "12345" in out and "2024-05-01" in out
    assert redact("pi is 3.14159") == "pi is 3.14159"
    assert redact("not a card 4111 1111 1111 1112") == "not a card 4111 1111 1111 1112"  # fails the Luhn check


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_redaction_equals_whole_text_redaction_for_any_split(text):
    rng = random.Random(text)
    whole = redact(text)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(20, len(text) - 1))))
        parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        f = RedactingStream()
        assert "".join(f.feed(p) for p in parts) + f.flush() == whole


def test_stream_redaction_emits_text_before_the_open_tail():
    f = RedactingStream()
    assert f.feed("Hello there, my number is 555") == "Hello there, my number is "
    assert f.feed(" 123 4567, thanks") == "[PHONE], "  # "thanks" may still become an e-mail address
    assert f.flush() == "thanks"


# -- hooks through the API (tiny random model) -------------------------------------------------------------
def test_hooks_run_in_order_and_may_change_messages_and_params(tiny_model_dir, plugins_registered):
    llm = _load(tiny_model_dir, [{"name": "system_prompt", "text": "Be brief."}, {"name": "pii_redaction", "where": "prompt"}, "recorder"])
    try:
        res = llm.chat("mail me at bob@example.com", max_tokens=20, temperature=0)
    finally:
        llm.close()
    (seen,) = plugins_registered.seen
    assert seen == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "mail me at [EMAIL]"}]
    assert res.usage.completion_tokens <= 4  # the recorder lowered max_tokens


def test_after_response_and_stream_filter(tiny_model_dir, plain_llm, plugins_registered):
    plain = plain_llm.chat("hi", max_tokens=8, temperature=0).text
    llm = _load(tiny_model_dir, ["shout"])
    try:
        assert llm.chat("hi", max_tokens=8, temperature=0).text == plain.upper()
        assert "".join(e.text for e in llm.stream("hi", max_tokens=8, temperature=0)) == plain.upper()
    finally:
        llm.close()


def test_failing_hook_fails_only_its_request_and_names_the_hook(tiny_model_dir, plugins_registered):
    llm = _load(tiny_model_dir, ["broken"])
    try:
        with pytest.raises(PluginError) as info:
            llm.chat("boom", max_tokens=4, temperature=0)
        assert info.value.hook == "before_request" and info.value.plugin == "broken"
        assert "broken" in str(info.value) and "kaboom" in str(info.value)
        assert llm.chat("fine", max_tokens=4, temperature=0).finish_reason in ("stop", "length")  # others continue
    finally:
        llm.close()


def test_input_guard_refuses_with_an_invalid_request_error(tiny_model_dir):
    llm = _load(tiny_model_dir, [{"name": "input_guard", "max_chars": 20}])
    try:
        with pytest.raises(PluginRejectedError) as info:
            llm.chat("x" * 21, max_tokens=4)
        assert isinstance(info.value, InvalidRequestError) and info.value.plugin == "input_guard"
        assert llm.chat("short", max_tokens=2).usage.completion_tokens <= 2
    finally:
        llm.close()


def test_unknown_plugin_is_refused(tiny_model_dir):
    with pytest.raises(InvalidRequestError, match="Unknown plugin 'nope'"):
        _load(tiny_model_dir, ["nope"])


def test_plugins_switched_on_per_model_in_config_file(tiny_model_dir, lw_home, plugins_registered):
    lw_home.mkdir(parents=True, exist_ok=True)
    (lw_home / "config.toml").write_text(textwrap.dedent(f"""
        [models."{tiny_model_dir}"]
        plugins = ["system_prompt", "recorder"]
        [models."{tiny_model_dir}".plugin_options.system_prompt]
        text = "From the config file."
    """))
    llm = LlamaWrapper.load(str(tiny_model_dir), progress=False)
    try:
        assert llm.custom.plugins.names == ["system_prompt", "recorder"]
        llm.chat("hi", max_tokens=2)
    finally:
        llm.close()
    assert plugins_registered.seen[-1][0] == {"role": "system", "content": "From the config file."}


def test_entry_point_discovery_registers_models_and_templates(tiny_model_dir, tmp_path, monkeypatch):
    """A real installed distribution (a .dist-info with entry_points.txt on sys.path)."""
    (tmp_path / "lw_demo_plugin.py").write_text(textwrap.dedent(f"""
        from llamawrapper.plugins import hookimpl

        @hookimpl
        def register_models(register):
            register("tiny-demo", {str(tiny_model_dir)!r})

        @hookimpl
        def register_chat_templates(register):
            register("bare", "{{% for m in messages %}}[{{{{ m['role'] }}}}] {{{{ m['content'] }}}}\\n{{% endfor %}}")
    """))
    dist = tmp_path / "lw_demo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lw-demo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[llamawrapper]\ndemo = lw_demo_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(manager, "_manager", None)  # rediscover with the new distribution installed
    try:
        assert "demo" in dict(manager.get_manager().list_name_plugin())
        llm = LlamaWrapper.load("tiny-demo", progress=False, chat_template="bare")
        try:
            assert llm.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"
        finally:
            llm.close()
    finally:
        monkeypatch.setattr(manager, "_manager", None)
        sys.modules.pop("lw_demo_plugin", None)


def test_hook_changes_to_params_stay_with_their_request(tiny_model_dir, plugins_registered):
    llm = _load(tiny_model_dir, ["recorder"])
    try:
        params = SamplingParams(max_tokens=12, temperature=0)
        res = llm.submit_chat("hi", params).result()
        assert res.usage.completion_tokens <= 4 and params.max_tokens == 12  # the caller's params are untouched
    finally:
        llm.close()


def test_failing_stream_filter_cancels_the_generation(tiny_model_dir):
    class Exploding:
        @hookimpl
        def stream_filter(self):
            class F:
                def feed(self, text):
                    raise ValueError("filter broke")

                def flush(self):
                    return ""
            return F()

    register(Exploding(), "exploding")
    llm = _load(tiny_model_dir, ["exploding"])
    try:
        handle = llm.submit_chat("hi", SamplingParams(max_tokens=200, temperature=0))
        with pytest.raises(PluginError, match="exploding") as info:
            handle.result()
        assert info.value.hook == "stream_filter"
        deadline = time.monotonic() + 10
        while not handle.done and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handle.cancelled and handle.done  # the engine let go of it instead of generating 200 tokens
    finally:
        llm.close()
        unregister("exploding")
