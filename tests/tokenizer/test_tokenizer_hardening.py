"""Hostile and malformed input to the tokenizers (issue 14, docs/reliability-probe.md findings 4, 12, 15 and the
vocabulary rows of 10 and 13): a list changed while it is decoded, bytes or bools given as ids, vocabulary files
with huge ids or binary content, special-token text in the 20B tokenizer. Each test is a probe's reproduction."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from aviary.tokenizer import WorldTokenizer
from aviary.tokenizer.world import MAX_TOKEN_ID, load_vocab

# --- finding 4: a list changed by an id's __index__ while it is decoded -----------------------------------

# Runs in its own process: before the fix the first case was a use-after-free that ended in SIGSEGV. Prints one
# line per case and backend; the C decoder must read a changing list exactly as the Python reference does.
MUTATING_DECODE = textwrap.dedent("""
    import gc
    from aviary.tokenizer import WorldTokenizer

    class Hostile:
        def __init__(self, ids, change, value=5):
            self.ids, self.change, self.value = ids, change, value
        def __index__(self):
            self.change(self.ids)
            gc.collect()
            return self.value

    def clear(ids): ids.clear()
    def grow(ids): ids.extend([34] * 1000)
    def refill(ids): ids[:] = [0] + [bytearray(b"x")] * (len(ids) - 1)  # frees the old items and array
    def shrink_to_one(ids): del ids[1:]

    for backend in ("c", "python"):
        tok = WorldTokenizer(backend=backend)
        for change in (clear, grow, refill, shrink_to_one):
            for n in (2, 100, 10000):
                ids = [33] * n
                ids[0] = Hostile(ids, change)
                try:
                    out = tok.decode_bytes(ids)
                    result = f"{len(out)} bytes {out[:3]!r}"
                except (TypeError, ValueError) as e:
                    result = f"{type(e).__name__}: {e}"
                print(backend, change.__name__, n, result, flush=True)
        ids = [33, 33, None]
        ids[1] = Hostile(ids, clear, 70000)  # a bad id from __index__ is named by its value
        try:
            tok.decode(ids)
        except ValueError as e:
            print(backend, "bad", e)
""")


def test_decode_of_a_list_changed_during_decoding():
    proc = subprocess.run([sys.executable, "-c", MUTATING_DECODE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    c = [line.split(" ", 1)[1] for line in lines if line.startswith("c ")]
    python = [line.split(" ", 1)[1] for line in lines if line.startswith("python ")]
    assert len(c) == 13 and c == python
    assert "clear 10000 1 bytes b'\\x04'" in c  # id 5, then the list is empty
    assert f"grow 100 {1 + 99 + 1000} bytes b'\\x04  '" in c  # ids appended while decoding are decoded
    assert "refill 100 TypeError: token ids must be integers; item 1 is bytearray" in c
    assert "shrink_to_one 2 1 bytes b'\\x04'" in c
    assert "bad token id 70000 at position 1 is not in the vocabulary (ids 0..65529)" in c


def test_encode_many_takes_any_iterable_and_a_snapshot(tok):
    texts = ["abc", "é世界", b"\xff"]
    assert tok._core.encode_many(iter(texts)) == tok._core.encode_many(texts) == [tok.encode_bytes(
        t.encode() if isinstance(t, str) else t) for t in texts]


# --- finding 12: lenient decode ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["c", "python", "20b"])
@pytest.mark.parametrize("ids, message", [
    (b"\x05\x06", "sequence of integers, not bytes"), (bytearray(b"\x05"), "not bytearray"),
    (memoryview(b"\x05"), "not memoryview"), ("ab", "not str"), (True, "not bool"),
    ([True], r"not bool \(item 0\)"), ([5, False], r"not bool \(item 1\)"), ([5, 1.0], "item 1 is float"),
])
def test_decode_refuses_bytes_text_and_bools(which, ids, message, tok, pytok, neox):
    t = {"c": tok, "python": pytok, "20b": neox}[which]
    for decode in (t.decode, t.decode_bytes, t.stream_decoder().push):
        with pytest.raises(TypeError, match=message):
            decode(ids)


def test_compiled_decode_refuses_bytes_itself(tok):
    trie = tok._core  # the C Trie, without the Python wrapper's checks
    for ids in (b"\x05\x06", bytearray(b"\x05"), "ab"):
        with pytest.raises(TypeError, match="sequence of integers"):
            trie.decode(ids)
    with pytest.raises(TypeError, match="not bool"):
        trie.decode_bytes((1, True))


def test_numpy_ids_still_decode(tok, pytok, neox):
    np = pytest.importorskip("numpy")
    for t in (tok, pytok, neox):
        ids = t.encode("abc é")
        assert t.decode([np.int32(i) for i in ids]) == t.decode(np.array(ids)) == "abc é"
        with pytest.raises(TypeError, match="bool"):
            t.decode(np.array([True]))


# --- the vocabulary file: huge ids, binary files, long tokens -------------------------------------------


def _vocab(tmp_path, *lines: str, base: bool = True):
    path = tmp_path / "vocab.txt"
    head = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)] if base else []
    path.write_text("\n".join(head + list(lines)) + "\n", encoding="utf-8")
    return path, len(head) + len(lines)


@pytest.mark.parametrize("token_id, why", [
    ("999999999999", "larger than 16,777,215"), (str(MAX_TOKEN_ID + 1), "larger"), ("9" * 5000, "cannot parse"),
    ("-5", "negative"), ("7", "a duplicate"),
], ids=["1e12", "max+1", "5000-digits", "negative", "duplicate"])
def test_vocab_with_a_bad_id_names_file_and_line(tmp_path, token_id, why):
    path, lineno = _vocab(tmp_path, f"{token_id} 'ab' 2")
    with pytest.raises(ValueError, match=rf"vocab\.txt:{lineno}: .*{why}"):  # not MemoryError
        load_vocab(path)


def test_vocab_with_sparse_ids_works(tmp_path):
    path, _ = _vocab(tmp_path, "100000 'ab' 2")
    for backend in ("c", "python"):
        t = WorldTokenizer(path, backend=backend)
        assert t.encode("abab") == [100000, 100000] and t.decode([100000, 98]) == "aba"
        assert t.vocab_size == 100032
        with pytest.raises(ValueError, match="token id 99999 at position 0 .*0\\.\\.100000"):
            t.decode([99999])


def test_binary_vocab_file_names_file_and_line(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes(b"1 'a' 1\n2 'b' 1\n\xff\xfe\x00garbage\n")
    with pytest.raises(ValueError, match=r"vocab\.txt:3: not a UTF-8 text file \(byte 0xff\)"):
        WorldTokenizer(path)


def test_vocab_token_longer_than_the_trie_allows(tmp_path):
    path, lineno = _vocab(tmp_path, f"300 '{'a' * 5000}' 5000")
    for backend in ("c", "python"):  # both backends refuse it the same way, naming the line
        with pytest.raises(ValueError, match=rf"vocab\.txt:{lineno}: token 300 is 5000 bytes long \(at most 4096\)"):
            WorldTokenizer(path, backend=backend)


def test_vocab_without_all_bytes_names_the_file(tmp_path):
    path, _ = _vocab(tmp_path, "1 'a' 1", base=False)
    for backend in ("c", "python"):
        with pytest.raises(ValueError, match=r"vocab\.txt: the vocabulary has no token for the single byte 0x00"):
            WorldTokenizer(path, backend=backend)


# --- finding 15: special-token text in the 20B tokenizer --------------------------------------------------


@pytest.mark.parametrize("text", ["hello <|endoftext|> world", "a<|padding|>b", "<|endoftext|>", "x<|endoftext|>é 😀"])
def test_20b_special_token_text_is_plain_text(neox, text):
    ids = neox.encode(text)
    assert 0 not in ids and 1 not in ids  # user text cannot end a document
    assert neox.decode(ids) == text
    assert neox.encode_batch([text, text]) == neox.encode_batch([text, text], num_threads=1) == [ids, ids]
    assert neox.decode([*ids, neox.eot_id]) == text  # the control id is still an id, and decodes to nothing


def test_20b_keeps_its_space_tokens(neox):
    assert neox.encode("a     b\n\n   c") == [66, 50273, 67, 535, 50275, 68]


def test_lone_surrogates_raise_unicode_encode_error(tok, pytok, neox):
    """The same error from every tokenizer and entry point (the 20B library raised a TypeError)."""
    for t in (tok, pytok, neox):
        for encode in (t.encode, lambda s, t=t: t.encode_batch(["ok", s]), lambda s, t=t: t.encode_batch([s], 1)):
            with pytest.raises(UnicodeEncodeError):
                encode("a\ud800b")
