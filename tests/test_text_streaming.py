"""Streaming detokenizer and stop-string matcher: pure text logic, real tokenizer."""

import pytest
from transformers import AutoTokenizer

from llamawrapper.engine.detokenizer import StreamingDetokenizer
from llamawrapper.engine.stopping import StopStringMatcher

SAMPLES = [
    "Grüße aus Köln, café crème et naïveté.",
    "你好，世界！日本語のテキストも。",
    "Emoji: 😀🎉👩‍👩‍👧 and flags 🇫🇷🇯🇵 done.",
    "Mixed: Ünïcödé ✓ → ∑ ≠ ∞ — «quotes»",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    return AutoTokenizer.from_pretrained(smollm2_folder)


@pytest.mark.parametrize("text", SAMPLES)
def test_every_delta_is_whole_utf8_and_concat_is_exact(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text) // 4  # multi-byte characters really are split across tokens
    detok = StreamingDetokenizer(tokenizer)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    for d in deltas:
        assert "\ufffd" not in d
        d.encode("utf-8")  # never a lone surrogate
    assert "".join(deltas) == text


def test_incomplete_character_is_held_back(tokenizer):
    ids = tokenizer("😀", add_special_tokens=False).input_ids
    assert len(ids) > 1, "the emoji must span several byte tokens for this test to mean anything"
    detok = StreamingDetokenizer(tokenizer)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "😀"


def feed_all(stops, pieces):
    m = StopStringMatcher(stops)
    out, hit = [], False
    for p in pieces:
        text, hit = m.feed(p)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(m.flush())
    return "".join(out), hit, out


def test_stop_string_inside_one_delta():
    text, hit, _ = feed_all(["END"], ["hello END world"])
    assert (text, hit) == ("hello ", True)


def test_stop_string_spanning_deltas_is_never_emitted():
    text, hit, pieces = feed_all(["<stop>"], ["abc<", "st", "op>", "tail"])
    assert (text, hit) == ("abc", True)
    assert all("<" not in p for p in pieces)


def test_partial_match_that_fails_is_released():
    text, hit, pieces = feed_all(["STOP"], ["a ST", "ART b"])
    assert (text, hit) == ("a START b", False)
    assert pieces[0] == "a "  # "ST" was held back until it could not be a stop string


def test_earliest_of_several_stops_wins():
    text, hit, _ = feed_all(["zz", "b"], ["aab", "zz"])
    assert (text, hit) == ("aa", True)


def test_no_stops_passes_through():
    assert feed_all([], ["a", "b"])[:2] == ("ab", False)


def test_flush_drops_an_incomplete_last_character(tokenizer):
    ids = tokenizer("ok 😀", add_special_tokens=False).input_ids
    detok = StreamingDetokenizer(tokenizer)
    text = "".join(detok.add(i) for i in ids[:-1]) + detok.flush()
    assert tokenizer.decode(ids[:-1]).endswith("\ufffd")  # the cut really is inside the emoji
    assert text == tokenizer.decode(ids[:-1]).rstrip("\ufffd")
    assert "\ufffd" not in text
