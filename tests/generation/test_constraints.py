"""Constrained decoding (aviary.generation.constraints): the mask allows exactly the tokens the grammar
accepts; text sampled under a JSON schema, from random logits or a tiny random model at temperature 1,
always parses and matches the schema; a finished grammar ends its sequence with "stop"; a constrained row
leaves the other rows of a batch as they would be alone; a bad schema is a GrammarError; without llguidance
the error says what to install."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

import aviary
from aviary.generation import Engine, SamplingParams
from aviary.generation.constraints import GrammarError, Grammars, StructuredOutputUnavailable

pytest.importorskip("llguidance", reason="constrained decoding needs llguidance (pip install 'aviary[structured]')")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEMA = {  # bounded, so that even random logits finish it within a few dozen tokens
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
                   "n": {"type": "integer", "minimum": -5, "maximum": 99},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "ok", "n", "tags"], "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok():
    from aviary.tokenizer import WorldTokenizer

    return WorldTokenizer()


@pytest.fixture(scope="module")
def grammars(tok):
    return Grammars(tok, tok.vocab_size)


@pytest.fixture(scope="module")
def model(checkpoint):
    return aviary.load(checkpoint)


def token_bytes(tok, t: int) -> bytes:
    try:
        return tok.decode_bytes([t])
    except ValueError:
        return b""


def check(value: dict) -> None:
    """The value matches SCHEMA (by hand, so the test needs no jsonschema)."""
    assert set(value) == {"name", "ok", "n", "tags"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 6
    assert isinstance(value["ok"], bool)
    assert isinstance(value["n"], int) and not isinstance(value["n"], bool) and -5 <= value["n"] <= 99
    assert len(value["tags"]) <= 3 and set(value["tags"]) <= {"a", "b"}


def test_the_mask_allows_exactly_the_tokens_that_can_start_the_text(grammars, tok):
    forbidden = grammars.lark("start: /[ab]+c/").start().forbidden()
    expected = {t for t in range(tok.vocab_size) if re.fullmatch(rb"[ab]+c?", token_bytes(tok, t))}
    assert forbidden.shape == (tok.vocab_size,) and forbidden.dtype == bool
    assert set((~forbidden).nonzero()[0].tolist()) == expected and len(expected) > 10  # "a", "ab", "bac", ...


def test_the_numpy_mask_and_the_torch_mask_agree(grammars, tok):
    c = grammars.json(SCHEMA).start()
    assert c.advance(tok.encode('{"')[0])
    fast = c.mask(torch.zeros(tok.vocab_size))  # float32 on the CPU: numpy's boolean assignment
    other = c.mask(torch.zeros(tok.vocab_size, dtype=torch.float64))  # any other tensor: masked_fill_
    assert torch.equal(fast.isinf(), other.isinf()) and (fast.isinf().numpy() == c.forbidden()).all()
    assert 0 < int(fast.isinf().sum()) < tok.vocab_size


def test_forced_text_is_written_in_the_tokenizers_own_tokens(grammars, tok):
    forbidden = grammars.lark('start: "Hello, world"').start().forbidden()
    assert (~forbidden).nonzero()[0].tolist() == tok.encode("Hello, world")[:1]


def test_random_logits_under_a_schema_always_give_a_matching_value(grammars, tok):
    grammar = grammars.json(SCHEMA)
    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)
        c, out = grammar.start(), []
        while not c.done:
            logits = c.mask(torch.randn(tok.vocab_size, generator=gen) * 3)
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
            assert token != 0 or not c.forbidden()[0], "the end-of-text token only where the grammar may end"
            if token == 0:
                break
            assert c.advance(token), c.error
            out.append(token)
            assert len(out) < 200
        check(json.loads(tok.decode(out)))


def test_a_tiny_model_at_temperature_1_writes_matching_json_and_stops(model, tok, grammars):
    grammar = grammars.json(SCHEMA, prefix=" ")
    engine = Engine(model, tok)
    prompt = "User: Describe yourself as JSON.\n\nAssistant:"
    outs = [engine.add(prompt, SamplingParams(seed=s, max_new_tokens=80), constraint=grammar.start())
            for s in range(6)]
    while engine.has_work:
        engine.step()
    for out in outs:
        assert out.finish_reason == "stop" and out.text.startswith(" {")
        check(json.loads(out.text))


def test_a_constrained_row_does_not_change_the_other_rows(model, tok, grammars):
    prompt, params = "User: hi\n\nAssistant:", SamplingParams(seed=3, max_new_tokens=12)
    alone = Engine(model, tok)
    free = alone.add(prompt, params)
    while alone.has_work:
        alone.step()
    mixed = Engine(model, tok)
    mixed.add(prompt, params, constraint=grammars.json(None).start())
    beside = mixed.add(prompt, params)
    while mixed.has_work:
        mixed.step()
    assert beside.tokens == free.tokens and beside.text == free.text


def test_max_tokens_cuts_a_constrained_text_with_length(model, tok, grammars):
    engine = Engine(model, tok)
    out = engine.add("User: hi\n\nAssistant:", SamplingParams(seed=0, max_new_tokens=3),
                     constraint=grammars.json(SCHEMA).start())
    while engine.has_work:
        engine.step()
    assert out.finish_reason == "length" and len(out.tokens) == 3 and out.text.startswith("{")


def test_a_grammar_that_is_complete_ends_the_sequence_without_an_end_token(model, tok, grammars):
    engine = Engine(model, tok)
    out = engine.add("User: hi\n\nAssistant:", SamplingParams(seed=0, max_new_tokens=50, stop_token_ids=()),
                     constraint=grammars.lark('start: " yes" | " no"').start())
    while engine.has_work:
        engine.step()
    assert out.finish_reason == "stop" and out.text in (" yes", " no")


@pytest.mark.parametrize("schema", [{"type": "bogus"}, {"$ref": "#/$defs/missing"}, [1, 2]])
def test_a_bad_schema_is_a_grammar_error(grammars, schema):
    with pytest.raises(GrammarError):
        grammars.json(schema)


def test_without_llguidance_the_error_says_what_to_install(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now raises ImportError
    with pytest.raises(StructuredOutputUnavailable, match=r"aviary\[structured\]"):
        Grammars(tok, tok.vocab_size)
