"""The chat page in headless Chromium: send with Enter, streamed reply, tool parts, edit and regenerate;
a refused turn never strands the chat (errors stay in view, the turn is rolled back into the input
box, slash commands check their values first); the API key is asked for once; long chats say
what the model no longer sees.

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
from picochat.serve.requests import Defaults
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


def scripted_app(**options):
    tokenizer = tiny_tokenizer()
    model, _ = scripted_tool_model(tokenizer, "6*7")
    engine = Engine(model, tokenizer)
    real_generate = engine.generate

    def slow_generate(*args, **kwargs):
        for step in real_generate(*args, **kwargs):
            time.sleep(0.05)
            yield step

    engine.generate = slow_generate
    return create_app(WorkerPool([engine]), "scripted", defaults=Defaults(temperature=0.3, top_k=20, max_tokens=64),
                      **options)


@pytest.fixture(scope="module")
def scripted_server():
    with ServerThread(scripted_app()) as srv:
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


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def notices(page, kind: str) -> list[str]:
    return page.locator(f".message.notice.{kind}").all_inner_texts()


def test_a_refused_turn_never_strands_the_chat(browser, scripted_server):
    page = browser.new_page()
    page.goto(scripted_server.url)
    page.wait_for_function("document.getElementById('status').textContent.includes('scripted')")
    # The stuck sequence of old: a temperature the server refuses, then a message.
    send(page, "/temperature 3")
    assert "temperature must be a number from 0 to 2" in notices(page, "error")[-1]
    assert page.input_value("#temperature") == "0.3"  # the server's default; refused before anything was sent
    assert page.input_value("#topk") == "20"
    page.fill("#temperature", "3")  # typed straight into the field: still caught before sending
    send(page, "hello")
    page.wait_for_function("document.querySelectorAll('.message.notice.error').length === 2")
    assert page.locator(".message.user").count() == 0 and page.input_value("#input") == "hello"
    page.fill("#temperature", "0.3")
    # A turn the server refuses (a message over its length limit): the error stays next to it,
    # the message goes back into the box, and the conversation holds no dangling user turn.
    send(page, "x" * 8001)
    page.wait_for_function("document.querySelectorAll('.message.notice.error').length === 3")
    assert "8001 characters" in notices(page, "error")[-1]
    assert page.locator(".message.user").count() == 0 and page.input_value("#input") == "x" * 8001
    # /help keeps its line breaks.
    send(page, "/help")
    help_text = notices(page, "info")[-1]
    assert "\n/temperature [v]" in help_text and "\n/clear" in help_text
    assert page.eval_on_selector(".message.notice.info", "e => getComputedStyle(e).whiteSpace") == "pre-wrap"
    # Then a normal exchange works, and the errors are still in view above it.
    send(page, "What is 6*7?")
    page.wait_for_selector(".message.assistant.done", timeout=20_000)
    assert page.inner_text(".message.assistant .tool-output") == "42"
    assert page.locator(".message.user").count() == 1 and len(notices(page, "error")) == 3
    send(page, "And again?")
    page.wait_for_function("document.querySelectorAll('.message.assistant.done').length === 2", timeout=20_000)
    assert page.locator(".message.user").count() == 2
    page.close()


def test_the_page_asks_for_the_api_key_once(browser):
    with ServerThread(scripted_app(api_key="sk-page")) as srv:
        page = browser.new_page()
        answers, asked = iter(["wrong", "sk-page"]), []

        def on_dialog(dialog):
            asked.append(dialog.message)
            dialog.accept(next(answers))

        page.on("dialog", on_dialog)
        page.goto(srv.url)
        page.wait_for_function("document.getElementById('status').textContent.includes('key required')")
        send(page, "hi")  # a wrong key: 401, shown, rolled back, and the key is forgotten
        page.wait_for_selector(".message.notice.error", timeout=20_000)
        assert "API key" in notices(page, "error")[-1] and page.input_value("#input") == "hi"
        send(page, "hi")
        page.wait_for_selector(".message.assistant.done", timeout=20_000)
        send(page, "more")
        page.wait_for_function("document.querySelectorAll('.message.assistant.done').length === 2", timeout=20_000)
        assert len(asked) == 2  # once for the wrong key, once for the right one; not per message
        page.close()


def test_a_long_chat_says_what_the_model_no_longer_sees(browser, scripted_server):
    page = browser.new_page()
    page.goto(scripted_server.url)
    page.wait_for_function("document.getElementById('status').textContent.includes('scripted')")
    page.evaluate("""() => {
        for (let i = 0; i < 200; i++) {
            messages.push({role: "user", content: `question ${i} about the fox`});
            messages.push({role: "assistant", content: [{type: "text", text: `answer ${i}`}]});
        }
        render();
    }""")
    send(page, "What is 6*7?")
    page.wait_for_selector(".message.notice.info", timeout=20_000)
    assert "no longer fit the model's context" in notices(page, "info")[-1]
    assert page.locator(".message.assistant.done").count() == 201
    page.close()
