"""`aviary serve` against hostile or broken clients (issue 14, from docs' reliability probe): half-sent requests
are closed at their deadline while real requests are served; the connection cap bounds file descriptors; a slow
body gets 408 and a client gone mid-upload is a 499, not a 500; asyncio's accept-error flood is throttled; a lone
surrogate is a 400 naming the field; one API key's cached prefixes are invisible to another key; bad options
(an empty key, a port out of range) fail in one line before the model loads."""

import asyncio
import json
import logging
import os
import select
import socket
import subprocess
import sys
import time

import httpx
import pytest

import aviary
from aviary.cli import main
from aviary.generation import Engine, StateCache
from aviary.loading import model_from_state_dict
from aviary.serve import connections
from aviary.serve.app import Limits, create_app
from aviary.serve.protocol import error_body
from aviary.serve.scheduler import Scheduler
from aviary.testing import random_config, random_state_dict, save_random_checkpoint
from live import LiveServer

pytest.importorskip("uvicorn")

MODEL = "tiny-v7"
KEYS = ["key-a", "key-b"]
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}


@pytest.fixture(scope="module")
def model():
    return model_from_state_dict(random_state_dict(random_config(7, n_layer=2, n_embd=64, head_size=32,
                                                                 vocab_size=65536), seed=5))


@pytest.fixture(scope="module")
def tokenizer():
    return aviary.load_tokenizer(version=7)


class ServedModel(LiveServer):
    """The test model behind `create_app` with these limits and keys, live on loopback."""

    def __init__(self, model, tokenizer, limits: Limits, api_key=KEYS):
        self.scheduler = Scheduler(Engine(model, tokenizer, cache=StateCache()), max_batch=8)
        app = create_app(self.scheduler, tokenizer, model_name=MODEL, limits=limits, api_key=api_key)
        super().__init__(app, limits, metrics=self.scheduler.metrics)

    def closed(self, reason: str) -> float:
        return self.scheduler.metrics.value("connections_closed_total", reason=reason)


@pytest.fixture
def serve(model, tokenizer):
    servers = []

    def start(limits: Limits | None = None, **kwargs) -> ServedModel:
        servers.append(ServedModel(model, tokenizer, limits or Limits(), **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def half_open(port: int, data: bytes = b"GET /health HTTP/1.1\r\nHost: x\r\n") -> socket.socket:
    """A connection that sends part of a request and then waits (the probe's slowloris)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(data)
    return s


def read_to_close(s: socket.socket, timeout: float = 5.0) -> bytes | None:
    """Everything the server sends until it closes the connection; None if it was reset. (A server that closes
    a socket with bytes from the client still unread sends a reset, and the client may then lose the answer.)"""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        return None
    return data


def count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---- finding 1: slowloris ---------------------------------------------------------------------------------


def test_half_sent_requests_are_closed_at_the_deadline_while_real_requests_are_served(serve):
    header_timeout = 1.5
    live = serve(Limits(header_timeout_s=header_timeout))
    opened, stalled = time.monotonic(), [half_open(live.port) for _ in range(65)]
    dripping = [half_open(live.port, b"G") for _ in range(10)]  # a byte now and then: no idle time to time out
    silent = [half_open(live.port, b"") for _ in range(5)]  # connected, and not a byte sent
    # during the attack, real clients are served at once, with and without a key
    with httpx.Client(base_url=live.url, timeout=5) as client:
        for _ in range(5):
            assert client.get("/health").status_code == 200
        r = client.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert live.open_connections >= 80  # the attack is still on
    # every stalled or dripping socket is answered 408 and closed at the deadline, not before, not much after
    pending, closed_at = {s.fileno(): s for s in stalled + dripping + silent}, {}
    while pending and time.monotonic() < opened + header_timeout + 3:
        for s in dripping:
            if s.fileno() in pending:
                try:
                    s.send(b"E")
                except (ConnectionResetError, BrokenPipeError):  # the server closed it since the last select
                    closed_at[s.fileno()] = time.monotonic() - opened
                    del pending[s.fileno()]
        ready, _, _ = select.select(list(pending.values()), [], [], 0.25)
        for s in ready:
            answer = read_to_close(s)
            if s in stalled:
                assert answer.startswith(b"HTTP/1.1 408 ")
            elif s in silent:
                assert answer == b""  # nothing asked, nothing answered
            else:  # a dripping client sends on after the close, so it may get a reset instead of the 408
                assert answer is None or answer.startswith(b"HTTP/1.1 408 ")
            closed_at[s.fileno()] = time.monotonic() - opened
            del pending[s.fileno()]
    assert not pending, f"{len(pending)} half-sent requests still open after {header_timeout + 3} s"
    assert header_timeout - 0.2 < min(closed_at.values()) and max(closed_at.values()) < header_timeout + 2.5
    assert live.closed("header_timeout") == 75 and live.closed("idle") == 5
    deadline = time.monotonic() + 5
    while live.open_connections:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for s in stalled + dripping + silent:
        s.close()


def test_the_connection_cap_bounds_descriptors_and_replaces_stalled_connections(serve):
    cap = 16
    live = serve(Limits(max_connections=cap, header_timeout_s=60))  # the cap, not the deadline, at work here
    before = count_fds()
    attack = []
    for _ in range(100):
        attack.append(half_open(live.port))
        assert live.open_connections <= cap
    time.sleep(0.3)
    assert count_fds() - before - len(attack) <= cap + 2  # the server's side: at most the cap
    # a real client still gets in: it replaces the connection that has waited longest for a request
    assert httpx.get(live.url + "/health", timeout=5).status_code == 200
    answers = []
    for s in attack:
        ready, _, _ = select.select([s], [], [], 0)
        if ready:
            answers.append(read_to_close(s))
    assert len(answers) >= 100 - cap  # closed by the server, with a 503 (or reset: replaced before it was read)
    answered = [a for a in answers if a]
    assert answered and all(a.startswith(b"HTTP/1.1 503 ") for a in answered)
    assert json.loads(answered[0].partition(b"\r\n\r\n")[2])["error"]["code"] == "too_many_connections"
    assert live.closed("replaced") >= 100 - cap
    for s in attack:
        s.close()


def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503(serve):
    live = serve(Limits(max_connections=2, body_timeout_s=60))
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\nContent-Length: 50\r\n\r\n"
    busy = [half_open(live.port, head.encode() + b"{") for _ in range(2)]  # requests in progress: never replaced
    time.sleep(0.2)
    answer = read_to_close(socket.create_connection(("127.0.0.1", live.port), timeout=5))
    assert answer.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in answer
    assert live.closed("refused") == 1 and live.closed("replaced") == 0
    for s in busy:
        s.close()


def test_a_slow_body_gets_408(serve):
    live = serve(Limits(body_timeout_s=1))
    t0 = time.monotonic()
    s = half_open(live.port, f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\n"
                             "Content-Length: 100\r\n\r\n{".encode())
    answer = read_to_close(s)
    assert 0.9 < time.monotonic() - t0 < 3
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    assert live.scheduler.metrics.value("http_responses_total", route="completions", code="408") == 1


def test_a_body_the_app_never_reads_is_cut_off(serve, monkeypatch):
    monkeypatch.setattr(connections, "BODY_GRACE_S", 0.5)
    live = serve(Limits(body_timeout_s=1))
    t0 = time.monotonic()
    s = half_open(live.port, b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    answer = read_to_close(s)  # /health answers without reading the body; the connection then waits for it
    assert answer.startswith(b"HTTP/1.1 200 ") and 1.3 < time.monotonic() - t0 < 3.5
    assert live.closed("body_timeout") == 1


@pytest.mark.slow  # a fresh interpreter imports torch and loads a model: several seconds
def test_the_probes_slowloris_under_a_low_open_file_limit(tmp_path):
    """The report's reproduction, on the real command line: `ulimit -n 256`, 300 half-sent requests."""
    import resource

    checkpoint = tmp_path / f"{MODEL}.safetensors"
    save_random_checkpoint(checkpoint, random_config(7, n_layer=2, n_embd=64, head_size=32, vocab_size=65536))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "serve.log").open("w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "aviary", "serve", str(checkpoint), "--port", str(port), "--api-key", "k",
         "--threads", "1", "--header-timeout", "2"], stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    attack = []
    try:
        deadline = time.time() + 60
        while True:
            assert server.poll() is None and time.time() < deadline, "aviary serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        attack = [half_open(port) for _ in range(300)]
        time.sleep(0.5)
        t0 = time.monotonic()
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 2
        answers = [read_to_close(s, timeout=10) for s in attack]  # every one closed: replaced, or timed out
        answered = [a for a in answers if a]  # the others were reset (replaced before their bytes were read)
        assert answered and all(a.startswith((b"HTTP/1.1 503 ", b"HTTP/1.1 408 ")) for a in answered)
    finally:
        for s in attack:
            s.close()
        server.terminate()
        server.wait(30)
    log.seek(0)
    text = log.read()
    assert f"serving at most {256 - connections.OTHER_FILES} connections" in text  # fitted to the open-file limit
    # no flood: at most a line about running out of descriptors (a burst may touch the limit for a moment)
    assert text.count("Too many open files") <= 1 and "Traceback" not in text and len(text) < 5000


def test_accept_errors_are_reported_once_a_minute(caplog):
    loop = asyncio.new_event_loop()
    try:
        connections._throttle_accept_errors(loop)
        context = {"message": "socket.accept() out of system resource",
                   "exception": OSError(24, "Too many open files")}
        with caplog.at_level(logging.ERROR):
            for _ in range(10_000):
                loop.call_exception_handler(context)
            loop.call_exception_handler({"message": "something else"})  # other errors: asyncio's own report
    finally:
        loop.close()
    accept = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
    assert len(accept) == 1 and "Too many open files" in accept[0].getMessage()
    assert any(r.name == "asyncio" and "something else" in r.getMessage() for r in caplog.records)


def test_the_open_file_limit_is_raised_and_the_cap_fits_under_it(monkeypatch):
    import resource

    calls = []
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    monkeypatch.setattr(resource, "getrlimit", lambda which: (256, 4096))
    assert connections.fit_open_file_limit(512) == (512, 4096) and calls == [(4096, 4096)]
    monkeypatch.setattr(resource, "getrlimit", lambda which: (256, 256))  # the hard limit: fewer connections fit
    assert connections.fit_open_file_limit(512) == (256 - connections.OTHER_FILES, 256)


# ---- finding 11: a client gone while uploading --------------------------------------------------------


def test_a_disconnect_during_upload_is_a_499_not_a_500(serve, caplog):
    live = serve()
    metrics = live.scheduler.metrics
    s = half_open(live.port, f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\n"
                             "Content-Length: 100\r\n\r\n{".encode())
    time.sleep(0.3)
    s.close()
    deadline = time.monotonic() + 5
    while not metrics.value("http_responses_total", route="completions", code="499"):
        assert time.monotonic() < deadline, "the disconnect was not counted"
        time.sleep(0.02)
    assert "code=\"500\"" not in metrics.render()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---- finding 5: text that is not Unicode -------------------------------------------------------------------


def test_error_messages_quoting_client_text_are_always_json():
    body = error_body("The model '\ud800' does not exist.", param="\udfff")
    assert json.loads(json.dumps(body, ensure_ascii=False).encode("utf-8"))["error"]["message"]


def test_a_lone_surrogate_is_a_400_with_the_20b_tokenizer_too():
    """The 20B tokenizer raises TypeError on a lone surrogate (World: UnicodeEncodeError); neither sees one."""
    tokenizer = aviary.load_tokenizer("20b")
    model = model_from_state_dict(random_state_dict(random_config(7, n_layer=1, n_embd=64, head_size=32,
                                                                  vocab_size=50304)))
    app = create_app(Scheduler(Engine(model, tokenizer)), tokenizer, model_name=MODEL)

    async def post(body: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
            return await client.post("/v1/chat/completions", content=body)

    r = asyncio.run(post('{"model": "tiny-v7", "messages": [{"role": "user", "content": "a\\ud800"}]}'))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"


# ---- finding 6: the prefix cache, per API key --------------------------------------------------------------


def test_one_key_never_learns_another_keys_prefixes(serve, tokenizer):
    live = serve()
    victim = "Patient 4471 was diagnosed with hepatitis C"
    n = len(tokenizer.encode(victim))

    def cached(key: str, prompt: str) -> int:
        r = httpx.post(live.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                       json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(KEYS[0], victim) == 0
    assert cached(KEYS[1], victim + " and then") == 0  # another key: the guess tells it nothing
    assert cached(KEYS[1], victim) == 0
    assert cached(KEYS[0], victim + " and then") == n  # the victim's own key still reuses its prefix


# ---- findings 7 and 10: options that fail in one line, before the model loads ------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a model fails the test: options must be refused before that."""
    from aviary.commands import serve

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(serve, "load_model", load_model)
    monkeypatch.delenv("AVIARY_API_KEY", raising=False)


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("argv, message", [
    (["--api-key", ""], "--api-key is empty"),
    (["--api-key", "  "], "--api-key is empty"),
    (["--api-key", "ok", "--api-key", ""], "--api-key is empty"),
    (["--api-key", "clé"], "printable ASCII"),
    (["--port", "70000"], "not a TCP port"),
    (["--port", "-1"], "not a TCP port"),
    (["--host", ""], "--host is empty"),
    (["--host", "192.0.2.1"], "cannot listen on 192.0.2.1"),  # TEST-NET-1: not an address of this machine
    (["--host", "no-such-host.invalid"], "not an address of this machine"),
    (["--header-timeout", "0"], "--header-timeout"),
    (["--body-timeout", "inf"], "--body-timeout"),
    (["--max-connections", "0"], "--max-connections"),
])
def test_bad_options_fail_in_one_line_before_the_model_loads(no_model_load, capsys, argv, message):
    assert main(["serve", "--port", "0", *argv]) == 2  # port 0 (any free one) unless the case gives one
    err = capsys.readouterr().err
    assert err.startswith("aviary serve: error: ") and message in err and err.count("\n") == 1


def test_empty_keys_from_the_environment_or_a_file_are_refused(no_model_load, capsys, monkeypatch, tmp_path,
                                                               busy_port):
    monkeypatch.setenv("AVIARY_API_KEY", "")
    assert main(["serve", "--port", "0"]) == 2 and "AVIARY_API_KEY is empty" in capsys.readouterr().err
    monkeypatch.delenv("AVIARY_API_KEY")
    (tmp_path / "keys.txt").write_text("# no keys yet\n\n")
    assert main(["serve", "--port", "0", "--api-key-file", str(tmp_path / "keys.txt")]) == 2
    assert "has no keys" in capsys.readouterr().err
    assert main(["serve", "--port", str(busy_port)]) == 2
    assert f"cannot listen on 127.0.0.1 port {busy_port}" in capsys.readouterr().err


def test_keys_come_from_options_a_file_or_the_environment(monkeypatch, tmp_path):
    from aviary.cli import build_parser
    from aviary.commands.serve import api_keys

    (tmp_path / "keys.txt").write_text("# clients\nkey-c\n\n  key-a  \n")
    monkeypatch.setenv("AVIARY_API_KEY", "from-env")
    args = build_parser().parse_args(["serve", "--api-key", "key-a", "--api-key", "key-b",
                                      "--api-key-file", str(tmp_path / "keys.txt")])
    assert api_keys(args) == ["key-a", "key-b", "key-c"]  # the environment only when no option gives a key
    assert api_keys(build_parser().parse_args(["serve"])) == ["from-env"]
    monkeypatch.delenv("AVIARY_API_KEY")
    assert api_keys(build_parser().parse_args(["serve"])) == []
