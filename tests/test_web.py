"""The chat page `tinyoss serve` serves at `/` (tinyoss/web), driven in a real headless Chromium
through Selenium against the real server on loopback: a reply streams in with its reasoning shown
apart, Stop keeps the partial reply (and frees the server's slot) and the chat goes on, errors
show their message.

Needs selenium and Debian's chromium + chromium-driver (CI: `apt-get install chromium
chromium-driver`); skips without them. Selenium Manager never runs: the driver's path is given."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import urllib.request

import pytest

import tinyoss
from serving import Scripted, serve

webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
                allow_module_level=True)

# what the scripted model writes after `<|start|>assistant`, by a keyword of the user's message
REPLIES = {
    "hello": "<|channel|>analysis<|message|>Let me think.<|end|>"
             "<|start|>assistant<|channel|>final<|message|>Hello there!<|return|>",
    "story": "<|channel|>final<|message|>" + "Once upon a time, " * 1000 + "<|return|>",  # ~5000 tokens
    "short": "<|channel|>final<|message|>The end.<|return|>",
}
CTX = 8192
WAIT = 20  # seconds: the most any one step may take


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    scripted = Scripted(tinyoss.load(tiny_checkpoint), REPLIES)
    # one reply first, without the browser: with a cold numba cache compiling the kernels takes
    # ~20 s, which no browser step should wait on
    with serve(scripted, ctx=CTX) as (url, _):
        body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            assert response.status == 200
    return scripted


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="tinyoss-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                "--window-size=1000,800"]:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver, condition, timeout=WAIT):
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(lambda d: condition(d))


def text(element) -> str:
    """All of an element's text, shown or folded away (Selenium's .text is only what is shown)."""
    return element.get_attribute("textContent")


def answer(bubble) -> str:
    return text(bubble.find_element(By.CSS_SELECTOR, ".answer"))


def state(bubble) -> str:
    return bubble.get_attribute("data-state")


def open_page(driver, url):
    driver.get(url)
    wait(driver, lambda d: d.find_element(By.ID, "model").text)  # it asked GET /v1/models
    # the body of every request the page sends, and at every change under #messages the last
    # assistant bubble's state and answer length as they were then (an answer seen growing while
    # "streaming" is one that streamed, however fast the tokens came)
    driver.execute_script("""
        window.sent = [];
        const fetch = window.fetch;
        window.fetch = (url, options) => {
          if (options && options.body) window.sent.push(JSON.parse(options.body));
          return fetch(url, options);
        };
        window.seen = [];
        new MutationObserver(() => {
          const b = [...document.querySelectorAll('#messages .msg.assistant')].pop();
          if (b) window.seen.push([b.dataset.state, b.querySelector('.answer').textContent.length]);
        }).observe(document.getElementById('messages'),
                   {childList: true, subtree: true, characterData: true, attributes: true});""")


def sent(driver) -> list[dict]:
    return driver.execute_script("return window.sent")


def send(driver, message):
    """Type a message and click Send; -> the new assistant bubble."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    driver.find_element(By.ID, "prompt").clear()
    driver.find_element(By.ID, "prompt").send_keys(message)
    driver.find_element(By.ID, "send").click()
    return wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[before:])[0]


def settings(driver, field: str, value: str) -> None:
    if driver.find_element(By.ID, "settings").get_attribute("open") is None:
        driver.find_element(By.CSS_SELECTOR, "#settings summary").click()
    box = driver.find_element(By.ID, field)
    box.clear()
    box.send_keys(value)


def test_a_reply_streams_in_with_its_reasoning_apart(browser, model):
    with serve(model, ctx=CTX) as (url, _):
        open_page(browser, url + "/")
        bubble = send(browser, "Say hello")
        assert text(browser.find_elements(By.CSS_SELECTOR, ".msg.user")[-1]) == "Say hello"
        wait(browser, lambda d: state(bubble) == "done")
        assert answer(bubble) == "Hello there!"
        reasoning = bubble.find_element(By.CSS_SELECTOR, "details.reasoning")
        assert text(reasoning) == "Reasoning" + "Let me think."  # its summary, then the text
        assert reasoning.get_attribute("open") is None  # folded away once the answer came
        seen = browser.execute_script("return window.seen")
        assert [5, 11, 12] == sorted({n for s, n in seen if s == "streaming" and n > 0}), seen
        status = browser.find_element(By.ID, "status").text
        assert "tok/s" in status and "first token" in status and "tokens" in status, status

        # the Enter key sends too, and the whole conversation goes back, answers without reasoning
        browser.find_element(By.ID, "prompt").send_keys("hello again\n")
        second = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[1:])[0]
        wait(browser, lambda d: state(second) == "done")
        assert answer(second) == "Hello there!"
        first, then = sent(browser)
        assert first == {"model": "tiny", "messages": [{"role": "user", "content": "Say hello"}],
                         "stream": True, "stream_options": {"include_usage": True},
                         "reasoning_effort": "medium"}
        assert then["messages"] == [{"role": "user", "content": "Say hello"},
                                    {"role": "assistant", "content": "Hello there!"},
                                    {"role": "user", "content": "hello again"}]
        # the usage chunk: the second prompt began with the first one, cached
        status = browser.find_element(By.ID, "status").text
        cached = re.search(r"(\d+) of (\d+) prompt tokens cached", status)
        assert cached and 0 < int(cached[1]) < int(cached[2]), status

        # New chat forgets it all; the effort picked goes with the next request
        browser.find_element(By.ID, "new-chat").click()
        assert not browser.find_elements(By.CSS_SELECTOR, "#messages > *")
        Select(browser.find_element(By.ID, "effort")).select_by_value("low")
        fresh = send(browser, "hello")
        wait(browser, lambda d: state(fresh) == "done")
        assert sent(browser)[-1]["messages"] == [{"role": "user", "content": "hello"}]
        assert sent(browser)[-1]["reasoning_effort"] == "low"


def test_stop_keeps_the_partial_reply_and_the_chat_goes_on(browser, model):
    with serve(model, ctx=CTX) as (url, server):
        open_page(browser, url + "/")
        settings(browser, "max-tokens", "6000")
        bubble = send(browser, "Tell me a long story")
        stop = browser.find_element(By.ID, "stop")
        wait(browser, lambda d: len(answer(bubble)) > 20)
        stop.click()
        wait(browser, lambda d: state(bubble) == "stopped")
        partial = answer(bubble)
        assert partial.startswith("Once upon a time, ") and len(partial) < len(REPLIES["story"]) // 2
        assert "(stopped)" in text(bubble)
        assert not stop.is_enabled() and browser.find_element(By.ID, "send").is_enabled()
        # the server noticed the client gone and freed the slot
        deadline = time.monotonic() + WAIT
        while server.engine.load["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.engine.load == {"running": 0, "waiting": 0, "prefilling": 0, "slots": 1}

        # the chat goes on: a third message gets its reply; the stopped one stays as it was
        settings(browser, "max-tokens", "")
        third = send(browser, "Something short")
        wait(browser, lambda d: state(third) == "done")
        assert answer(third) == "The end."
        assert answer(bubble) == partial
        story, short = sent(browser)
        assert story["max_tokens"] == 6000 and "max_tokens" not in short
        assert short["messages"] == [{"role": "user", "content": "Tell me a long story"},
                                     {"role": "assistant", "content": partial},  # kept, as shown
                                     {"role": "user", "content": "Something short"}]


def test_errors_show_their_message(browser, model):
    with serve(model, ctx=CTX, api_key="right") as (url, _):
        browser.get(url + "/?key=wrong")
        wait(browser, lambda d: "API key" in d.find_element(By.ID, "status").text)
        bubble = send(browser, "hello")
        wait(browser, lambda d: state(bubble) == "error")
        error = browser.find_element(By.CSS_SELECTOR, ".msg.error")
        assert "a valid API key is required" in text(error)
        assert browser.find_element(By.ID, "prompt").get_attribute("value") == "hello"  # to retry
        # the right key in the settings field: the same message goes through
        settings(browser, "api-key", "right")
        browser.find_element(By.ID, "send").click()
        reply = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[1:])[0]
        wait(browser, lambda d: state(reply) == "done")
        assert answer(reply) == "Hello there!"
        # an error body from /v1/chat/completions itself (400, the field named)
        settings(browser, "max-tokens", str(CTX))
        refused = send(browser, "hello")
        wait(browser, lambda d: state(refused) == "error")
        assert f"the context is {CTX} tokens" in text(refused)
    # the server gone: a network error, shown the same way
    gone = send(browser, "Anyone there?")
    wait(browser, lambda d: state(gone) == "error")
    assert "Network error" in text(gone) and "error" in gone.get_attribute("class").split()
