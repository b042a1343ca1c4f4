"""The web chat page that `lmforge serve` answers at GET /, driven in headless Chromium (selenium) against a real
server on two tiny checkpoints: the model picker, streamed replies equal to the API's own answers, switching
models mid-conversation, the conversation sent as `messages`, Stop (the server cancels the request), Reset,
UTF-8 characters split across network chunks, a screenshot, and a phone-width window."""

import json
import struct
import time
import urllib.request

import pytest

from tests.browser import CHROMIUM, start_chromium  # noqa: E402

if not CHROMIUM.exists():
    pytest.skip("Chromium is not installed (/usr/bin/chromium; apt-get install chromium chromium-driver)",
                allow_module_level=True)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from lmforge.serve import ServeConfig, create_app, load_models  # noqa: E402
from tests import http_server  # noqa: E402

# Records the body of every POST the page makes (window.__sent), and can answer the next chat request with a
# canned SSE body whose bytes arrive in the given pieces (window.__fake = [[byte, ...], ...]).
SPY = """
window.__sent = [];
const realFetch = window.fetch.bind(window);
window.fetch = (url, opts = {}) => {
  if (opts.method === "POST") window.__sent.push(JSON.parse(opts.body));
  if (window.__fake && String(url).endsWith("/v1/chat/completions")) {
    const pieces = window.__fake;
    window.__fake = null;
    const body = new ReadableStream({ start(c) { for (const p of pieces) c.enqueue(new Uint8Array(p)); c.close(); } });
    return Promise.resolve(new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } }));
  }
  return realFetch(url, opts);
};
"""


class Server(http_server.Server):
    """The test server, with helpers to talk to it."""

    def get(self, path):
        with urllib.request.urlopen(self.base + path, timeout=30) as resp:
            return resp.status, resp.headers.get("content-type", ""), resp.read()

    def chat(self, body):
        req = urllib.request.Request(self.base + "/v1/chat/completions", json.dumps({**body, "stream": False}).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def checkpoints(tok, tmp_path_factory):
    return http_server.tiny_checkpoints(tok, tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def server(checkpoints):
    cfg = ServeConfig(model=[f"tiny={checkpoints / 'tiny'}", f"long={checkpoints / 'long'}"], device="cpu")
    with Server(create_app(load_models(cfg))) as srv:
        yield srv


@pytest.fixture
def browser(tmp_path):
    driver = start_chromium(tmp_path / "profile")
    try:
        yield driver
    finally:
        driver.quit()


def _replies(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#log .assistant')].map(e => e.textContent)")


def _set(driver, element_id, value):
    box = driver.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(str(value))


def _send(driver, text, wait):
    n = len(driver.find_elements(By.CSS_SELECTOR, "#log .assistant"))
    wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
    _set(driver, "message", text)
    driver.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log .assistant")) == n + 1)


def _idle(driver):
    return driver.find_element(By.ID, "send").is_enabled() and not driver.find_element(By.ID, "stop").is_enabled()


def test_the_chat_page_in_a_browser(server, browser):
    status, kind, page = server.get("/")
    assert status == 200 and kind.startswith("text/html") and b'<meta charset="utf-8">' in page
    assert b"http://" not in page and b"https://" not in page  # self-contained: no CDN, no fonts from elsewhere

    d, wait = browser, WebDriverWait(browser, 20, poll_frequency=0.05)
    d.get(server.base + "/")
    d.execute_script(SPY)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 2)
    picker = Select(d.find_element(By.ID, "model"))
    assert [o.get_attribute("value") for o in picker.options] == ["tiny", "long"]
    assert d.execute_script("return document.documentElement.lang") == "en" and d.title

    d.find_element(By.CSS_SELECTOR, "#settings summary").click()
    _set(d, "temperature", 0)
    _set(d, "max_tokens", 8)

    # Turn 1 on `tiny`: the streamed reply is the API's own (greedy) answer.
    _send(d, "What is 2 + 3?", wait)
    wait.until(lambda d: _idle(d) and _replies(d)[0].strip())
    first = _replies(d)[0]
    sent = d.execute_script("return window.__sent")
    assert sent[-1]["model"] == "tiny" and sent[-1]["stream"] is True and sent[-1]["max_tokens"] == 8
    assert sent[-1]["messages"] == [{"role": "user", "content": "What is 2 + 3?"}]
    assert first == server.chat(sent[-1])

    # Turn 2 on `long`: the whole conversation goes out as `messages`.
    picker.select_by_value("long")
    _send(d, "And 敏捷的狐狸?", wait)
    wait.until(lambda d: _idle(d) and _replies(d)[1].strip())
    sent = d.execute_script("return window.__sent")
    assert sent[-1]["model"] == "long" and [m["role"] for m in sent[-1]["messages"]] == ["user", "assistant", "user"]
    assert sent[-1]["messages"][1]["content"] == first and sent[-1]["messages"][2]["content"] == "And 敏捷的狐狸?"
    assert _replies(d)[1] == server.chat(sent[-1])
    assert [e.get_attribute("data-model") for e in d.find_elements(By.CSS_SELECTOR, "#log .assistant")] == ["tiny", "long"]

    # Stop a long generation: the page is usable again and the server cancelled the request. For this turn the
    # engine ignores end-of-turn tokens and decodes a little slower, so only max_tokens or Stop can end it.
    engine = server.app.state.models["long"].engine
    submitted, submit = [], engine.submit

    def slow_submit(*args, on_token, **kw):
        def slowly(ev):
            time.sleep(0.002)
            on_token(ev)
        submitted.append(submit(*args, stop_ids=[], on_token=slowly, **kw))
        return submitted[-1]

    engine.submit = slow_submit
    try:
        _set(d, "max_tokens", 1900)
        _set(d, "temperature", 1)
        _send(d, "Tell me a long story.", wait)
        wait.until(lambda d: d.find_element(By.ID, "stop").is_enabled() and _replies(d)[2])
        d.find_element(By.ID, "stop").click()
        wait.until(_idle)
    finally:
        del engine.submit
    assert "stopped" in d.find_elements(By.CSS_SELECTOR, "#log .assistant")[2].get_attribute("class")
    (req,) = submitted
    assert req.wait(10) and req.finish_reason == "cancelled" and len(req.tokens) < 1900
    assert json.loads(server.get("/health")[2])["models"]["long"]["running"] == 0
    assert d.execute_script("return window.__sent")[-1]["max_tokens"] == 1900

    # Characters whose UTF-8 bytes are split across network chunks (and a line split mid-way) come out whole.
    text = "你好，世界 🍎!"
    sse = "".join(f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': p}}]}, ensure_ascii=False)}\n\n"
                  for p in (text[:3], text[3:])) + "data: [DONE]\n\n"
    raw = sse.encode()
    cuts = sorted({1, 7, raw.index("好".encode()) + 1, raw.index("🍎".encode()) + 2, len(raw) - 5})
    d.execute_script("window.__fake = arguments[0]",
                     [list(raw[a:b]) for a, b in zip([0, *cuts], [*cuts, len(raw)])])
    _send(d, "Say hello", wait)
    wait.until(lambda d: _idle(d) and _replies(d)[3])
    assert _replies(d)[3] == text

    png = d.get_screenshot_as_png()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(png) < 20_000_000
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 600 and height >= 400

    # Phone width: the message box and the page fit the viewport.
    d.set_window_size(390, 844)
    wait.until(lambda d: d.execute_script("return window.innerWidth") <= 390)
    inner = d.execute_script("return window.innerWidth")
    box = d.find_element(By.ID, "message").rect
    assert box["x"] >= 0 and box["x"] + box["width"] <= inner and box["width"] > inner / 2
    assert d.execute_script("return document.documentElement.scrollWidth") <= inner
    # Every message fits its own box (a squeezed box lets its text run over the next message).
    assert d.execute_script("return [...document.querySelectorAll('#log > *')].every("
                            "e => e.scrollHeight <= e.clientHeight + 1 && e.scrollWidth <= e.clientWidth + 1)")
    for name in ("send", "stop", "reset", "model"):
        r = d.find_element(By.ID, name).rect
        assert r["x"] >= 0 and r["x"] + r["width"] <= inner, name

    # Reset (at phone width) clears the conversation: the next request carries one message.
    d.find_element(By.ID, "reset").click()
    assert not d.find_elements(By.CSS_SELECTOR, "#log > *")
    picker.select_by_value("tiny")
    _set(d, "max_tokens", 4)
    _send(d, "Hello again", wait)
    wait.until(_idle)
    assert d.execute_script("return window.__sent")[-1]["messages"] == [{"role": "user", "content": "Hello again"}]


def test_the_api_key_field_is_sent_as_a_bearer_token(checkpoints, browser):
    cfg = ServeConfig(model=[f"tiny={checkpoints / 'tiny'}"], device="cpu", api_key="sk-web")
    with Server(create_app(load_models(cfg), cfg.api_key)) as srv:
        d, wait = browser, WebDriverWait(browser, 20, poll_frequency=0.05)
        d.get(srv.base + "/")  # the page itself needs no key
        wait.until(lambda d: "401" in d.find_element(By.ID, "status").text)
        assert not Select(d.find_element(By.ID, "model")).options and not d.find_element(By.ID, "send").is_enabled()
        _set(d, "api_key", "sk-web")
        d.find_element(By.ID, "message").click()  # the key field's change event reloads the models
        wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 1)
        d.find_element(By.CSS_SELECTOR, "#settings summary").click()
        _set(d, "max_tokens", 6)
        _send(d, "Hi", wait)
        wait.until(_idle)
        reply = d.find_element(By.CSS_SELECTOR, "#log .assistant")
        assert "error" not in reply.get_attribute("class"), reply.text
