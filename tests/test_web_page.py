"""The web chat page in a real headless browser (Debian's chromium driven by Playwright through
``executable_path``; no browser is downloaded) against a real server process that needs an API
key and serves the real smollm2 and the tiny random-weight model.

How the untrusted-output test gets its ``<script>``: the model cannot be made to write it on
demand, so the page is given that text in the two ways model text reaches it: a conversation
stored in localStorage (what the page shows after a reload), and a streamed answer whose SSE
frames the test serves by intercepting ``/v1/chat/completions`` in the browser (Playwright's
``page.route``). Every other test talks to the real server.

A screenshot of a real answer is saved under ``test-artifacts/`` (gitignored)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from server_helpers import ServerProcess

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("LLAMAWRAPPER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
KEY = "page-test-key-5b2e"


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_folder, tiny_model_dir):
    log = tmp_path_factory.mktemp("web") / "server.log"
    srv = ServerProcess(["smollm2"], log_path=log, api_key=KEY)
    try:
        srv.wait_ready()
        # the second model through the admin route once the first is ready, as an operator adds one
        with srv.client() as c:
            assert c.put("/admin/models/tiny", json={"source": str(tiny_model_dir)}).status_code == 202
        srv.wait_ready()
        yield srv
    finally:
        srv.terminate()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.skip("no chromium on this machine (make test installs Debian's)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    # bypass_csp: the page's Content-Security-Policy would also stop injected scripts; the tests
    # must show that the page itself never turns model text into markup (and Playwright's
    # wait_for_function needs eval). The policy's header is checked on its own.
    context = browser.new_context(viewport={"width": 1280, "height": 820}, accept_downloads=True, bypass_csp=True)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(server.url + "/")
    yield page
    context.close()


def sign_in(page, model: str = "smollm2") -> None:
    page.fill("#api_key", KEY)
    page.dispatch_event("#api_key", "change")
    page.wait_for_selector(f"#model option[value='{model}']", state="attached")
    page.select_option("#model", model)


def ask(page, text: str, *, max_tokens: int, temperature: float = 0) -> None:
    page.fill("#temperature", str(temperature))
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.click("#send")


def last_answer(page) -> str:
    return page.locator(".message.assistant .content").last.inner_text()


def test_page_is_served_open_with_a_strict_policy_and_lists_models_after_the_key(server, page):
    r = httpx.get(server.url + "/")  # no key: the page itself is open, the API is not
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/static/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(server.url + "/static/nope.js").status_code == 401  # only the page's own files are open
    assert httpx.get(server.url + "/static/nope.js", headers=server.headers).status_code == 404

    page.wait_for_function("document.getElementById('status').textContent.includes('API key')")
    sign_in(page)
    options = page.locator("#model option").all_inner_texts()
    assert options == ["smollm2", "tiny"]
    assert page.locator("#status").inner_text() == ""
    assert page.locator(".task-panel").count() == 0  # only chat models are served
    assert page.errors == []


def test_a_message_streams_an_answer_from_the_real_server(server, page):
    sign_in(page)
    ask(page, "Write a Python function that returns the square of a number, in a code block.", max_tokens=60)
    lengths = set()
    deadline = time.monotonic() + 180
    while page.is_enabled("#stop") or not lengths:
        lengths.add(len(last_answer(page)))
        assert time.monotonic() < deadline, "the answer did not finish"
        time.sleep(0.05)
    answer = last_answer(page)
    assert answer.strip()
    assert len({n for n in lengths if 0 < n < len(answer)}) >= 2, f"the answer did not arrive in pieces: {sorted(lengths)}"
    stats = page.locator(".message.assistant .stats").last.inner_text()
    assert "tokens/s" in stats and "prompt " in stats and "first token" in stats
    usage_tokens = int(stats.split(" tokens")[0])
    assert 1 <= usage_tokens <= 60
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-chat.png"), full_page=True)
    assert page.errors == []


def test_stop_cancels_the_generation_on_the_server(server, page):
    cancelled = server.metric("llamawrapper_engine_requests_cancelled_total", model="smollm2")
    sign_in(page)
    ask(page, "Count from 1 to 1000, separated by commas.", max_tokens=400)
    page.wait_for_function("document.querySelector('.message.assistant .content').textContent.length > 8", timeout=120_000)
    assert server.metric("llamawrapper_num_requests_running", model="smollm2") == 1
    page.click("#stop")
    page.wait_for_selector("#stop:disabled")
    assert "stopped" in page.locator(".message.assistant .stats").last.inner_text()
    deadline = time.monotonic() + 15
    while server.metric("llamawrapper_num_requests_running", model="smollm2") != 0:
        assert time.monotonic() < deadline, "the server kept generating after Stop"
        time.sleep(0.1)
    assert server.metric("llamawrapper_engine_requests_cancelled_total", model="smollm2") == cancelled + 1
    assert page.errors == []


def test_history_survives_reload_and_can_be_renamed_exported_and_deleted(server, page):
    sign_in(page, "tiny")
    page.fill("#system", "Answer briefly.")
    page.dispatch_event("#system", "change")
    ask(page, "first question", max_tokens=5)
    page.wait_for_selector(".message.assistant:not(.pending)")
    page.click("#new-chat")
    ask(page, "second question", max_tokens=5)
    page.wait_for_selector(".message.assistant:not(.pending)")
    answer = last_answer(page)
    stored = page.evaluate("JSON.parse(localStorage.getItem('llamawrapper.conversations'))[0].messages[1].content")

    page.reload()
    titles = page.locator(".conv-title").all_inner_texts()
    assert titles == ["second question", "first question"]
    assert page.locator(".message.user").inner_text().endswith("second question")
    assert last_answer(page) == answer
    assert page.input_value("#api_key") == KEY  # kept for the tab's session

    page.once("dialog", lambda d: d.accept("Renamed chat"))
    page.locator(".conv-rename").first.click()
    with page.expect_download() as download:
        page.click("#export-chat")
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["title"] == "Renamed chat"
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"]
    assert exported["messages"][1]["content"] == stored

    page.locator(".conv-title", has_text="first question").click()
    assert page.input_value("#system") == "Answer briefly."
    page.once("dialog", lambda d: d.accept())
    page.locator("li.active .conv-delete").click()
    page.reload()
    assert page.locator(".conv-title").all_inner_texts() == ["Renamed chat"]
    assert page.errors == []


HOSTILE = "\n".join([
    "Here is a page:",
    "<script>window.__pwned = 1</script>",
    "**bold <img src=x onerror=\"window.__pwned = 2\">** and `<b>code</b>`",
    "```html",
    "<script>window.__pwned = 3</script>",
    "```",
    "[click me](javascript:window.__pwned=4) [docs](https://example.org/a)",
])


def assert_shown_as_text(page) -> None:
    content = page.locator(".message.assistant .content").last
    text = content.inner_text()
    assert "<script>window.__pwned = 1</script>" in text
    assert "<img src=x onerror=\"window.__pwned = 2\">" in content.locator("strong").inner_text()
    assert content.locator("pre code").inner_text() == "<script>window.__pwned = 3</script>"
    assert content.locator("code").first.inner_text() == "<b>code</b>"
    assert content.locator("script, img, b, iframe, [onerror]").count() == 0
    assert content.locator("a").count() == 1  # only the https link became a link
    assert content.locator("a").get_attribute("href") == "https://example.org/a"
    assert page.evaluate("window.__pwned") is None


def test_hostile_markdown_in_a_stored_conversation_is_shown_as_text(page):
    page.evaluate("""(hostile) => {
        localStorage.setItem('llamawrapper.conversations', JSON.stringify([{id: 'c1', title: '<i>t</i>', created: '',
            system: '', messages: [{role: 'user', content: '<img src=x onerror="window.__pwned = 5">'},
                                   {role: 'assistant', content: hostile}]}]));
        localStorage.setItem('llamawrapper.current', 'c1');
    }""", HOSTILE)
    page.reload()
    assert_shown_as_text(page)
    assert page.locator(".conv-title").inner_text() == "<i>t</i>"
    assert page.locator(".message.user img").count() == 0
    assert page.errors == []


def test_hostile_markdown_streamed_by_the_server_is_shown_as_text(page):
    def frames(text: str) -> str:
        pieces = [text[i:i + 7] for i in range(0, len(text), 7)]
        chunks = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        chunks.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": len(pieces), "total_tokens": 3 + len(pieces)}})
        return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=frames(HOSTILE)))
    sign_in(page, "tiny")
    ask(page, "show me a page", max_tokens=50)
    page.wait_for_selector(".message.assistant:not(.pending)")
    assert_shown_as_text(page)
    stats = page.locator(".message.assistant .stats").last.inner_text()
    assert stats.startswith(f"{len(range(0, len(HOSTILE), 7))} tokens")
    assert page.errors == []


def test_task_panels_appear_only_for_listed_task_models(page):
    listing = {"object": "list", "data": [
        {"id": "smollm2", "object": "model", "created": 0, "owned_by": "llamawrapper", "task": "chat"},
        {"id": "minilm", "object": "model", "created": 0, "owned_by": "llamawrapper", "task": "embedding"},
        {"id": "sentiment", "object": "model", "created": 0, "owned_by": "llamawrapper", "task": "text-classification"}]}
    page.route("**/v1/models", lambda route: route.fulfill(status=200, json=listing))
    embeddings = {"object": "list", "data": [{"index": 0, "embedding": [1.0, 0.0]}, {"index": 1, "embedding": [1.0, 1.0]}]}
    page.route("**/v1/embeddings", lambda route: route.fulfill(status=200, json=embeddings))
    page.reload()
    page.wait_for_selector(".task-panel")
    assert page.locator(".task-panel legend").all_inner_texts() == ["Embed and compare", "Classify"]
    assert page.locator("#model option").all_inner_texts() == ["smollm2"]
    panel = page.locator(".task-panel", has_text="Embed and compare")
    panel.locator("textarea").first.fill("a cat")
    panel.locator("textarea").last.fill("a dog")
    panel.locator("button").click()
    page.wait_for_function("document.querySelector('.task-output').textContent.includes('cosine')")
    assert "0.7071" in panel.locator(".task-output").inner_text()

    sent = []

    def classify(route):
        sent.append(route.request.post_data_json)
        route.fulfill(status=200, json={"object": "list", "model": "sentiment", "data": [
            {"index": 0, "label": "<b>pos</b>", "score": 0.9, "labels": ["<b>pos</b>", "neg"], "scores": [0.9, 0.1]}]})

    page.route("**/v1/classify", classify)
    panel = page.locator(".task-panel", has_text="Classify")
    panel.locator("textarea").fill("great")
    panel.locator("input").fill("pos, neg")
    panel.locator("button").click()
    page.wait_for_function("document.querySelectorAll('.task-output')[1].textContent.includes('neg')")
    assert sent == [{"model": "sentiment", "input": "great", "labels": ["pos", "neg"]}]
    assert panel.locator(".task-output").inner_text().splitlines() == ["<b>pos</b>: 0.900", "neg: 0.100"]
    assert page.errors == []
