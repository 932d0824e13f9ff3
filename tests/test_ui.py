"""The chat page (``GET /`` and ``/ui``) in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, installed by scripts/install.sh --test), driven by selenium, against the
real default chat model: a reply streams in, Stop ends the reply and the server's generation,
a reload keeps the finished conversation (sessionStorage) and nothing else, and a JSON schema
set in the page shapes the reply.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import DEFAULT_CHAT_MODEL

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync",
                  "--window-size=1280,800")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="Debian's chromium and chromium-driver are not installed "
                              "(bash scripts/install.sh --test installs them)"),
]

# Records every length the streaming reply's text had, as the page changed it.
WATCH_REPLY = """
window.__lengths = [];
new MutationObserver(() => {
  const bubble = document.querySelector('#messages .msg.assistant.streaming .text');
  if (bubble) window.__lengths.push(bubble.textContent.length);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


def fetch(url: str, data: bytes | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, data=data)
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.headers["content-type"], response.read()


def llm_metrics(server) -> dict[str, float]:
    _, _, text = fetch(f"http://127.0.0.1:{server.metrics_port}/metrics")
    values = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.labels.get("model") == DEFAULT_CHAT_MODEL and sample.name.startswith("triserve_llm_"):
                values[sample.name] = sample.value
    return values


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser, chat_server):
    """The page, freshly opened (an empty sessionStorage), its model list loaded."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{chat_server.base_url}/ui")
    browser.execute_script("sessionStorage.clear(); localStorage.clear();")
    browser.refresh()
    WebDriverWait(browser, 30).until(
        lambda b: DEFAULT_CHAT_MODEL in b.execute_script(
            "return [...document.querySelectorAll('#model option')].map(o => o.value)"))
    return browser


def fill(browser, element_id: str, text: str) -> None:
    element = browser.find_element("id", element_id)
    element.clear()
    if text:
        element.send_keys(text)


def ask(browser, prompt: str, max_tokens: int | str = "", temperature: str = "0") -> None:
    fill(browser, "max_tokens", str(max_tokens))
    fill(browser, "temperature", temperature)
    fill(browser, "prompt", prompt)
    browser.find_element("id", "send").click()


def finished_replies(browser) -> list[dict]:
    return browser.execute_script("""
        return [...document.querySelectorAll('#messages .msg.assistant[data-done]')].map(b => ({
            text: b.querySelector('.text').textContent, meta: b.querySelector('.meta').textContent}));""")


def wait_replies(browser, count: int, timeout: float = 120) -> list[dict]:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout).until(lambda b: len(finished_replies(b)) >= count)
    return finished_replies(browser)


def test_page_is_served_at_root_and_ui_and_chatglm_keeps_post_root(chat_server):
    for path in ("/", "/ui"):
        status, content_type, body = fetch(chat_server.base_url + path)
        assert status == 200 and content_type.startswith("text/html")
        assert b'<script src="ui/app.js">' in body
    status, content_type, _ = fetch(chat_server.base_url + "/ui/app.js")
    assert content_type.startswith("text/javascript")
    with pytest.raises(urllib.error.HTTPError) as missing:
        fetch(chat_server.base_url + "/ui/..%2F__init__.py")
    assert missing.value.code == 404
    # ChatGLM's api.py still answers POST / on the same path
    status, _, body = fetch(chat_server.base_url + "/", json.dumps(
        {"prompt": "Hi", "history": [], "max_length": 60}).encode())
    assert status == 200 and json.loads(body)["history"][0][0] == "Hi"


def test_a_reply_streams_in_and_the_conversation_continues(page):
    page.execute_script(WATCH_REPLY)
    ask(page, "Name three colors.", max_tokens=40)
    [reply] = wait_replies(page, 1)
    lengths = page.execute_script("return window.__lengths")
    partial = {n for n in lengths if 0 < n < len(reply["text"])}
    assert len(partial) >= 3, f"the reply did not arrive in pieces: lengths {lengths}"
    assert reply["text"].strip()
    assert "tokens" in reply["meta"] and "first token" in reply["meta"]
    # a second turn sees the first: the conversation is sent along (the bubbles stay)
    ask(page, "And three more?", max_tokens=20)
    replies = wait_replies(page, 2)
    assert len(replies) == 2
    users = page.execute_script(
        "return [...document.querySelectorAll('#messages .msg.user')].map(b => b.textContent)")
    assert users == ["Name three colors.", "And three more?"]


def test_stop_ends_the_reply_and_the_generation_on_the_server(page, chat_server):
    from selenium.webdriver.support.ui import WebDriverWait

    before = llm_metrics(chat_server)
    ask(page, "Write a very long story about a dragon who learns to cook, in many chapters.",
        max_tokens=1500, temperature="0.7")
    WebDriverWait(page, 60).until(lambda b: b.execute_script(
        "const t = document.querySelector('#messages .msg.assistant.streaming .text');"
        "return t && t.textContent.length > 20"))
    page.find_element("id", "stop").click()
    [reply] = wait_replies(page, 1, timeout=10)
    assert reply["meta"] == "stopped"
    assert page.find_element("id", "send").is_enabled() and not page.find_element("id", "stop").is_enabled()

    # the server stops generating: no running sequence, and the token counter stops growing
    deadline = time.monotonic() + 15
    while llm_metrics(chat_server)["triserve_llm_running_sequences"] != 0:
        assert time.monotonic() < deadline, "the engine kept decoding the stopped reply"
        time.sleep(0.2)
    stopped = llm_metrics(chat_server)["triserve_llm_generation_tokens_total"]
    time.sleep(1.5)
    after = llm_metrics(chat_server)["triserve_llm_generation_tokens_total"]
    assert after == stopped
    generated = after - before["triserve_llm_generation_tokens_total"]
    assert 0 < generated < 1500, f"{generated} tokens were generated for a reply stopped midway"


def test_reload_keeps_the_finished_conversation_and_nothing_else(page, chat_server):
    from selenium.webdriver.support.ui import WebDriverWait

    fill(page, "system", "Answer in one short sentence.")
    fill(page, "api_key", "secret-key-for-the-test")
    ask(page, "What is the capital of France?", max_tokens=20)
    [reply] = wait_replies(page, 1)
    # a second reply still streaming when the page reloads
    ask(page, "Write a long poem about the sea.", max_tokens=1500, temperature="0.7")
    WebDriverWait(page, 60).until(lambda b: b.execute_script(
        "return !!document.querySelector('#messages .msg.assistant.streaming')"))
    page.refresh()
    WebDriverWait(page, 30).until(lambda b: b.execute_script(
        "return document.querySelectorAll('#model option').length > 0"))

    texts = page.execute_script(
        "return [...document.querySelectorAll('#messages .msg')].map(b => [b.className, "
        "b.querySelector('.text').textContent])")
    # the finished turn and the unanswered question are kept; the unfinished reply is not
    assert texts == [["msg user", "What is the capital of France?"], ["msg assistant", reply["text"]],
                     ["msg user", "Write a long poem about the sea."]]
    assert page.find_element("id", "system").get_attribute("value") == "Answer in one short sentence."
    assert page.find_element("id", "api_key").get_attribute("value") == ""
    storage = page.execute_script("return JSON.stringify(sessionStorage) + JSON.stringify(localStorage)")
    assert "secret-key-for-the-test" not in storage
    assert page.execute_script("return localStorage.length") == 0
    # the server was not left generating the reply nobody reads any more
    deadline = time.monotonic() + 15
    while llm_metrics(chat_server)["triserve_llm_running_sequences"] != 0:
        assert time.monotonic() < deadline, "the engine kept decoding after the page reloaded"
        time.sleep(0.2)
    # "New chat" forgets the conversation, in the page and in sessionStorage
    page.find_element("id", "new_chat").click()
    assert page.execute_script("return document.querySelectorAll('#messages .msg').length") == 0
    page.refresh()
    assert page.execute_script("return document.querySelectorAll('#messages .msg').length") == 0


def test_a_json_schema_that_does_not_parse_is_refused_in_the_page(page):
    fill(page, "schema", '{"type": "object",')
    ask(page, "Hello", max_tokens=5)
    error = page.find_element("id", "schema_error")
    assert error.is_displayed() and error.text.startswith("JSON schema:")
    assert page.execute_script("return document.querySelectorAll('#messages .msg').length") == 0
    assert page.find_element("id", "prompt").get_attribute("value") == "Hello"  # nothing lost


PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "mood": {"enum": ["happy", "sad", "calm"]}},
          "required": ["name", "age", "mood"]}


def test_a_json_schema_set_in_the_page_shapes_the_reply(page):
    """The schema box's schema goes to the server as response_format: the reply the page shows
    parses as JSON and validates against it (strict: no other keys)."""
    fill(page, "schema", json.dumps(PERSON))
    ask(page, "Describe a person.", max_tokens=80)
    [reply] = wait_replies(page, 1)
    assert not page.find_element("id", "schema_error").is_displayed()
    document = json.loads(reply["text"])
    jsonschema.validate(document, {**PERSON, "additionalProperties": False})
    # the page's own state sent it: the setting is kept for the next turn
    assert json.loads(page.find_element("id", "schema").get_attribute("value")) == PERSON
