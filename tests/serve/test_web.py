"""The chat page in headless Chromium: send with Enter, streamed reply, tool parts, edit and regenerate.

Needs Debian's `chromium` (apt-get install -y chromium) and the `playwright` Python package; it
skips with the reason when either is missing. The server runs a scripted model that always calls
the calculator (6*7) and then says "!", slowly, so streaming and tool rendering are observable.
"""

import shutil
import time

import pytest

from picochat.infer import Engine
from picochat.serve.app import create_app
from picochat.serve.pool import WorkerPool
from tests.infer.test_engine import scripted_tool_model
from tests.infer.tiny import tiny_tokenizer
from tests.serve.conftest import ServerThread

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    if not shutil.which("chromium"):
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def scripted_server():
    tokenizer = tiny_tokenizer()
    model, _ = scripted_tool_model(tokenizer, "6*7")
    engine = Engine(model, tokenizer)
    real_generate = engine.generate

    def slow_generate(*args, **kwargs):
        for step in real_generate(*args, **kwargs):
            time.sleep(0.05)
            yield step

    engine.generate = slow_generate
    with ServerThread(create_app(WorkerPool([engine]), "scripted")) as srv:
        yield srv


def test_page_sends_and_renders_a_streamed_reply(browser, scripted_server):
    page = browser.new_page()
    page.goto(scripted_server.url)
    page.wait_for_function("document.getElementById('status').textContent.includes('scripted')")
    page.fill("#input", "What is 6*7?")
    page.press("#input", "Enter")
    # While the reply is still streaming, the calculator call is already shown as its own element.
    page.wait_for_selector(".message.assistant.streaming .tool-call", timeout=10_000)
    page.wait_for_selector(".message.assistant.done", timeout=20_000)
    assert page.inner_text(".message.user .body") == "What is 6*7?"
    assert page.inner_text(".message.assistant .tool-call") == "6*7"
    assert page.inner_text(".message.assistant .tool-output") == "42"
    assert page.inner_text(".message.assistant .body").endswith("!")
    assert page.input_value("#input") == ""

    # Shift+Enter is a newline, not a send.
    page.focus("#input")
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#input") == "line one\nline two"
    assert page.locator(".message").count() == 2

    # Regenerate the assistant turn: still one exchange, a fresh reply.
    page.hover(".message.assistant")
    page.click(".message.assistant .actions button")
    page.wait_for_selector(".message.assistant.done", timeout=20_000)
    assert page.locator(".message").count() == 2

    # Edit the user turn and regenerate from there.
    page.hover(".message.user")
    page.click(".message.user .actions button")
    page.fill(".edit-box", "What is six times seven?")
    page.click("text=save & regenerate")
    page.wait_for_selector(".message.assistant.done", timeout=20_000)
    assert page.inner_text(".message.user .body") == "What is six times seven?"
    assert page.locator(".message").count() == 2
    assert page.locator(".message.error").count() == 0
    page.close()
