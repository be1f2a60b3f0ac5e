"""The RWKV World tokenizer: greedy longest match over UTF-8 bytes, the same ids as the reference.

Vocabulary (`data/rwkv_vocab_v20230424.txt`): one token per line, `<id> <Python str or bytes literal>
<byte length>`, ids 1..65529; ids 1..256 are the single bytes 0x00..0xff, so every input can be encoded.
Id 0 is not in the file: it is end-of-document (`eot_id`), and decodes to nothing. The model's vocabulary
has 65536 rows (ids 65530..65535 are unused).

Encoding (reference: rwkv pip package, `rwkv_tokenizer.py` TRIE_TOKENIZER): no pre-splitting and no
normalisation. From the current byte, follow the byte trie of all tokens as far as the input allows;
the deepest node that ends a token is the next token; continue right after it.

Two backends with identical results, chosen explicitly:
    "c"       the compiled core (`_trie.c`, a double-array trie; encoding releases the GIL)
    "python"  `PythonTrie` below: the same algorithm in plain Python, the reference the C core is tested against
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aviary.tokenizer.base import StreamDecoder, as_id, id_list

DATA = Path(__file__).resolve().parent / "data"
WORLD_VOCAB = DATA / "rwkv_vocab_v20230424.txt"
BACKENDS = ("c", "python")
# Ids index arrays of the whole id range, so a file that names id 10**12 must be refused, not allocated; 2**24
# ids is 256 times the World vocabulary and costs at most about 0.5 GB. 4096 bytes is the compiled trie's limit.
MAX_TOKEN_ID = 2**24 - 1
MAX_TOKEN_BYTES = 4096


# ---------------------------------------------------------------------------------------------------
# The vocabulary file


def parse_literal(literal: str) -> bytes:
    """The bytes of one Python str or bytes literal as written by `repr` ('a\\n', "it's", b'\\xff'), without eval.

    A str literal is UTF-8 encoded. Escapes are resolved by the codecs Python itself uses for literals:
    `unicode_escape` for str (non-Latin-1 characters are first turned into \\u escapes, because that codec
    reads its input as Latin-1) and `escape_decode` for bytes.
    """
    is_bytes = literal[:1] == "b"
    quoted = literal[1:] if is_bytes else literal
    if len(quoted) < 2 or quoted[0] not in "'\"" or quoted[-1] != quoted[0]:
        raise ValueError(f"not a quoted str or bytes literal: {literal!r}")
    body = quoted[1:-1]
    if "\\" not in body:  # most lines: no escapes
        return body.encode("ascii" if is_bytes else "utf-8")
    if is_bytes:
        if not body.isascii():
            raise ValueError(f"non-ASCII character in a bytes literal: {literal!r}")
        return codecs.escape_decode(body.encode("ascii"))[0]
    return body.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("utf-8")


def load_vocab(path: str | os.PathLike) -> list[bytes | None]:
    """Read a World vocabulary file: index = id, bytes of the token; [0] is b"" (end of document), None for gaps.

    Every line is checked: id, literal and stated byte length; ids are unique. Raises ValueError naming
    the file and line.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{lineno}: not a UTF-8 text file (byte 0x{data[e.start]:02x}); "
                         "a World vocabulary is text, one token per line") from None
    by_id: dict[int, bytes] = {}
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            first, last = line.index(" "), line.rindex(" ")
            token_id, length = int(line[:first]), int(line[last + 1 :])
            token = parse_literal(line[first + 1 : last])
        except (ValueError, UnicodeError) as e:
            raise ValueError(f"{path}:{lineno}: cannot parse vocabulary line {line[:80]!r}: {e}") from None
        if len(token) != length:
            raise ValueError(f"{path}:{lineno}: token {token_id} has {len(token)} bytes, the line says {length}")
        if token_id in by_id or not 1 <= token_id <= MAX_TOKEN_ID:
            why = ("a duplicate" if token_id in by_id else "id 0 is reserved for end-of-document" if token_id == 0
                   else "negative" if token_id < 0 else f"larger than {MAX_TOKEN_ID:,}")
            raise ValueError(f"{path}:{lineno}: bad token id {token_id} ({why})")
        if length > MAX_TOKEN_BYTES:
            raise ValueError(f"{path}:{lineno}: token {token_id} is {length} bytes long (at most {MAX_TOKEN_BYTES})")
        by_id[token_id] = token
    if not by_id:
        raise ValueError(f"{path}: no tokens")
    tokens: list[bytes | None] = [None] * (max(by_id) + 1)
    tokens[0] = b""
    for token_id, token in by_id.items():
        tokens[token_id] = token
    return tokens


# ---------------------------------------------------------------------------------------------------
# The reference trie in Python


class PythonTrie:
    """Greedy longest match with a dict-per-node byte trie: the readable reference for `_trie.Trie`.

    Same interface as the compiled `Trie`: encode, encode_many, decode, decode_bytes. Where two ids
    spell the same bytes, encoding gives the larger id, as the reference (a bytes -> id dict) does.
    """

    def __init__(self, tokens: list[bytes | None]):
        self.tokens = tokens
        self.max_id = max(i for i, t in enumerate(tokens) if t is not None)
        self.children: list[dict[int, int]] = [{}]  # node -> {byte: child node}
        self.ids: list[int] = [-1]  # node -> token id ending at this node, -1 if none
        for token_id, token in enumerate(tokens):
            if not token:
                continue
            node = 0
            for byte in token:
                child = self.children[node].get(byte)
                if child is None:
                    child = len(self.ids)
                    self.children[node][byte] = child
                    self.children.append({})
                    self.ids.append(-1)
                node = child
            self.ids[node] = token_id
        missing = [b for b in range(256) if b not in self.children[0] or self.ids[self.children[0][b]] < 0]
        if missing:
            raise ValueError(f"the vocabulary has no token for the single byte 0x{missing[0]:02x} "
                             "(greedy matching needs all 256)")

    def encode(self, data: str | bytes) -> list[int]:
        if isinstance(data, str):
            data = data.encode("utf-8")
        children, ids = self.children, self.ids
        out, pos, n = [], 0, len(data)
        while pos < n:
            node, i, best, end = 0, pos, -1, pos
            while i < n:  # walk as deep as the bytes allow; remember the last node that ends a token
                node = children[node].get(data[i])
                if node is None:
                    break
                i += 1
                if ids[node] >= 0:
                    best, end = ids[node], i
            out.append(best)
            pos = end
        return out

    def encode_many(self, texts: Sequence[str | bytes]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        tokens, parts = self.tokens, []
        for position, item in enumerate(id_list(ids)):
            token_id = item if type(item) is int else as_id(item, position)
            token = tokens[token_id] if 0 <= token_id < len(tokens) else None
            if token is None:
                raise ValueError(f"token id {token_id!r} at position {position} is not in the vocabulary "
                                 f"(ids 0..{self.max_id})")
            parts.append(token)
        return b"".join(parts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------
# The tokenizer


def _compiled_trie():
    try:
        from aviary.tokenizer import _trie
    except ImportError as e:
        raise ImportError(
            "the compiled World tokenizer (aviary.tokenizer._trie) is not built; build it with "
            "`pip install -e .` in the Aviary checkout (needs a C compiler and the Python headers), "
            "or use WorldTokenizer(backend='python') (about 20x slower)") from e
    return _trie.Trie


class WorldTokenizer:
    """The RWKV World tokenizer (RWKV-5 "Eagle", RWKV-6 "Finch", RWKV-7 "Goose" and RWKV-4 World models).

        >>> tok = WorldTokenizer()
        >>> tok.encode("Hello, 世界 👋")
        [33155, 45, 33, 10267, 14610, 33, 3319, 146, 140]
        >>> tok.decode(_)
        'Hello, 世界 👋'

    vocab_path: a vocabulary file in the World format (default: the bundled rwkv_vocab_v20230424.txt).
    backend: "c" (compiled, default) or "python" (the plain reference). Both give identical ids.
    """

    eot_id: int = 0

    def __init__(self, vocab_path: str | os.PathLike | None = None, *, backend: str = "c"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.vocab_path = Path(vocab_path) if vocab_path is not None else WORLD_VOCAB
        self.backend = backend
        tokens = load_vocab(self.vocab_path)
        # embedding rows: ids rounded up to a multiple of 64, as RWKV models are trained (65530 -> 65536)
        self.vocab_size = -(-len(tokens) // 64) * 64
        trie = _compiled_trie() if backend == "c" else PythonTrie
        try:
            self._core = trie(tokens)
        except ValueError as e:  # a vocabulary without every single byte
            raise ValueError(f"{self.vocab_path}: {e}") from None

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"WorldTokenizer({str(self.vocab_path)!r}, backend={self.backend!r})"

    def encode(self, text: str) -> list[int]:
        """Token ids of a str (its UTF-8 bytes). A str with lone surrogates raises UnicodeEncodeError."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, not {type(text).__name__}; use encode_bytes for bytes")
        return self._core.encode(text)

    def encode_bytes(self, data: bytes | bytearray | memoryview) -> list[int]:
        """Token ids of raw bytes (any bytes, valid UTF-8 or not)."""
        if isinstance(data, str):
            raise TypeError("encode_bytes takes bytes; use encode for str")
        return self._core.encode(bytes(data) if self.backend == "python" else data)

    def encode_batch(self, texts: Iterable[str | bytes], num_threads: int | None = None) -> list[list[int]]:
        """encode() of every text, on `num_threads` threads (default: every core this process may use)."""
        texts = list(texts)
        if num_threads is None:
            num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        num_threads = max(1, min(int(num_threads or 1), len(texts)))
        if num_threads == 1 or self.backend == "python":  # the Python trie holds the GIL: threads would not help
            return self._core.encode_many(texts)
        with ThreadPoolExecutor(num_threads) as pool:
            parts = pool.map(self._core.encode_many, _balanced_groups(texts, 4 * num_threads))
            return [ids for part in parts for ids in part]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 become U+FFFD. Ids outside the vocabulary raise
        ValueError naming the id and its position; id 0 (end of document) decodes to nothing."""
        return self._core.decode(id_list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids` (exact even when the ids split a multi-byte character)."""
        return self._core.decode_bytes(id_list(ids))

    def stream_decoder(self) -> StreamDecoder:
        """An incremental decoder for ids that arrive one at a time (see StreamDecoder)."""
        return StreamDecoder(self.decode_bytes)


def _balanced_groups(texts: list, n_groups: int) -> list[list]:
    """Split texts, in order, into about n_groups runs of similar total length."""
    total = sum(len(t) for t in texts) or 1
    groups, current, size, target = [], [], 0, total / n_groups
    for t in texts:
        current.append(t)
        size += len(t)
        if size >= target:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups
