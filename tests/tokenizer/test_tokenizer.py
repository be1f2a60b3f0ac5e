"""The World tokenizer: parity with the reference (rwkv pip package TRIE_TOKENIZER), C == Python backend,
round trips, streaming, bad input; the 20B tokenizer against `tokenizers`; load_tokenizer."""

from __future__ import annotations

import ast
import json
import lzma
import random
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from aviary.tokenizer import NeoXTokenizer, StreamDecoder, Tokenizer, WorldTokenizer, load_tokenizer
from aviary.tokenizer import tokenizer_for_version as for_version
from aviary.tokenizer.neox import NEOX_TOKENIZER
from aviary.tokenizer.world import WORLD_VOCAB, load_vocab, parse_literal

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
MULTILINGUAL = SHARED_DATA / "tokenizer" / "multilingual.jsonl.xz"
CORPUS = SHARED_DATA / "corpus" / "train.jsonl.xz"

EIFFEL = "The Eiffel tower is in the city of"
EIFFEL_IDS = [6699, 304, 25740, 109, 39990, 4600, 4596, 22590, 30449, 4706]


@pytest.fixture(scope="module")
def ref():
    """The reference: rwkv pip package's TRIE_TOKENIZER on its own copy of the vocabulary."""
    rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
    return rwkv_tokenizer.TRIE_TOKENIZER(str(Path(rwkv_tokenizer.__file__).parent / "rwkv_vocab_v20230424.txt"))


def _texts(path: Path) -> list[str]:
    if not path.exists():
        pytest.skip(f"{path} is absent (shared data)")
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def multilingual() -> list[str]:
    return _texts(MULTILINGUAL)


@pytest.fixture(scope="module")
def corpus_sample() -> list[str]:
    """About 1 MB of the training corpus: 1-3 slices of 40 kB from 12 seeded documents."""
    docs = _texts(CORPUS)
    rng = random.Random(3)
    sample = []
    for doc in rng.sample(docs, 12):
        start = rng.randrange(max(1, len(doc) - 40_000))
        sample.append(doc[start : start + 40_000])
    return sample


def random_text(rng: random.Random, n: int) -> str:
    """n code points from many scripts, emoji, combining marks, controls and anywhere in Unicode."""
    pools = [(0x20, 0x7E)] * 6 + [(0x00, 0x1F), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x4FF), (0x590, 0x6FF),
                                 (0x900, 0x97F), (0xE00, 0xE7F), (0x3040, 0x30FF), (0x4E00, 0x9FFF),
                                 (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x80, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        cp = rng.randint(lo, hi)
        out.append(chr(0xFFFD if 0xD800 <= cp <= 0xDFFF else cp))
    return "".join(out)


def token_soup(rng: random.Random, tokens: list[bytes | None], n: int) -> bytes:
    """Bytes glued from random vocabulary tokens, some cut short: many near-misses for longest match."""
    real = [t for t in tokens if t]
    parts = []
    for _ in range(n):
        t = rng.choice(real)
        parts.append(t if rng.random() < 0.7 else t[: rng.randrange(1, len(t) + 1)])
    return b"".join(parts)


@pytest.fixture(scope="module")
def random_inputs() -> list[bytes]:
    rng = random.Random(0)
    tokens = load_vocab(WORLD_VOCAB)
    out = [random_text(rng, rng.randrange(1, 400)).encode("utf-8") for _ in range(150)]
    out += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(150)]
    out += [token_soup(rng, tokens, rng.randrange(1, 80)) for _ in range(150)]
    return out


# --- the vocabulary ---------------------------------------------------------------------------------


def test_vocab_parse_equals_literal_eval():
    """Every line of the bundled file, parsed without eval, equals Python's own literal parser."""
    tokens = load_vocab(WORLD_VOCAB)
    lines = WORLD_VOCAB.read_text(encoding="utf-8").split("\n")
    assert len(tokens) == 65530 and tokens[0] == b"" and sum(1 for line in lines if line) == 65529
    for line in filter(None, lines):
        value = ast.literal_eval(line[line.index(" ") + 1 : line.rindex(" ")])
        assert tokens[int(line[: line.index(" ")])] == (value.encode() if isinstance(value, str) else value)
    assert [tokens[b + 1] for b in range(256)] == [bytes([b]) for b in range(256)]


@pytest.mark.parametrize("literal, expected", [
    ("'a b'", b"a b"), ('"it\'s"', b"it's"), ("'\\n\\t\\\\'", b"\n\t\\"), ("b'\\xff\\x00'", b"\xff\x00"),
    ("'é\\xe9'", "éé".encode()), ("'\\u4e16'", "世".encode()), ("'\\U0001f600'", "😀".encode()),
])
def test_parse_literal(literal, expected):
    assert parse_literal(literal) == expected


@pytest.mark.parametrize("line", ["1 __import__('os') 1", "1 'abc 3", "x 'a' 1", "1 'ab' 3", "0 'a' 1", "1 b'é' 2"])
def test_bad_vocab_lines_are_refused(tmp_path, line):
    path = tmp_path / "vocab.txt"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.txt:1"):
        load_vocab(path)


def test_vocab_without_all_bytes_is_refused(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("1 'a' 1\n2 'ab' 2\n", encoding="utf-8")
    for backend in ("c", "python"):
        with pytest.raises(ValueError, match="single byte 0x00"):
            WorldTokenizer(path, backend=backend)


def test_custom_vocab_file(tmp_path):
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)] + ["257 'ab' 2", "258 'abc' 3", "300 'abcde' 5"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for backend in ("c", "python"):
        t = WorldTokenizer(path, backend=backend)
        assert t.vocab_size == 320 and len(t) == 320
        assert t.encode("abcdabcdeab") == [258, 101, 300, 257]
        with pytest.raises(ValueError, match="token id 299 at position 1"):
            t.decode([1, 299])


def test_attributes(tok, neox):
    assert tok.vocab_size == len(tok) == 65536 and tok.eot_id == 0
    assert isinstance(tok, Tokenizer) and isinstance(neox, Tokenizer)


# --- parity with the reference ----------------------------------------------------------------------


@pytest.mark.oracle
def test_known_ids(tok, pytok, ref):
    for t in (tok, pytok, ref):
        assert t.encode(EIFFEL) == EIFFEL_IDS
        assert t.encode("😀") == [3319, 153, 129]


@pytest.mark.oracle
def test_parity_multilingual(tok, ref, multilingual):
    assert len(multilingual) >= 47
    for text in multilingual:
        assert tok.encode(text) == ref.encode(text)


@pytest.mark.oracle
def test_parity_corpus(tok, ref, corpus_sample):
    for text in corpus_sample:
        assert tok.encode(text) == ref.encode(text)


@pytest.mark.oracle
def test_parity_random_unicode_and_bytes(tok, ref, random_inputs):
    for data in random_inputs:
        assert tok.encode_bytes(data) == ref.encodeBytes(data), data


def test_c_equals_python(tok, pytok, random_inputs, multilingual):
    for data in random_inputs:
        assert tok.encode_bytes(data) == pytok.encode_bytes(data)
    for text in multilingual[::4]:
        assert tok.encode(text) == pytok.encode(text)


# --- round trips, streaming, batches ----------------------------------------------------------------


def test_round_trips(tok, pytok, random_inputs, multilingual):
    for text in multilingual:
        assert tok.decode(tok.encode(text)) == text
    for data in random_inputs:
        ids = tok.encode_bytes(data)
        assert tok.decode_bytes(ids) == pytok.decode_bytes(ids) == data
        assert tok.decode(ids) == pytok.decode(ids) == data.decode("utf-8", errors="replace")
    assert tok.decode(tok.encode("Hello, 世界 👋")) == "Hello, 世界 👋"


def test_input_types(tok):
    ids = tok.encode("abc\x00é")
    assert tok.encode_bytes(b"abc\x00\xc3\xa9") == tok.encode_bytes(bytearray(b"abc\x00\xc3\xa9")) == ids
    assert tok.encode_bytes(memoryview(b"abc\x00\xc3\xa9")) == ids
    assert tok.decode(tuple(ids)) == tok.decode(iter(ids)) == "abc\x00é"
    np = pytest.importorskip("numpy")
    assert tok.decode(np.array(ids)) == tok.decode(np.array(ids, dtype=np.uint16)) == "abc\x00é"
    assert tok.decode([np.int64(i) for i in ids]) == "abc\x00é"
    with pytest.raises(TypeError, match="encode_bytes"):
        tok.encode(b"abc")
    with pytest.raises(TypeError):
        tok.encode_bytes("abc")
    with pytest.raises(UnicodeEncodeError):
        tok.encode("\ud800")  # a lone surrogate has no UTF-8, as with str.encode


def test_empty_input(tok, pytok):
    for t in (tok, pytok):
        assert t.encode("") == [] and t.encode_bytes(b"") == [] and t.decode([]) == "" and t.decode_bytes([]) == b""
        assert t.encode_batch([]) == [] and t.encode_batch(["", "a"]) == [[], [98]]
        dec = t.stream_decoder()
        assert dec.push([]) == "" and dec.flush() == ""


def test_end_of_document_decodes_to_nothing(tok, pytok):
    for t in (tok, pytok):
        assert t.decode([0]) == "" and t.decode(t.encode("a") + [0] + t.encode("b")) == "ab"


@pytest.mark.parametrize("backend", ["c", "python"])
@pytest.mark.parametrize("bad, position", [([1, 65530], 1), ([-1], 0), ([5, 6, 70000], 2), ([2**70], 0),
                                           ([65535, 1], 0)])
def test_bad_ids_raise_value_error_naming_the_id(backend, bad, position, tok, pytok):
    t = tok if backend == "c" else pytok
    for decode in (t.decode, t.decode_bytes, t.stream_decoder().push):
        with pytest.raises(ValueError, match=rf"token id {bad[position]} at position {position} .*0\.\.65529"):
            decode(bad)


def test_non_integer_ids_raise_type_error(tok):
    with pytest.raises(TypeError, match="item 1"):
        tok.decode([1, "a"])
    with pytest.raises(TypeError):
        tok.decode([1.5])


def test_invalid_utf8_is_replaced_never_raised(tok, pytok):
    rng = random.Random(1)
    for t in (tok, pytok):
        assert t.decode([256]) == "\ufffd"  # the byte 0xff
        assert t.decode([3319, 153]) == "\ufffd"  # the first two of 😀's three tokens
        assert t.decode_bytes([3319, 153]) == "😀".encode()[:3]
        for _ in range(50):
            ids = [rng.randrange(65530) for _ in range(rng.randrange(1, 30))]
            assert t.decode(ids) == t.decode_bytes(ids).decode("utf-8", errors="replace")


def test_stream_decoder_equals_decode_for_any_split(tok):
    rng = random.Random(2)
    texts = [random_text(rng, 200) for _ in range(20)] + ["😀👋🏽 世界 é"]
    id_lists = [tok.encode(t) for t in texts] + [[rng.randrange(1, 65530) for _ in range(100)] for _ in range(20)]
    for ids in id_lists:
        dec = tok.stream_decoder()
        assert isinstance(dec, StreamDecoder)
        out, i = [], 0
        while i < len(ids):
            n = rng.choice([1, 1, 1, 2, 5])
            out.append(dec.push(ids[i] if n == 1 else ids[i : i + n]))
            assert "\ufffd" not in out[-1] or "\ufffd" in tok.decode(ids)
            i += n
        out.append(dec.flush())
        assert "".join(out) == tok.decode(ids)


def test_stream_decoder_holds_back_partial_characters(tok):
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in [3319, 153, 129]] == ["", "", "😀"]
    assert dec.push([3319]) == "" and dec.pending == b"\xf0\x9f"
    assert dec.flush() == "\ufffd" and dec.pending == b"" and dec.flush() == ""
    with pytest.raises(ValueError, match="70000"):
        dec.push([3319, 70000])
    assert dec.pending == b""  # a rejected push changes nothing


def test_encode_batch_equals_encode(tok, multilingual, random_inputs):
    texts = multilingual + [d.decode("utf-8", errors="replace") for d in random_inputs[:100]] + [""]
    expected = [tok.encode(t) for t in texts]
    for n in (None, 1, 2, 3, 64):
        assert tok.encode_batch(texts, num_threads=n) == expected
    assert tok.encode_batch(iter([b"ab", "ab"]), num_threads=2) == [tok.encode("ab")] * 2


def test_encode_releases_the_gil(tok):
    """While one thread matches in C, Python code keeps running in another (what encode_batch relies on)."""
    data = b" " * (128 * 250_000)  # 32 MB that are 250k tokens of 128 spaces: long matching, a short list
    go, done, longest_stall = threading.Event(), threading.Event(), 0.0

    def work():
        go.wait()  # start matching only once the loop below is running
        start = time.perf_counter()
        assert tok.encode_bytes(data) == [65529] * 250_000
        work.seconds = time.perf_counter() - start
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    last = time.perf_counter()
    go.set()
    while not done.is_set():
        now = time.perf_counter()
        longest_stall, last = max(longest_stall, now - last), now
    worker.join()
    # holding the GIL through the match would stall this loop for all of it
    assert longest_stall < 0.5 * work.seconds, (longest_stall, work.seconds)


def test_encode_memory_is_bounded(tok):
    """Peak allocation while encoding: the result list (8 bytes a token) and the C id buffer (4 bytes a token,
    grown by half when full), nothing that grows with the vocabulary or the longest token."""
    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune "
            "must be in want of a wife. 1234567890 ") * 20_000
    tracemalloc.start()
    ids = tok.encode(text)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(ids) > 100_000
    assert peak < 16 * len(ids) + len(text), (peak, len(ids))


@pytest.mark.slow
def test_100mb_input(tok):
    block = ("Greedy longest match, 世界 👋, 1234 " * 1000).encode()
    data = block * (100_000_000 // len(block))
    tracemalloc.start()
    ids = tok.encode_bytes(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * len(ids), (peak, len(ids))
    assert len(ids) < len(data) // 2 and tok.decode_bytes(ids) == data


# --- the 20B tokenizer and load_tokenizer -----------------------------------------------------------


def test_neox_matches_tokenizers(neox, multilingual):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(neox.path))
    hf.encode_special_tokens = True  # Aviary's one deviation: "<|endoftext|>" in text is text (finding 15)
    assert neox.vocab_size == len(neox) == 50277 and neox.eot_id == 0
    texts = [t[:20_000] for t in multilingual[::3]] + ["Hello world  \n\n   x<|endoftext|>é 😀"]
    for text in texts:
        ids = neox.encode(text)
        assert ids == hf.encode(text).ids
        assert neox.decode(ids) == hf.decode(ids)
    assert neox.encode_batch(texts) == neox.encode_batch(texts, num_threads=1) == [neox.encode(t) for t in texts]
    rng = random.Random(4)
    for _ in range(100):
        ids = [rng.randrange(50277) for _ in range(12)]
        assert neox.decode(ids) == hf.decode(ids)
        dec = neox.stream_decoder()
        assert "".join(dec.push(i) for i in ids) + dec.flush() == hf.decode(ids)


def test_neox_bad_input(neox):
    with pytest.raises(ValueError, match="token id 50277 at position 1"):
        neox.decode([1, 50277])
    with pytest.raises(ValueError, match="not UTF-8"):
        neox.encode_bytes(b"\xff")
    assert neox.encode("") == [] and neox.decode([]) == "" and neox.decode([0, 1]) == ""


def test_load_tokenizer(tmp_path):
    world = load_tokenizer()
    assert isinstance(world, WorldTokenizer) and world is load_tokenizer("world") is for_version(7)
    assert for_version(5) is for_version(6) is world and load_tokenizer(version=6) is world
    assert isinstance(for_version(4), NeoXTokenizer) and load_tokenizer(version=4) is load_tokenizer("20b")
    assert load_tokenizer("world", version=4) is world  # RWKV-4 World models: a name wins over the version
    assert isinstance(load_tokenizer(WORLD_VOCAB), WorldTokenizer)
    assert isinstance(load_tokenizer(str(NEOX_TOKENIZER)), NeoXTokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer("gpt2")
    with pytest.raises(ValueError, match="version 3"):
        for_version(3)
    with pytest.raises(ValueError, match="cannot read"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ImportError, match="pip install -e"), pytest.MonkeyPatch.context() as mp:
        import sys

        import aviary.tokenizer

        mp.setitem(sys.modules, "aviary.tokenizer._trie", None)
        mp.delattr(aviary.tokenizer, "_trie")
        WorldTokenizer()
    with pytest.raises(ValueError, match="backend"):
        WorldTokenizer(backend="rust")
