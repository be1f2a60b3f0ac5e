"""Tool calling and structured output over the API, through the real `openai` client.

Constrained replies run the tiny random model at temperature 1 (what it writes is noise, so a reply that
parses shows the grammar at work): `response_format` json_object / json_schema, `tool_choice` "required" or
a named function, streaming tool calls == non-streaming ones. Parsing runs a scripted reply (the sampler
replaced by one that writes a fixed text, as in test_serve_chat_formats.py): a ```json call block under
tool_choice "auto" becomes `tool_calls`, in streaming too, and never leaks into `content`. Tool messages and
an assistant's calls are rendered back into the prompt; every malformed field is a 400 naming it."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

import aviary
from aviary.chat_format import ChatMessage, get_format, tool_call_text, tools_prompt
from aviary.generation import engine
from aviary.serve.tool_calls import ToolCallParser
from live import recording_server, scripted_sampling

pytest.importorskip("uvicorn")
pytest.importorskip("llguidance", reason="constrained decoding needs llguidance (pip install 'aviary[structured]')")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["c", "f"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
             "additionalProperties": False}}}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer",
          "minimum": 0, "maximum": 120}, "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}},
          "required": ["name", "age", "pets"], "additionalProperties": False}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tok():
    from aviary.tokenizer import WorldTokenizer

    return WorldTokenizer()


@pytest.fixture(scope="module")
def script(tok):
    with scripted_sampling(tok, engine.sample_batch) as script:
        script.say(None)  # the real sampler until a test scripts a reply
        yield script


@pytest.fixture(scope="module")
def model(checkpoint):
    return aviary.load(checkpoint)


def start(model, tok, chat_format="world"):
    return recording_server(model, tok, model_name="tiny", chat_format=chat_format, web_ui=False)


@pytest.fixture(scope="module")
def server(model, tok, script):
    live = start(model, tok)
    yield live
    live.close()


@pytest.fixture
def client(server, script):
    script.say(None)
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    script.say(None)


def check_weather(arguments: dict) -> None:
    assert set(arguments) == {"city", "unit", "days"} and len(arguments["city"]) <= 8
    assert arguments["unit"] in ("c", "f") and 1 <= arguments["days"] <= 7


def check_person(value: dict) -> None:
    assert set(value) == {"name", "age", "pets"} and isinstance(value["name"], str) and len(value["name"]) <= 6
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 120 and set(value["pets"]) <= {"cat", "dog"}


# ---- structured output: the tiny random model, constrained ------------------------------------------------


def test_json_schema_replies_always_parse_and_match(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=ASK, response_format=fmt, temperature=1.0, seed=7,
                                       n=4, max_tokens=200)
    for choice in r.choices:
        assert choice.finish_reason == "stop" and choice.message.tool_calls is None
        check_person(json.loads(choice.message.content))


def test_json_object_gives_one_compact_json_object(client):
    # any object: a random model's strings may run on, so each reply either parses or was cut at max_tokens
    r = client.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "json_object"}, seed=1,
                                       n=4, max_tokens=40)
    finished = 0
    for choice in r.choices:
        text = choice.message.content
        assert text.startswith("{") and "\n" not in text and choice.finish_reason in ("stop", "length")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
            finished += 1
    assert finished >= 1  # with these seeds ({} at once); the others write a key that runs on to max_tokens


def test_structured_output_on_a_g1_model_turns_thinking_off(model, tok, script):
    live = start(model, tok, "g1")
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=120)
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        r = client.chat.completions.create(model="tiny", messages=ASK, response_format=fmt, seed=2, max_tokens=200)
        message = r.choices[0].message
        check_person(json.loads(message.content))
        assert getattr(message, "reasoning_content", None) is None
        assert live.prompts[-1].endswith("Assistant: <think>\n</think")
    finally:
        live.close()


# ---- tool calls that tool_choice forces: constrained ------------------------------------------------------


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_tool_call_matches_the_functions_parameters(client, server, choice):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, seed=3,
                                       temperature=1.0, max_tokens=300, parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        check_weather(arguments)
    else:
        assert arguments in ({"zone": "utc"}, {"zone": "cet"})
    system = "System: " + tools_prompt([t["function"] for t in TOOLS]) + "\n\n"
    assert server.prompts[-1].startswith(system) and server.prompts[-1].endswith("Assistant:")


def test_with_tools_auto_a_json_reply_is_the_json_or_calls(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, response_format=fmt, seed=5, n=6,
                                       max_tokens=300)
    for c in r.choices:
        if c.message.tool_calls:
            assert c.finish_reason == "tool_calls" and c.message.content is None
            for call in c.message.tool_calls:
                assert call.function.name in ("get_weather", "get_time") and json.loads(call.function.arguments)
        else:
            assert c.finish_reason == "stop"
            check_person(json.loads(c.message.content))
    assert {bool(c.message.tool_calls) for c in r.choices} == {True, False}  # these seeds give both kinds


def test_streamed_tool_calls_reassemble_to_the_same_calls(client):
    body = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", seed=11, max_tokens=300)
    whole = client.chat.completions.create(**body).choices[0]
    calls, reasons, content = {}, [], ""
    for chunk in client.chat.completions.create(**body, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            reasons.append(c.finish_reason)
            for d in c.delta.tool_calls or ():
                call = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
    assert content == "" and [x for x in reasons if x] == [whole.finish_reason] == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == \
        [(t.function.name, json.loads(t.function.arguments)) for t in whole.message.tool_calls]


# ---- parsing a scripted reply under tool_choice "auto" ----------------------------------------------------


CALL = tool_call_text("get_weather", {"city": "Paris", "unit": "c", "days": 2})


def test_a_call_block_in_the_reply_becomes_tool_calls(client, script, server):
    script.say(f" Let me look that up.\n{CALL}\n\n")
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Let me look that up."
    assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == \
        [("get_weather", {"city": "Paris", "unit": "c", "days": 2})]
    assert "Return only a JSON function call." in server.prompts[-1]


def test_streaming_parses_calls_and_never_leaks_the_markup(client, script):
    script.say(f" Sure.\n{CALL}\n{tool_call_text('get_time', {'zone': 'utc'})}\n\n")
    assert len(script.ids) > 20  # the blocks arrive in many pieces
    content, calls, reasons = "", [], []
    for chunk in client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            calls += c.delta.tool_calls or []
            reasons.append(c.finish_reason)
    assert content == "Sure." and "`" not in content
    assert [(d.index, d.function.name) for d in calls] == [(0, "get_weather"), (1, "get_time")]
    assert json.loads(calls[1].function.arguments) == {"zone": "utc"}
    assert [x for x in reasons if x] == ["tool_calls"]


@pytest.mark.parametrize("reply", ['```json\n{"name": "get_weather", "arguments": {"city": \n```',  # not JSON
                                   '```json\n{"name": "launch_rockets", "arguments": {}}\n```',  # no such tool
                                   'Use ```json\n{"a": 1}\n``` for that.'])  # JSON, not a call
def test_a_block_that_is_not_a_call_stays_content(client, script, reply):
    script.say(" " + reply + "\n\n")
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS)
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.message.tool_calls is None and c.message.content == reply


def test_without_tools_a_call_block_is_plain_content(client, script):
    script.say(f" {CALL}\n\n")
    c = client.chat.completions.create(model="tiny", messages=ASK).choices[0]
    assert c.message.content == CALL and c.message.tool_calls is None and c.finish_reason == "stop"


def test_tool_choice_none_offers_no_tools_and_parses_none(client, script, server):
    script.say(f" {CALL}\n\n")
    c = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none").choices[0]
    assert c.message.content == CALL and c.message.tool_calls is None
    assert "Tools:" not in server.prompts[-1]


def test_tool_results_are_rendered_back_into_the_prompt(client, script, server):
    script.say(" It is sunny.\n\n")
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c", "days": 2}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'}]
    c = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS).choices[0]
    assert c.message.content == "It is sunny." and c.finish_reason == "stop"
    expected = get_format("world").render([
        ChatMessage("system", tools_prompt([t["function"] for t in TOOLS])), ChatMessage("user", ASK[0]["content"]),
        ChatMessage("assistant", CALL), ChatMessage("user", 'Function output: {"sky": "sunny"}')])
    assert server.prompts[-1] == expected
    assert '\n\nAssistant: ```json\n{"name":"get_weather","arguments":{"city":"Paris","unit":"c","days":2}}\n```' \
           '\n\nUser: Function output: {"sky": "sunny"}\n\nAssistant:' in expected


def parse(pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    parser, content, calls = ToolCallParser(frozenset({"get_weather", "get_time"})), "", []
    for piece in pieces:
        text, found = parser.feed(piece)
        content += text
        calls += [(c["function"]["name"], c["function"]["arguments"]) for c in found]
    return content + parser.finish(), calls


@pytest.mark.parametrize("reply", [
    f"  Checking.\n{CALL}\n{tool_call_text('get_time', {'zone': 'cet'})}  ",
    "No call: ``` code ``` and ```json\n[1, 2]\n``` stay, `x`.",
    f"{CALL} then more text",
    "```json\n{\"name\": \"get_time\", \"arguments\": {}",  # never closed: content
])
def test_the_parser_gives_the_same_for_pieces_cut_anywhere(reply):
    whole = parse([reply])
    assert whole[0] == whole[0].strip() and "```json\n{\"name\":\"get" not in whole[0]
    for i in range(len(reply) + 1):
        for j in range(i, len(reply) + 1, 7):
            assert parse([reply[:i], reply[i:j], reply[j:]]) == whole, (i, j)


# ---- bad requests --------------------------------------------------------------------------------------


CALL_MSG = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                 "function": {"name": "get_weather", "arguments": "{}"}}]}
BAD = [
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name"),
    ({"tools": "get_weather"}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),  # no tools
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_news"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice.function"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "bogus"}}}}}], "tool_choice": "required"}, "tools.0.function.parameters"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json_object"}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}},
     "response_format"),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}},
     "response_format.json_schema"),
    ({"messages": [*ASK, {"role": "tool", "content": "5"}]}, "messages.1.tool_call_id"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "c9", "content": "5"}]}, "messages.1.tool_call_id"),
    ({"messages": [*ASK, {"role": "user", "tool_call_id": "c1", "content": "5"}]}, "messages.1.tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": CALL_MSG["tool_calls"]}]}, "messages.0.tool_calls"),
    ({"messages": [*ASK, {**CALL_MSG, "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{not json"}}]}]}, "messages.1.tool_calls.0.function.arguments"),
    ({"messages": [*ASK, {**CALL_MSG, "tool_calls": [{"id": "c1", "type": "function",
                                                      "function": {"name": "get_weather"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
]


@pytest.mark.parametrize("body, param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_malformed_tool_and_format_fields_are_400s(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": ASK, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"], error


def test_without_llguidance_a_constrained_request_says_what_to_install(server, monkeypatch):
    monkeypatch.setattr("aviary.generation.constraints.available", lambda: False)
    for body, param in [({"response_format": {"type": "json_object"}}, "response_format"),
                        ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice")]:
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": ASK, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param
        assert "aviary[structured]" in r.json()["error"]["message"]
