"""The web chat page at `/` of `aviary serve` (aviary/serve/webui.py and the files in aviary/serve/static).

Without a browser, always: the page and its files are served with their media types and security headers,
nothing else is (no path leads out of the folder, no folder is listed), the page names nothing outside this
server, the wheel carries it, and `--no-ui` turns it off.

In a real headless Chromium (Playwright driving Debian's `chromium`, or Playwright's own build; skipped with a
note on how to install one when neither is there): a streamed reply that is still there after a reload and
goes back as history, new and deleted conversations, the settings panel's values and the API key in the
request, the server's error message shown, Stop keeping the partial answer (and the server freeing the
request), and a G1 reply's reasoning folded above its answer.

The replies are scripted as in test_serve_chat_formats.py: the real server, scheduler and engine run the tiny
random model, but the engine's sampler writes a fixed text, so what the page shows can be checked exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import tomllib
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path

import httpx
import pytest
import torch

import aviary
from aviary.cli import build_parser
from aviary.generation import Engine
from aviary.serve.app import create_app
from aviary.serve.scheduler import Scheduler
from live import LiveServer, scripted_sampling

pytest.importorskip("uvicorn")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

STATIC = resources.files("aviary.serve") / "static"
KEY = "test-key"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]  # offline: no stalls
INSTALL = ("install a browser for these tests: `apt-get install chromium` (Debian/Ubuntu) and `pip install "
           "playwright`; or `python -m playwright install chromium` where its download site is reachable")


@pytest.fixture(scope="module")
def tok():
    from aviary.tokenizer import WorldTokenizer

    return WorldTokenizer()


@pytest.fixture(scope="module")
def model(checkpoint):
    return aviary.load(checkpoint)


@pytest.fixture(scope="module")
def script(tok):
    with scripted_sampling(tok) as script:
        yield script


@pytest.fixture(scope="module")
def app(model, tok):
    """The app, not started (no scheduler thread): enough for the static files."""
    return create_app(Scheduler(Engine(model, tok)), tok, model_name="tiny")


def get(app, path: str, method: str = "GET") -> httpx.Response:
    from starlette.testclient import TestClient

    return TestClient(app).request(method, path)


# ---- without a browser ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, name, media_type", [
    ("/", "index.html", "text/html; charset=utf-8"),
    ("/static/index.html", "index.html", "text/html; charset=utf-8"),
    ("/static/chat.js", "chat.js", "text/javascript; charset=utf-8"),
    ("/static/chat.css", "chat.css", "text/css; charset=utf-8"),
    ("/static/favicon.svg", "favicon.svg", "image/svg+xml"),
])
def test_the_page_and_its_files_are_served_with_their_types(app, path, name, media_type):
    r = get(app, path)
    assert r.status_code == 200 and r.headers["content-type"] == media_type
    assert r.content == (STATIC / name).read_bytes()
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert get(app, path, "HEAD").status_code == 200


def test_the_page_runs_its_script_and_style(app):
    html = get(app, "/").text
    assert '<script src="static/chat.js" defer></script>' in html
    assert '<link rel="stylesheet" href="static/chat.css">' in html


@pytest.mark.parametrize("path", [
    "/static", "/static/", "/static/..%2Fapp.py", "/static/%2e%2e/app.py", "/static/..%2F..%2Fpyproject.toml",
    "/static/%2Fetc%2Fpasswd", "/static/..%5Capp.py", "/static/chat.js%00.css", "/static/CHAT.JS",
    "/static/chat.js/", "/static/./chat.js%2F..%2F..%2Fwebui.py", "/index.html", "/chat.js",
])
def test_nothing_else_is_served(app, path):
    r = get(app, path)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path


def test_the_page_names_nothing_outside_this_server():
    """Offline and safe: no URL with a scheme or host (the SVG's xmlns is a name, never fetched), every src
    and href relative to the page, and the script never turns text into markup."""
    texts = {f.name: f.read_text(encoding="utf-8") for f in STATIC.iterdir() if f.is_file()}
    assert {"index.html", "chat.js", "chat.css", "favicon.svg"} <= set(texts)
    for name, text in texts.items():
        urls = re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"'<>)]*|(?<![:\w])//[a-z0-9.-]+\.[a-z]{2,}", text, re.I)
        assert urls == (["http://www.w3.org/2000/svg"] if name == "favicon.svg" else []), name
        assert "@import" not in text and "url(" not in text, name
    links = re.findall(r'(?:src|href)="([^"]*)"', texts["index.html"])
    assert links and all(link.startswith("static/") for link in links)
    script = re.sub(r"//.*", "", texts["chat.js"])  # the comments may name what it avoids
    for unsafe in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert unsafe not in script, unsafe


def test_the_wheel_carries_the_page():
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["aviary"]
    for f in STATIC.iterdir():
        assert any(fnmatch(f"serve/static/{f.name}", p) for p in patterns), f.name


def test_no_ui_turns_the_page_off(checkpoint):
    from aviary.commands.serve import build

    threads = torch.get_num_threads()
    try:
        for flags, status in (([], 200), (["--no-ui"], 404)):
            args = build_parser().parse_args(["serve", str(checkpoint), "--threads", "1", *flags])
            app, _ = build(args)
            assert get(app, "/").status_code == get(app, "/static/chat.js").status_code == status, flags
            assert get(app, "/v1/models").json()["data"][0]["id"] == "tiny-v7"
    finally:
        torch.set_num_threads(threads)


# ---- in a headless browser --------------------------------------------------------------------------------

def chromium_path(playwright) -> str | None:
    for name in ("chromium", "chromium-browser"):  # Debian's and Ubuntu's packages
        if shutil.which(name):
            return shutil.which(name)
    try:
        own = playwright.chromium.executable_path  # `playwright install chromium`
    except Exception:
        return None
    return own if own and os.path.exists(own) else None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason=INSTALL)
    with sync_api.sync_playwright() as p:
        path = chromium_path(p)
        if path is None:
            pytest.skip(f"no Chromium found: {INSTALL}")
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS, timeout=60_000)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def world(model, tok, script):
    """A server in the World chat format that wants the API key KEY."""
    live = LiveServer(create_app(Scheduler(Engine(model, tok)), tok, model_name="tiny", api_key=KEY))
    yield live
    live.close()


@pytest.fixture(scope="module")
def g1(model, tok, script):
    live = LiveServer(create_app(Scheduler(Engine(model, tok)), tok, model_name="tiny-g1", chat_format="g1"))
    yield live
    live.close()


@pytest.fixture
def page(browser):
    """A fresh browser profile (empty localStorage) with a page that records the chat requests it sends. The test
    fails on any script error or console error (a Content-Security-Policy violation is one), except the console's
    note of each failed request, which some tests cause on purpose."""
    context = browser.new_context()
    context.set_default_timeout(20_000)
    page = context.new_page()
    page.chat_requests, errors = [], []
    page.on("request", lambda r: page.chat_requests.append(r) if r.url.endswith("/v1/chat/completions") else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error"
            and not m.text.startswith("Failed to load resource: ") else None)
    yield page
    context.close()
    assert errors == []


def expect(locator):
    from playwright.sync_api import expect

    return expect(locator)


def set_field(page, selector: str, value: str) -> None:
    page.fill(selector, value)
    page.dispatch_event(selector, "change")


def open_page(page, server, key: str | None = KEY) -> None:
    page.goto(server.url + "/")
    if key is not None:
        set_field(page, "#api-key", key)
    expect(page.locator("#model")).to_have_value(re.compile("tiny"))


def ask(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def last_body(page) -> dict:
    return json.loads(page.chat_requests[-1].post_data)


def test_a_streamed_reply_is_kept_across_a_reload(world, script, page):
    open_page(page, world)
    script.say([" Hello", " there", "."])
    ask(page, "Hi")
    expect(page.locator(".message.assistant .content")).to_have_text("Hello there.")
    expect(page.locator("#stop")).to_be_disabled()
    body = last_body(page)
    assert body["stream"] is True and body["model"] == "tiny"
    assert body["messages"] == [{"role": "user", "content": "Hi"}]
    assert page.locator("#input").input_value() == ""

    page.reload()
    expect(page.locator(".message .content")).to_have_text(["Hi", "Hello there."])
    expect(page.locator("#conversations .open")).to_have_text(["Hi"])
    script.say([" Sure", "."])
    ask(page, "More?")  # the next turn sends the conversation so far
    expect(page.locator(".message.assistant .content")).to_have_text(["Hello there.", "Sure."])
    assert last_body(page)["messages"] == [{"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "Hello there."},
                                           {"role": "user", "content": "More?"}]

    page.click("#new-chat")
    expect(page.locator(".message")).to_have_count(0)
    ask(page, "Other")
    expect(page.locator(".message.assistant .content")).to_have_text(["Sure."])
    expect(page.locator("#conversations .open")).to_have_text(["Other", "Hi"])
    page.click("#conversations li:nth-child(2) .delete")
    page.reload()
    expect(page.locator("#conversations .open")).to_have_text(["Other"])
    expect(page.locator(".message .content")).to_have_text(["Other", "Sure."])


def test_the_settings_and_the_key_are_sent(world, script, page):
    open_page(page, world)
    set_field(page, "#system", "Be brief.")
    set_field(page, "#temperature", "0.3")
    set_field(page, "#top_p", "0.5")
    set_field(page, "#max_tokens", "7")
    page.uncheck("#thinking")
    script.say([" Ok", "."])
    ask(page, "Hi")
    expect(page.locator(".message.assistant .content")).to_have_text("Ok.")
    request = page.chat_requests[-1]
    assert request.headers["authorization"] == f"Bearer {KEY}"
    body = json.loads(request.post_data)
    assert {k: body[k] for k in ("temperature", "top_p", "max_tokens", "reasoning_effort")} == \
        {"temperature": 0.3, "top_p": 0.5, "max_tokens": 7, "reasoning_effort": "none"}
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}

    page.reload()  # the settings and the key are kept as well
    values = [page.locator(s).input_value() for s in ("#system", "#temperature", "#top_p", "#max_tokens", "#api-key")]
    assert values == ["Be brief.", "0.3", "0.5", "7", KEY]
    assert not page.locator("#thinking").is_checked()


def test_an_http_error_shows_the_servers_message(world, script, page):
    page.goto(world.url + "/")
    error = page.locator("#error")
    expect(error).to_contain_text("HTTP 401: Incorrect or missing API key")  # from /v1/models
    set_field(page, "#api-key", "wrong")
    ask(page, "Hi")
    expect(error).to_contain_text("HTTP 401: Incorrect or missing API key")
    expect(page.locator("#input")).to_have_value("Hi")  # nothing came back: the text is there to send again
    expect(page.locator(".message")).to_have_count(0)
    set_field(page, "#api-key", KEY)
    expect(error).to_be_hidden()
    script.say([" Welcome", "."])
    page.press("#input", "Enter")
    expect(page.locator(".message.assistant .content")).to_have_text("Welcome.")
    set_field(page, "#max_tokens", "100000")  # over the server's limit: its 400 says so
    ask(page, "Long")
    expect(error).to_contain_text("HTTP 400: max_tokens is 100000; this server allows at most 2048")
    page.route("**/v1/chat/completions", lambda route: route.abort())  # the server is gone
    ask(page, "Anyone?")
    expect(error).to_have_text("Could not reach the server (Failed to fetch).")
    expect(page.locator("#input")).to_have_value("Anyone?")
    expect(page.locator(".message")).to_have_count(2)  # the first exchange; the failed ones are not kept


def test_stop_keeps_the_partial_answer(world, script, page):
    open_page(page, world)
    script.say([" word"] * 1000, delay=0.02)  # 20 s or more: Stop comes long before the end
    set_field(page, "#max_tokens", "2000")
    ask(page, "Talk")
    content = page.locator(".message.assistant .content")
    expect(content).to_contain_text("word word")  # streamed: part of the answer is on the page
    expect(page.locator("#send")).to_be_disabled()
    page.click("#stop")
    expect(page.locator(".message.assistant .note")).to_have_text("stopped")
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#send")).to_be_enabled()
    deadline = time.time() + 10  # the server saw the connection close and freed the request's batch row
    while httpx.get(world.url + "/health").json()["batch_size"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(world.url + "/health").json()["batch_size"] == 0
    partial = content.text_content()
    assert 2 <= partial.count("word") < 1000
    page.reload()
    expect(page.locator(".message.assistant .content")).to_have_text(partial)
    expect(page.locator(".message.assistant .note")).to_have_text("stopped")


def test_g1_reasoning_is_folded_above_the_answer(g1, script, page):
    open_page(page, g1, key=None)
    script.say([">", "\nAdd", " them", ":", " 2 + 3", " = 5.", "\n</", "think", ">\n", "The", " sum", " is 5.",
                "\n\n"])
    ask(page, "Sum 2 and 3.")
    reply = page.locator(".message.assistant")
    expect(reply.locator(".content")).to_have_text("The sum is 5.")
    reasoning = reply.locator("details.reasoning")
    expect(reasoning.locator("summary")).to_have_text("Reasoning")
    assert reasoning.evaluate("el => !el.open && el.nextElementSibling.className === 'content'")
    expect(reasoning.locator(".reasoning-text")).to_be_hidden()  # folded
    reasoning.locator("summary").click()
    expect(reasoning.locator(".reasoning-text")).to_have_text("Add them: 2 + 3 = 5.")
    assert "reasoning_effort" not in last_body(page)

    script.say([">", "\nAgain", ".", "\n</", "think", ">\n", "Five", ".", "\n\n"])
    ask(page, "Again?")  # the reasoning goes back with the history: the prompt is what the model wrote
    expect(reply.locator(".content")).to_have_text(["The sum is 5.", "Five."])
    assert last_body(page)["messages"][1] == {"role": "assistant", "content": "The sum is 5.",
                                              "reasoning_content": "Add them: 2 + 3 = 5."}
