"""The web chat at `/`, in a real browser: headless Chromium (Debian's package) driven by Playwright.

The page is opened against a live `lmforge serve` app on localhost; the test types a message, watches the
reply stream in, stops it, checks the conversation the page sends next, and starts a new chat.
CI installs the browser with `apt-get install -y chromium`; without /usr/bin/chromium this test skips.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium (Debian's `chromium` package) to drive", allow_module_level=True)

from test_server import MODEL, LiveServer, build_model_dir  # noqa: E402

from lmforge.infer.engine import Engine  # noqa: E402

CONTEXT = 4096
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    # No end-of-text ids: a random model could end a reply at any token, and the test needs replies that
    # run to the page's max-tokens setting: long enough to be stopped midway (a 4096-token context), or
    # exactly as long as asked.
    model_dir = build_model_dir(tmp_path_factory.mktemp("web"), context=CONTEXT)
    engine = Engine.from_pretrained(model_dir, max_batch_size=4, max_len=CONTEXT, eos_ids=set())
    engine.start()
    server = LiveServer.start(engine)
    yield server
    server.close()
    engine.stop()


@pytest.fixture
def page(live):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def wait_until(page, condition: str) -> None:
    """Poll a JavaScript condition on a timer (animation-frame polling may not run in a headless tab)."""
    page.wait_for_function(condition, polling=50)


# Records the reply's length at every change while it is still marked as streaming: a reply that arrived
# in one piece leaves one entry, a streamed one many.
WATCH_STREAMING = """
window.partialLengths = [];
new MutationObserver(() => {
  const reply = document.querySelector('.message.assistant.streaming');
  if (reply && reply.textContent.length) window.partialLengths.push(reply.textContent.length);
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
"""


def open_chat(page, live) -> None:
    page.goto(live.url + "/")
    wait_until(page, f"document.getElementById('model-name').textContent === {json.dumps(MODEL)}")


def test_chat_streams_stops_keeps_history_and_starts_over(live, page, tmp_path):
    requests, bodies = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("request", lambda request: request.method == "POST" and bodies.append(json.loads(request.post_data)))
    open_chat(page, live)
    assert page.is_disabled("#stop") and page.is_enabled("#send")

    # 1. A long reply streams in: the page shows text while the reply is still streaming, and Stop is live.
    page.evaluate(WATCH_STREAMING)
    page.fill("#max-tokens", "4000")
    page.fill("#prompt", "Hello there")
    page.press("#prompt", "Enter")
    wait_until(page, "window.partialLengths.length >= 3")
    assert page.is_enabled("#stop") and page.is_disabled("#send")
    assert page.text_content(".message.user") == "Hello there"

    # 2. Stop: the fetch is aborted, the partial reply stays, and the server frees the engine slot.
    page.click("#stop")
    page.wait_for_selector(".message.assistant:not(.streaming)")
    assert page.text_content(".message.assistant .note") == "stopped"
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    assert live.wait_idle() == 0
    partial = page.evaluate("document.querySelector('.message.assistant').firstChild.textContent")
    assert partial and len(set(page.evaluate("window.partialLengths"))) >= 3

    # 3. The next turn sends the whole conversation, with the temperature and max-tokens controls' values.
    page.eval_on_selector("#temperature", "e => { e.value = '1.3'; e.dispatchEvent(new Event('input')); }")
    assert page.text_content("#temperature-value") == "1.30"
    page.fill("#max-tokens", "7")
    page.fill("#prompt", "And then?")
    page.click("#send")
    wait_until(page, "document.querySelectorAll('.message.assistant:not(.streaming)').length === 2")
    second = bodies[-1]
    assert second["messages"] == [{"role": "user", "content": "Hello there"},
                                  {"role": "assistant", "content": partial},
                                  {"role": "user", "content": "And then?"}]
    assert second["temperature"] == 1.3 and second["max_tokens"] == 7 and second["stream"] is True
    speed = page.text_content("#speed")
    assert speed.startswith("7 tokens · ") and "tok/s" in speed and "first token" in speed  # from usage
    assert speed.endswith(" prompt tokens cached") and int(speed.split(" · ")[-1].split()[0]) > 0  # turn 1's
    page.screenshot(path=str(tmp_path / "web_chat.png"))

    # 4. New chat: the page is empty again and the next request carries only the new message.
    page.click("#new-chat")
    assert page.locator(".message").count() == 0 and page.text_content("#speed") == ""
    page.fill("#prompt", "Fresh start")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".message.assistant:not(.streaming)")
    assert bodies[-1]["messages"] == [{"role": "user", "content": "Fresh start"}]

    # Everything the page loaded came from this server (no CDN: these machines have no internet).
    assert requests and all(url.startswith(live.url + "/") for url in requests)
    assert live.wait_idle() == 0 and live.healthy()


def test_errors_are_shown_and_the_turn_can_be_retried(live, page):
    open_chat(page, live)
    page.fill("#max-tokens", "9000")  # more than the 4096-token context: the server answers 400
    page.fill("#prompt", "Too long a reply")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".message.assistant.error")
    assert "maximum context length" in page.text_content(".message.assistant.error")
    page.fill("#max-tokens", "3")
    page.fill("#prompt", "Shorter")
    page.press("#prompt", "Enter")
    wait_until(page, "document.querySelectorAll('.message.assistant:not(.streaming):not(.error)').length")
    assert page.is_enabled("#send")


def test_api_key_field(live, page):
    """Against a server that wants a key: the page says so, and works once the key is typed in."""
    locked = LiveServer.start(live.engine, api_key="sekret")
    try:
        page.goto(locked.url + "/")
        wait_until(page, "document.getElementById('model-name').textContent.includes('API key')")
        page.fill("#api-key", "sekret")
        page.dispatch_event("#api-key", "change")
        wait_until(page, f"document.getElementById('model-name').textContent === {json.dumps(MODEL)}")
        page.fill("#max-tokens", "4")
        page.fill("#prompt", "Hello")
        page.press("#prompt", "Enter")
        wait_until(page, "document.querySelector('.message.assistant:not(.streaming)')")
        assert not page.locator(".message.error").count()
        assert page.text_content("#speed").startswith("4 tokens")
    finally:
        locked.close()


def test_agent_mode_shows_the_code_and_its_output(page, corpus, tmp_path_factory):
    """`lmforge serve --agent true`: a policy taught one CodeAct episode writes its code, the server runs it in
    the conversation's sandbox, the page shows code and output, and the model answers from the output."""
    from test_agent_rollout import QUESTION, teach
    from train_helpers import tiny_model

    from lmforge.checkpoint import save_model
    from lmforge.infer.agent_api import AgentSettings

    root = tmp_path_factory.mktemp("web-agent")
    base = save_model(tiny_model(seed=3, vocab_size=300, max_position_embeddings=512), root / "base",
                      tokenizer_dir=corpus[0])
    engine = Engine.from_pretrained(teach(base, corpus[0], root / "taught"), max_batch_size=2)
    engine.start()
    server = LiveServer.start(engine, agent=AgentSettings(max_steps=3))
    bodies, deletes = [], []
    page.on("request", lambda r: r.method == "POST" and r.url.endswith("/chat/completions")
            and bodies.append(json.loads(r.post_data)))
    page.on("request", lambda r: r.method == "DELETE" and deletes.append(r.url))
    try:
        page.goto(server.url + "/")
        wait_until(page, f"document.getElementById('model-name').textContent === {json.dumps(MODEL + ' · agent')}")
        page.eval_on_selector("#temperature", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
        page.fill("#max-tokens", "60")
        page.fill("#prompt", QUESTION[0]["content"])
        page.press("#prompt", "Enter")
        wait_until(page, "document.querySelectorAll('.message.assistant:not(.streaming)').length === 2 "
                         "&& !document.getElementById('send').disabled")
        assert page.text_content(".message.assistant pre.code") == "print(6 * 7)\n"
        assert page.text_content(".message.assistant pre.output") == "42"
        final = page.locator(".message.assistant").nth(1).text_content()
        assert final.startswith("The product is 42.") and "#### 42" in final
        system, user, assistant, tool = bodies[-1]["messages"]
        assert system["role"] == "system" and user == {"role": "user", "content": QUESTION[0]["content"]}
        assert assistant["content"].endswith("```python\nprint(6 * 7)\n```") and tool == {"role": "tool",
                                                                                          "content": "42"}
        page.click("#new-chat")
        wait_until(page, "true")
        assert len(deletes) == 1 and "/v1/agent/session/" in deletes[0]
    finally:
        server.close()
        engine.stop()
        server.server.config.app.state.agent_sessions.close_all()
