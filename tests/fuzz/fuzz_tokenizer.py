"""Fuzz target: the tokenizers on arbitrary text, bytes, id lists and vocabulary files.

Run by tests/test_fuzz.py in its own process (a crash in the C trie is a failed test there, not a dead run);
the number of examples comes from the loaded Hypothesis profile (tests/conftest.py, --fuzz-examples N).

Invariants: the C and Python World backends give equal ids, and every text and byte string round-trips; the
20B tokenizer round-trips NFC text and never emits a control id for user text; decoding any id list, even one
whose items change it from __index__, either succeeds or raises ValueError/TypeError/OverflowError, the C
decoder exactly as the Python reference; a vocabulary file of random lines gives a working tokenizer or a
ValueError naming the file, the same for both backends.
"""

from __future__ import annotations

import tempfile
import unicodedata
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from aviary.tokenizer import NeoXTokenizer, WorldTokenizer
from aviary.tokenizer.world import MAX_TOKEN_ID

WORLD = WorldTokenizer()
PYTHON = WorldTokenizer(backend="python")
NEOX = NeoXTokenizer()
USER_ERRORS = (ValueError, TypeError, OverflowError)

# pieces that stress the edges: special-token text, long space runs (20B added tokens), emoji sequences,
# BOM, NUL, combining marks
PIECES = ["<|endoftext|>", "<|padding|>", " " * 40, "\n\n", "😀👋🏽", "\x00", "\ufeff", "e\u0301", "世界", "\r\n"]
texts = st.lists(st.one_of(st.text(max_size=40), st.sampled_from(PIECES)), max_size=8).map("".join)


@given(texts)
def test_text_round_trip(text):
    ids = WORLD.encode(text)
    assert PYTHON.encode(text) == ids
    assert WORLD.decode(ids) == PYTHON.decode(ids) == text
    assert WORLD.encode_batch([text, text[::-1]], num_threads=2) == [ids, WORLD.encode(text[::-1])]
    nfc = unicodedata.normalize("NFC", text)  # the 20B tokenizer normalises first
    neox_ids = NEOX.encode(nfc)
    assert NEOX.decode(neox_ids) == nfc
    assert NEOX.eot_id not in neox_ids and 1 not in neox_ids  # "<|endoftext|>" in text is text


@given(st.binary(max_size=2000))
def test_bytes_round_trip(data):
    ids = WORLD.encode_bytes(data)
    assert PYTHON.encode_bytes(data) == ids
    assert WORLD.decode_bytes(ids) == PYTHON.decode_bytes(ids) == data
    assert WORLD.decode(ids) == data.decode("utf-8", errors="replace")


# --- decoding any id list -----------------------------------------------------------------------------------

CHANGES = {  # what a hostile item's __index__ does to the list being decoded (once)
    "nothing": lambda ids: None,
    "clear": lambda ids: ids.clear(),
    "grow": lambda ids: ids.extend([33] * 50),
    "refill": lambda ids: ids.__setitem__(slice(None), [bytearray(b"x")] * len(ids)),
    "halve": lambda ids: ids.__delitem__(slice(len(ids) // 2, None)),
    "reverse": lambda ids: ids.reverse(),
}


class Hostile:
    """An id whose __index__ changes the list that holds it, then returns a value or raises."""

    def __init__(self, change: str, value: int, raises: type[Exception] | None):
        self.change, self.value, self.raises, self.ids, self.done = change, value, raises, None, False

    def __index__(self):
        if not self.done and self.ids is not None:
            self.done = True
            CHANGES[self.change](self.ids)
        if self.raises:
            raise self.raises("hostile __index__")
        return self.value


items = st.one_of(
    st.integers(0, 65535),  # valid ids and the gap 65530..65535
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**31, 2**63, 2**64, -1, 65530, 50277]),
    st.integers(0, 70000).map(np.int64),
    st.booleans(), st.floats(), st.none(), st.text(max_size=2), st.binary(max_size=2), st.just([1]),
    st.tuples(st.just("hostile"), st.sampled_from(sorted(CHANGES)), st.integers(-5, 70000),
              st.sampled_from([None, None, TypeError, ValueError])),
)
id_lists = st.tuples(st.lists(items, max_size=40), st.sampled_from(["list", "tuple", "iter"]))


def build(spec):
    """A fresh id sequence from its spec: hostile items point at the list that holds them."""
    item_specs, container = spec
    ids = [Hostile(*s[1:]) if isinstance(s, tuple) else s for s in item_specs]
    for item in ids:
        if isinstance(item, Hostile):
            item.ids = ids
    return ids if container == "list" else tuple(ids) if container == "tuple" else iter(ids)


def outcome(decode, ids):
    try:
        return "ok", decode(ids)
    except USER_ERRORS as e:
        return type(e).__name__, str(e)


@given(id_lists)
def test_decode_any_ids(spec):
    for method in ("decode_bytes", "decode"):
        c = outcome(getattr(WORLD, method), build(spec))
        assert c == outcome(getattr(PYTHON, method), build(spec))
        outcome(getattr(NEOX, method), build(spec))  # succeeds or raises a user error
    outcome(WORLD.stream_decoder().push, build(spec))


@given(st.one_of(st.binary(), st.text(), st.booleans(), st.integers(), st.floats(), st.none()))
def test_decode_of_a_non_list(ids):
    for t in (WORLD, PYTHON, NEOX):
        kind, _ = outcome(t.decode_bytes, ids)
        assert kind != "ok" or (isinstance(ids, int) and not isinstance(ids, bool))  # one int is one id


# --- vocabulary files -------------------------------------------------------------------------------------

def mostly(common, rare, one_in: int = 5):
    """`common`, and `rare` once in `one_in` draws (st.one_of would pick each about equally often)."""
    return st.integers(0, one_in - 1).flatmap(lambda k: rare if k == one_in // 2 else common)  # 0 is drawn often


token_ids = mostly(st.integers(257, 1000), st.one_of(st.integers(-3, 256), st.sampled_from(
    [0, MAX_TOKEN_ID + 1, 10**12, 2**63])), one_in=10)
literals = st.one_of(st.binary(min_size=1, max_size=6), st.text(min_size=1, max_size=4))
token_lines = st.tuples(token_ids, literals, mostly(st.just(0), st.sampled_from([1, -1]), one_in=10)).map(
    lambda t: f"{t[0]} {t[1]!r} {len(t[1] if isinstance(t[1], bytes) else t[1].encode()) + t[2]}".encode())
garbage_lines = st.one_of(st.text(max_size=30).map(str.encode), st.binary(max_size=30))
vocab_lines = st.tuples(st.lists(token_lines, max_size=10), mostly(st.just([]), st.lists(garbage_lines, max_size=2)))
BYTE_LINES = [f"{b + 1} {bytes([b])!r} 1".encode() for b in range(256)]


@given(vocab_lines.map(lambda t: t[0] + t[1]), mostly(st.just(True), st.just(False)), st.binary(max_size=200))
def test_vocabulary_file(lines, with_bytes, sample):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_bytes(b"\n".join((BYTE_LINES if with_bytes else []) + lines) + b"\n")
        results = []
        for backend in ("c", "python"):
            try:
                tok = WorldTokenizer(path, backend=backend)
            except ValueError as e:
                assert str(e).startswith(str(path)), e  # names the file
                results.append(str(e))
                continue
            ids = tok.encode_bytes(sample)
            assert tok.decode_bytes(ids) == sample and max(ids, default=0) < tok.vocab_size
            results.append((ids, tok.vocab_size))
        assert results[0] == results[1]
