"""`aviary serve` on loopback, driven by the real `openai` client (and httpx for raw bad requests): greedy
output over the API == `aviary generate`; streaming == non-streaming; 32 concurrent streams == 32 sequential
requests; the prefix cache serves shared system prompts and earlier turns; disconnects and client timeouts
free their batch rows; every bad input gets OpenAI error JSON with a 4xx, and the server keeps serving."""

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import textwrap
import time

import httpx
import openai
import pytest
import torch

import aviary
from aviary.cli import build_parser
from aviary.generation import Engine, SamplingParams, StateCache
from aviary.serve.app import Limits, create_app
from aviary.serve.chat_format import ChatMessage, prompt_tokens
from aviary.serve.scheduler import Scheduler
from live import LiveServer

uvicorn = pytest.importorskip("uvicorn")

KEY = "test-key"
MODEL = "tiny-v7"  # the served model id: the stem of the `checkpoint` fixture's file (tests/conftest.py)


@pytest.fixture(scope="module")
def served(checkpoint):
    """The server exactly as `aviary serve` builds it from its command line."""
    from aviary.commands.serve import build

    threads = torch.get_num_threads()  # --threads sets the process-wide count: restore it afterwards
    args = build_parser().parse_args(["serve", str(checkpoint), "--api-key", KEY, "--threads", "1", "--max-batch", "64",
                                      "--max-queue", "64", "--max-prompt-tokens", "300", "--max-tokens", "4000",
                                      "--max-request-bytes", "20000"])
    app, scheduler = build(args)
    live = LiveServer(app)
    live.scheduler = scheduler
    yield live
    live.close()
    torch.set_num_threads(threads)


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def wait_idle(scheduler, timeout=20.0):
    deadline = time.time() + timeout
    while scheduler.batch_size or scheduler.active_requests or scheduler.queue_depth:
        assert time.time() < deadline, "the scheduler did not free the batch"
        time.sleep(0.02)


# ---- the happy paths ----------------------------------------------------------------------------------------


def test_models_health_metrics(served, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    health = httpx.get(served.url + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["model"] == MODEL
    metrics = httpx.get(served.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert metrics.status_code == 200
    for name in ("aviary_requests_total", "aviary_completion_tokens_total", "aviary_queue_depth",
                 "aviary_batch_size", "aviary_time_to_first_token_seconds_bucket", "aviary_request_seconds_count"):
        assert name in metrics.text


def test_greedy_completion_equals_aviary_generate(served, client, checkpoint, capsys):
    from aviary.commands import generate as generate_command

    prompt = "The Eiffel tower is in the city of"
    parser = argparse.ArgumentParser()
    generate_command.add_arguments(parser)
    assert generate_command.run(parser.parse_args([str(checkpoint), prompt, "--temperature", "0", "-n", "12"])) == 0
    expected = capsys.readouterr().out[:-1]  # generate ends with a newline
    # aviary generate's defaults are the reference pipeline's: penalties 0.2 decaying by 0.996, top-p 0.85
    settings = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, top_p=0.85, presence_penalty=0.2,
                    frequency_penalty=0.2, extra_body={"penalty_decay": 0.996})
    done = client.completions.create(**settings)
    assert done.choices[0].text == expected
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 12
    assert done.usage.prompt_tokens == len(aviary.load_tokenizer(version=7).encode(prompt))
    streamed = list(client.completions.create(**settings, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "length"


def test_chat_streaming_equals_non_streaming(served, client):
    messages = [{"role": "system", "content": "You are a bird."}, {"role": "user", "content": "Sing!"}]
    settings = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    reply = client.chat.completions.create(**settings)
    text = reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant" and text and not text[0].isspace()
    tokens, _ = prompt_tokens([ChatMessage(**m) for m in messages], aviary.load_tokenizer(version=7))
    assert reply.usage.prompt_tokens == len(tokens)
    chunks = list(client.chat.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_chat_reuses_cached_system_prompt_and_history(served, client, checkpoint):
    tok = aviary.load_tokenizer(version=7)
    system = {"role": "system", "content": "You are Aviary's test assistant. " * 8}
    first = [system, {"role": "user", "content": "What is RWKV?"}]
    a = client.chat.completions.create(model=MODEL, messages=first, max_tokens=6, temperature=0)
    # another user, same system prompt: starts from the state after it
    other = [system, {"role": "user", "content": "Something else entirely."}]
    b = client.chat.completions.create(model=MODEL, messages=other, max_tokens=6, temperature=0)
    n_system = len(tok.encode(f"System: {system['content'].strip()}\n\n"))
    assert b.usage.prompt_tokens_details.cached_tokens >= n_system
    # the next turn of the first conversation: starts from the state after the whole first prompt
    second = [*first, {"role": "assistant", "content": a.choices[0].message.content},
              {"role": "user", "content": "Tell me more."}]
    c = client.chat.completions.create(model=MODEL, messages=second, max_tokens=6, temperature=0)
    assert c.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens
    # and the cached start gives the same reply as computing everything afresh
    tokens, _ = prompt_tokens([ChatMessage(m["role"], m["content"]) for m in second], tok)
    engine = Engine(served.scheduler.engine.model, tok)  # no cache
    seq = engine.add(tokens, SamplingParams(temperature=0, max_new_tokens=6, stop=("\n\n",)))
    while engine.has_work:
        engine.step()
    assert c.choices[0].message.content == seq.text.lstrip()


def test_32_concurrent_streams_equal_32_sequential(served):
    prompts = [f"Request number {i} says" for i in range(32)]

    async def one(client, prompt):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def run(concurrent: bool):
        async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0) as client:
            if concurrent:
                return await asyncio.gather(*(one(client, p) for p in prompts))
            return [await one(client, p) for p in prompts]

    metrics = served.scheduler.metrics
    sequential = asyncio.run(run(False))
    steps_before = metrics.value("steps_total")
    concurrent = asyncio.run(run(True))
    assert concurrent == sequential
    assert len(set(sequential)) > 1
    # batched: far fewer decode steps than 32 requests x 16 tokens
    assert metrics.value("steps_total") - steps_before < 32 * 16 / 4


def test_n_choices_seed_and_stop(client):
    settings = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, n=3, seed=7, temperature=1.0)
    a = client.completions.create(**settings)
    b = client.completions.create(**settings)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: repeatable
    assert len({c.text for c in a.choices}) > 1  # choice j samples with seed + j
    assert a.usage.completion_tokens == 24
    # a stop string: the text ends just before it
    full = client.completions.create(model=MODEL, prompt="Stop here:", max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.completions.create(model=MODEL, prompt="Stop here:", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    zero = client.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=0)
    assert [c.text for c in zero.choices] == ["", ""] and zero.usage.completion_tokens == 0


# ---- clients that go away -----------------------------------------------------------------------------------


def test_disconnect_mid_stream_cancels(served):
    metrics = served.scheduler.metrics
    before = metrics.value("requests_total", status="cancelled")
    body = {"model": MODEL, "prompt": "A long story:", "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    wait_idle(served.scheduler)
    assert metrics.value("requests_total", status="cancelled") == before + 1


def test_client_timeout_cancels(served, client):
    metrics = served.scheduler.metrics
    before = metrics.value("requests_total", status="cancelled")
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).completions.create(model=MODEL, prompt="Go on:", max_tokens=4000,
                                                            temperature=0)
    wait_idle(served.scheduler)
    assert metrics.value("requests_total", status="cancelled") == before + 1
    assert client.completions.create(model=MODEL, prompt="still there?", max_tokens=2).choices[0].text


def test_full_queue_gets_429_with_retry_after(served):
    """One row and one queue place: a running request and a waiting one fill the server."""
    engine = served.scheduler.engine
    scheduler = Scheduler(Engine(engine.model, engine.tokenizer), max_batch=1, max_queue=1)
    live = LiveServer(create_app(scheduler, engine.tokenizer, model_name=MODEL))
    try:
        body = {"model": MODEL, "prompt": "Busy", "max_tokens": 2000, "temperature": 0, "stream": True}
        with contextlib.ExitStack() as streams:
            streams.enter_context(httpx.stream("POST", live.url + "/v1/completions", json=body))
            while scheduler.batch_size < 1:
                time.sleep(0.01)
            streams.enter_context(httpx.stream("POST", live.url + "/v1/completions", json=body))
            while scheduler.queue_depth < 1:
                time.sleep(0.01)
            r = httpx.post(live.url + "/v1/completions", json={**body, "stream": False})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0).completions.create(
                    model=MODEL, prompt="x", max_tokens=1)
        wait_idle(scheduler)  # both streams were closed: cancelled, queue and batch empty again
    finally:
        live.close()


# ---- bad input ----------------------------------------------------------------------------------------------

COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

BAD = [  # (route, body, status, param or None)
    ("completions", "{not json", 400, None),
    ("completions", "[1, 2]", 400, None),
    ("completions", "\xff\xfe", 400, None),
    ("completions", "[" * 5000 + "]" * 5000, 400, None),
    ("completions", '{"model": "tiny-v7", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("completions", {**COMPLETION, "bogus": 1}, 400, "bogus"),
    ("completions", {"prompt": "hi"}, 400, "model"),
    ("completions", {"model": MODEL}, 400, "prompt"),
    ("completions", {**COMPLETION, "max_tokens": "2"}, 400, "max_tokens"),
    ("completions", {**COMPLETION, "n": True}, 400, "n"),
    ("completions", {**COMPLETION, "temperature": "hot"}, 400, "temperature"),
    ("completions", {**COMPLETION, "prompt": 5}, 400, "prompt"),
    ("completions", {**COMPLETION, "stream": "yes"}, 400, "stream"),
    ("completions", {**COMPLETION, "temperature": 2.5}, 400, "temperature"),
    ("completions", {**COMPLETION, "top_p": 0}, 400, "top_p"),
    ("completions", {**COMPLETION, "n": 0}, 400, "n"),
    ("completions", {**COMPLETION, "n": 100}, 400, "n"),  # more rows than --max-batch
    ("completions", {**COMPLETION, "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {**COMPLETION, "max_tokens": 5000}, 400, "max_tokens"),
    ("completions", {**COMPLETION, "presence_penalty": 3}, 400, "presence_penalty"),
    ("completions", {**COMPLETION, "frequency_penalty": -2.5}, 400, "frequency_penalty"),
    ("completions", {**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("completions", {**COMPLETION, "stop": [""]}, 400, "stop.0"),
    ("completions", {**COMPLETION, "seed": 1.5}, 400, "seed"),
    ("completions", {**COMPLETION, "prompt": ""}, 400, "prompt"),
    ("completions", {**COMPLETION, "prompt": []}, 400, "prompt"),
    ("completions", {**COMPLETION, "prompt": [70000]}, 400, "prompt"),
    ("completions", {**COMPLETION, "prompt": "word " * 400}, 400, "prompt"),  # over --max-prompt-tokens
    ("completions", {**COMPLETION, "echo": True}, 400, "echo"),
    ("completions", {**COMPLETION, "logprobs": 3}, 400, "logprobs"),
    ("completions", {**COMPLETION, "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("completions", {**COMPLETION, "model": "gpt-4"}, 404, "model"),
    # an integer Python will not convert (over 4,300 digits), and JSON escapes that decode to lone surrogates
    ("completions", '{"model": "tiny-v7", "prompt": "a", "seed": ' + "9" * 5000 + "}", 400, None),
    ("completions", '{"model": "tiny-v7", "prompt": "a\\ud800b"}', 400, "prompt"),
    ("completions", '{"model": "tiny-v7", "prompt": ["ok", "\\udfff"]}', 400, "prompt.1"),
    ("completions", '{"model": "\\ud800", "prompt": "a"}', 400, "model"),
    ("completions", '{"model": "tiny-v7", "prompt": "a", "stop": ["\\ud800"]}', 400, "stop.0"),
    ("completions", '{"model": "tiny-v7", "prompt": "a", "\\ud800": 1}', 400, None),
    ("chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "text": "hi"}]}, 400, "messages.0.text"),
    ("chat/completions", {**CHAT, "max_completion_tokens": 2}, 400, "max_tokens"),
    ("chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools.0.function"),
    ("chat/completions", {**CHAT, "response_format": {"type": "xml"}}, 400, "response_format.type"),
    ("chat/completions", {**CHAT, "stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage"),
    ("chat/completions", '{"model": "tiny-v7", "messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "messages.0.content"),
    ("chat/completions", '{"model": "tiny-v7", "messages": [{"role": "user", "content": [{"type": "text", '
                         '"text": "a\\ud800"}]}]}', 400, "messages.0.content.0.text"),
]


@pytest.mark.parametrize("route, body, status, param", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(served, route, body, status, param):
    content = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{served.url}/v1/{route}", content=content,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


@pytest.mark.parametrize("method, path, headers, content, status", [
    ("POST", "/v1/completions", {}, json.dumps(COMPLETION), 401),
    ("POST", "/v1/completions", {"Authorization": "Bearer wrong"}, json.dumps(COMPLETION), 401),
    ("GET", "/v1/models", {"Authorization": "Basic " + KEY}, None, 401),
    ("GET", "/metrics", {}, None, 401),
    ("POST", "/v1/completions", {"Authorization": f"Bearer {KEY}"}, b"{" + b" " * 30000 + b"}", 413),
    ("GET", "/v1/nothing", {"Authorization": f"Bearer {KEY}"}, None, 404),
    ("GET", "/v1/completions", {"Authorization": f"Bearer {KEY}"}, None, 405),
    ("GET", "/v1/models/gpt-4", {"Authorization": f"Bearer {KEY}"}, None, 404),
])
def test_auth_size_and_routes(served, method, path, headers, content, status):
    r = httpx.request(method, served.url + path, headers=headers, content=content)
    assert r.status_code == status
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_openai_client_sees_errors_and_server_survives(served, client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", temperature=9)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert client.completions.create(model=MODEL, prompt="fine", max_tokens=3).usage.completion_tokens == 3
    text = httpx.get(served.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'code="500"' not in text and 'status="failed"' not in text


def test_request_fields_map_to_the_sampling_settings():
    """The server maps every SamplingParams setting marked `api` from the request field of that name; a field
    left out keeps SamplingParams' default, which is OpenAI's (no truncation, no penalties: docs/serving.md)."""
    from types import SimpleNamespace

    from aviary.generation.params import SETTINGS
    from aviary.serve.app import _Api
    from aviary.serve.metrics import Metrics
    from aviary.serve.protocol import ChatRequest, CompletionRequest, _Sampling

    api_fields = {s.name for s in SETTINGS if s.api}
    not_sampling = {"model", "n", "stream", "stream_options", "stop", "user", "logit_bias"}
    assert set(_Sampling.model_fields) == api_fields | not_sampling
    api = _Api(SimpleNamespace(engine=SimpleNamespace(vocab_size=300), metrics=Metrics()), None, MODEL, Limits(), [])
    assert api.sampling(CompletionRequest(model=MODEL, prompt="x"), 16) == SamplingParams(max_new_tokens=16)
    given = dict(temperature=0.5, top_p=0.85, top_k=3, min_p=0.1, presence_penalty=0.2, frequency_penalty=-0.2,
                 penalty_decay=0.996, seed=7)
    assert set(given) == api_fields
    params = api.sampling(ChatRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}], stop="END",
                                      **given), None, ("\n\n",))
    assert params == SamplingParams(max_new_tokens=Limits().max_tokens, stop=("\n\n", "END"), **given)


def test_serving_is_not_imported_by_aviary():
    code = ("import sys, aviary, aviary.serve, aviary.commands.serve; "
            "assert not {'starlette', 'uvicorn', 'fastapi', 'openai'} & set(sys.modules), sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_limits_default_to_loopback():
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.max_batch >= 1 and args.max_queue >= 1
    assert Limits().max_request_bytes > 0


def test_state_cache_is_bounded(served):
    cache = served.scheduler.engine.cache
    assert isinstance(cache, StateCache) and cache.nbytes <= cache.max_bytes


def test_settling_for_serving_freezes_what_is_loaded():
    """`settle_for_serving` (called by `aviary serve` and each Ray replica once the model is loaded) leaves the
    garbage collector nothing of what was loaded to walk, and a cycle made afterwards is still collected. In a
    fresh interpreter: it changes the whole process."""
    code = textwrap.dedent("""
        import gc, weakref
        import torch  # noqa: F401 - something big to freeze
        from aviary.commands.serve import settle_for_serving
        settle_for_serving()
        assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()
        assert len(gc.get_objects()) < 1_000, len(gc.get_objects())
        class Node: pass
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow  # a fresh interpreter imports torch: a few seconds
def test_aviary_serve_command_runs_and_stops(checkpoint, tmp_path):
    """The real command line: starts, answers, and exits cleanly on SIGINT (Ctrl-C)."""
    import signal

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "serve.log").open("w+")
    server = subprocess.Popen([sys.executable, "-m", "aviary", "serve", str(checkpoint), "--port", str(port),
                               "--threads", "1", "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            assert server.poll() is None and time.time() < deadline, "aviary serve did not start"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        server.send_signal(signal.SIGINT)
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    log.seek(0)
    output = log.read()
    assert "Traceback" not in output
    assert "leaked" not in output  # gc.freeze'd objects are unfrozen at exit (nanobind counts them otherwise)
