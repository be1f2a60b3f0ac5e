"""Constrained decoding: a grammar says which tokens may come next, so the text always matches it.

    grammars = Grammars(tokenizer, vocab_size)          # once per tokenizer (~0.4 s for World's 65,536 tokens)
    grammar = grammars.json(schema)                     # or .json(None): any JSON object; or .lark(text)
    engine.add(prompt, params, constraint=grammar.start())   # one Constraint per sequence

Each step, before sampling, `Constraint.mask(logits)` sets the logit of every token the grammar forbids to
-inf; after sampling, `Constraint.advance(token)` moves the grammar on. The engine ends the sequence with
finish_reason "stop" when the grammar is complete and allows nothing more (`done`), or samples the
end-of-text token where the grammar may end but need not. A sequence without a constraint does no extra work.

The grammar engine is llguidance (PyPI `llguidance`, the `structured` extra): a Rust core with wheels for
Linux and macOS and no torch dependency, JSON-schema and Lark grammars, a token mask in about 0.1 ms on CPU
for the World vocabulary (benchmarks/bench_constraints.py), and it takes a raw byte vocabulary, which is what RWKV
tokenizers are. (xgrammar 0.2.9 takes one too, but requires torch, transformers and triton: a second torch
could replace the pinned one; outlines-core builds an index per regular expression, JSON schemas only through
a regex.)

JSON is written compactly (`{"a":1,"b":[2]}`: no optional whitespace), so a model cannot spend its tokens on
blank space and the text has no blank line (which would end a chat turn). A sequence that reaches
max_tokens first is cut short, as OpenAI's are: finish_reason "length" says its text is incomplete.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["Constraint", "Grammar", "GrammarError", "Grammars", "StructuredOutputUnavailable", "available", "json_rule",
           "literal"]

# llguidance's JSON options: compact JSON, one spelling of every separator
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


class StructuredOutputUnavailable(RuntimeError):
    """llguidance is not installed."""


class GrammarError(ValueError):
    """A grammar or JSON schema that cannot be compiled."""


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise StructuredOutputUnavailable("constrained decoding needs llguidance: pip install "
                                          "'aviary[structured]'") from None
    return llguidance


class Grammars:
    """Compiles grammars for one tokenizer. `eos_token_id` is the id that ends a text (World's 0)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int = 0):
        llg = _llguidance()
        self.vocab_size = vocab_size
        tokens = []
        for i in range(vocab_size):  # model rows without text (World's 65530..65535) are never allowed
            try:
                tokens.append(b"" if i == eos_token_id else tokenizer.decode_bytes([i]))
            except (ValueError, KeyError, IndexError):
                tokens.append(b"")
        self._ll = llg.LLTokenizer(llg.TokenizerWrapper(_Vocabulary(tokenizer, tokens, eos_token_id)),
                                   n_vocab=vocab_size)
        self._llg = llg

    def json(self, schema: dict[str, Any] | None, prefix: str = "") -> Grammar:
        """`prefix` then one JSON value that matches `schema` (None: any JSON object)."""
        start = f"start: {literal(prefix)} value" if prefix else "start: value"
        return self.lark(f"{start}\n{json_rule('value', schema)}")

    def lark(self, text: str) -> Grammar:
        """A grammar in llguidance's Lark dialect (which embeds JSON schemas as `%json {...}`). Compiling takes
        about a millisecond for a small schema, more for a large one: a server does it off its event loop."""
        matcher = self._llg.LLMatcher(self._ll, self._llg.LLMatcher.grammar_from_lark(text))
        if matcher.is_error():  # "at 2(8): <why>" and the grammar's source around it: the why is for the user
            why = re.sub(r"^at \d+\(\d+\): ", "", matcher.get_error().strip())
            raise GrammarError(why.split("\n   1 | ")[0].strip())
        return Grammar(matcher, self.vocab_size)


def json_rule(name: str, schema: dict[str, Any] | None) -> str:
    """A Lark rule `name` for one compact JSON value matching `schema` (None: any JSON object)."""
    schema = {"type": "object"} if schema is None else schema
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    given = schema.get("x-guidance")  # llguidance's options, if the schema sets any: they win
    options = {**JSON_OPTIONS, **given} if isinstance(given, dict) else JSON_OPTIONS
    return f"{name}: %json {json.dumps({**schema, 'x-guidance': options})}"


def literal(text: str) -> str:
    """`text` as a Lark string literal (a JSON string is one)."""
    return json.dumps(text, ensure_ascii=False)


class Grammar:
    """A compiled grammar; `start()` gives a fresh Constraint for one sequence (a copy of the compiled matcher,
    in microseconds: the scheduler's thread never compiles)."""

    def __init__(self, matcher, vocab_size: int):
        self._matcher, self.vocab_size = matcher, vocab_size  # never advanced: the copies are

    def start(self) -> Constraint:
        return Constraint(self._matcher.deep_copy(), self.vocab_size)


class Constraint:
    """The grammar's state for one sequence being generated."""

    def __init__(self, matcher, vocab_size: int):
        self._matcher, self.vocab_size = matcher, vocab_size

    def forbidden(self) -> np.ndarray:
        """[V] bool: the tokens the grammar does not allow next."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)  # [ceil(V / 32) * 4], bit 1 = allowed
        return np.unpackbits(~bits, bitorder="little")[:self.vocab_size].view(np.bool_)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V]: every token the grammar forbids set to -inf, in place; returned."""
        forbidden = self.forbidden()
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            logits.numpy()[forbidden] = -np.inf  # numpy's boolean assignment: ~4x faster than masked_fill_ here
        else:
            logits.masked_fill_(torch.from_numpy(forbidden).to(logits.device), -float("inf"))
        return logits

    def advance(self, token: int) -> bool:
        """Take the sampled token; False (and the grammar is stuck) if it was not allowed."""
        return self._matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The text is complete and the grammar allows no other token."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: each id's bytes, the end-of-text id, an encoder."""

    bos_token_id = None

    def __init__(self, tokenizer, tokens: Sequence[bytes], eos_token_id: int):
        self.tokenizer, self.tokens, self.eos_token_id = tokenizer, list(tokens), eos_token_id

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            return self.tokenizer.encode_bytes(text)
        return self.tokenizer.encode(text)
