"""Chat formats over the API, through the real `openai` client: a G1 reply's reasoning in
`message.reasoning_content` (and `delta.reasoning_content` when streaming), the answer in `content`; thinking
turned off by `reasoning_effort: "none"` or vLLM's `chat_template_kwargs: {"enable_thinking": false}`; replies
that stop before the next turn's role label with finish_reason "stop", and "length" at max_tokens.

The reply is scripted: the real server, scheduler and engine run the tiny random model, but the engine's
sampler is replaced by one that picks the tokens of a fixed text, one a step, then the end-of-text id. So the
tests do not depend on what a random model happens to write, and every other layer is the real one (stop
strings, UTF-8, finish reasons). One test runs `aviary serve --chat-format` as the command builds it."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

import aviary
from aviary.chat_format import ChatMessage, get_format
from aviary.cli import build_parser
from live import LiveServer, recording_server, scripted_sampling

pytest.importorskip("uvicorn")
torch.set_num_threads(1)

REPLY = [">", "\nAdd", " them", ":", " 2 + 3", " = 5.", "\n</", "think", ">\n", "The", " sum", " is 5.", "\n\n",
         "User", ":", " more"]  # the model runs on into the next turn; the stop string ends it first


@pytest.fixture(scope="module")
def tok():
    pytest.importorskip("aviary.tokenizer")
    from aviary.tokenizer import WorldTokenizer

    return WorldTokenizer()


@pytest.fixture(scope="module")
def script(tok):
    with scripted_sampling(tok) as script:
        yield script


@pytest.fixture(scope="module")
def model(checkpoint):
    return aviary.load(checkpoint)


def scripted_server(model, tok, chat_format: str):
    return recording_server(model, tok, model_name="scripted", chat_format=chat_format)


@pytest.fixture(scope="module")
def g1(model, tok, script):
    live = scripted_server(model, tok, "g1")
    yield live
    live.close()


@pytest.fixture
def client(g1, script):
    script.say(REPLY)
    return openai.OpenAI(base_url=g1.url + "/v1", api_key="none", max_retries=0, timeout=60)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum 2 and 3."}]


def test_g1_reasoning_comes_apart_from_the_answer(g1, client):
    r = client.chat.completions.create(model="scripted", messages=MESSAGES)
    choice = choice_of(r)
    assert choice.message.reasoning_content == "Add them: 2 + 3 = 5."
    assert choice.message.content == "The sum is 5."
    assert choice.finish_reason == "stop"  # at the blank line: "User:" never reaches the client
    assert g1.prompts[-1] == "System: Be brief.\n\nUser: Sum 2 and 3.\n\nAssistant: <think"


def choice_of(r):
    assert len(r.choices) == 1
    return r.choices[0]


def test_g1_streaming_gives_reasoning_deltas_then_content_deltas(client, tok, script):
    assert not any("</think>" in tok.decode([t]) for t in script.ids)  # the tag comes in several pieces
    stream = client.chat.completions.create(model="scripted", messages=MESSAGES, stream=True)
    reasoning, content, reasons, order = "", "", [], []
    for chunk in stream:
        for c in chunk.choices:
            r = getattr(c.delta, "reasoning_content", None)
            if r:
                reasoning += r
                order.append("r")
            if c.delta.content:
                content += c.delta.content
                order.append("c")
            reasons.append(c.finish_reason)
    assert (reasoning, content) == ("Add them: 2 + 3 = 5.", "The sum is 5.")
    assert order == sorted(order, reverse=True) and "r" in order and "c" in order  # all reasoning first
    assert [x for x in reasons if x] == ["stop"]


def test_max_tokens_inside_the_reasoning_ends_with_length(client, tok, script):
    r = client.chat.completions.create(model="scripted", messages=MESSAGES, max_tokens=5)
    choice = choice_of(r)
    assert choice.finish_reason == "length"
    reasoning = tok.decode(script.ids[:5]).removeprefix(">").strip()  # ">\nAdd them: 2 + 3" in five tokens or so
    assert (choice.message.reasoning_content, choice.message.content) == (reasoning, "")
    assert reasoning.startswith("Add")


@pytest.mark.parametrize("off", [{"reasoning_effort": "none"},
                                 {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}])
def test_thinking_can_be_turned_off(model, tok, script, off):
    script.say([">", "\n", "Five", ".", "\n\n"])
    live = scripted_server(model, tok, "g1")
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="scripted", messages=MESSAGES, **off)
        message = choice_of(r).message
        assert message.content == "Five." and getattr(message, "reasoning_content", None) is None
        assert live.prompts[-1].endswith("User: Sum 2 and 3.\n\nAssistant: <think>\n</think")
    finally:
        live.close()


def test_a_reasoning_effort_adds_the_think_length_hint(g1, client):
    client.chat.completions.create(model="scripted", messages=MESSAGES, reasoning_effort="high")
    assert g1.prompts[-1].endswith("User: Sum 2 and 3. (think a lot)\n\nAssistant: <think")


def test_reasoning_sent_back_is_rendered_in_the_history(g1, client):
    history = [*MESSAGES, {"role": "assistant", "content": "5.", "reasoning_content": "2 + 3 = 5"},
               {"role": "user", "content": "And 4 + 4?"}]
    client.chat.completions.create(model="scripted", messages=history)
    assert g1.prompts[-1] == get_format("g1").render([_msg(m) for m in history])
    assert "Assistant: <think>\n2 + 3 = 5\n</think>\n5.\n\nUser: And 4 + 4?" in g1.prompts[-1]


def _msg(m: dict) -> ChatMessage:
    return ChatMessage(m["role"], m["content"], m.get("reasoning_content", ""))


@pytest.mark.parametrize("body, param", [
    ({"reasoning_effort": "max"}, "reasoning_effort"),
    ({"chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs.enable_thinking"),
    ({"chat_template_kwargs": {"add_generation_prompt": True}}, "chat_template_kwargs.add_generation_prompt"),
])
def test_bad_thinking_fields_are_400s(g1, body, param):
    r = httpx.post(g1.url + "/v1/chat/completions", json={"model": "scripted", "messages": MESSAGES, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_the_world_format_has_no_reasoning_field_and_stops_at_the_next_turn(model, tok, script):
    script.say([" Fine", ",", " thanks", ".", "\n", "User", ":", " and"])
    live = scripted_server(model, tok, "world")
    try:
        body = {"model": "scripted", "messages": MESSAGES}
        r = httpx.post(live.url + "/v1/chat/completions", json=body).json()
        assert r["choices"][0]["message"] == {"role": "assistant", "content": "Fine, thanks."}
        assert r["choices"][0]["finish_reason"] == "stop"
        assert live.prompts[-1].endswith("User: Sum 2 and 3.\n\nAssistant:")
        r = httpx.post(live.url + "/v1/chat/completions", json={**body, "max_tokens": 2}).json()
        assert r["choices"][0]["message"]["content"] == tok.decode(script.ids[:2]).strip()
        assert r["choices"][0]["finish_reason"] == "length"
    finally:
        live.close()


def test_aviary_serve_takes_the_chat_format_flag(checkpoint, script):
    """The server as `aviary serve --chat-format raven` builds it: the prompt is Raven's."""
    script.say([" Hi", "\n\n"])
    from aviary.commands.serve import build
    from aviary.tokenizer import WorldTokenizer

    threads = torch.get_num_threads()
    args = build_parser().parse_args(["serve", str(checkpoint), "--chat-format", "raven", "--threads", "1"])
    app, _ = build(args)
    live = LiveServer(app)
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="tiny-v7", messages=MESSAGES, max_tokens=3)
        messages = [_msg(m) for m in MESSAGES]
        raven, _ = get_format("raven").tokens(messages, WorldTokenizer())
        world, _ = get_format("world").tokens(messages, WorldTokenizer())
        assert r.usage.prompt_tokens == len(raven) != len(world)
    finally:
        live.close()
        torch.set_num_threads(threads)
