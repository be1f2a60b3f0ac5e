"""The GPT-NeoX "20B" tokenizer of RWKV-4 Pile/Raven models, through the `tokenizers` library.

Byte-level BPE with an NFC normaliser and no prefix space: 50,254 BPE tokens and 23 added tokens, ids
0..50276. Id 0 is `<|endoftext|>`, id 1 `<|padding|>` (both special: they decode to nothing, as in
`tokenizers`' default decode); ids 50254..50276 are runs of spaces. The reference (rwkv pip package)
encodes with `Tokenizer.from_file(path).encode(text).ids` and so does this class.

Text is NFC-normalised before encoding, so `decode(encode(s)) == s` only for NFC text.

Deviation from the reference: text that spells a special token ("<|endoftext|>", "<|padding|>") is encoded
as plain text (`tokenizers`' encode_special_tokens), not as the control ids 0 and 1, so that user text can
neither end a document nor lose those characters on a round trip. Put `eot_id` in the id list to end one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from aviary.tokenizer.base import StreamDecoder, as_id, id_list
from aviary.tokenizer.world import DATA

NEOX_TOKENIZER = DATA / "20B_tokenizer.json"


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE spells byte b as one printable character: b itself for printable Latin-1 bytes,
    U+0100 onwards, in byte order, for the rest. Returns character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[chr(b)] = b
        else:
            alphabet[chr(256 + extra)] = b
            extra += 1
    return alphabet


def _utf8_text(data: bytes) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"the 20B tokenizer encodes text, and these bytes are not UTF-8: {e}") from None


class NeoXTokenizer:
    """The 20B tokenizer with the same interface as WorldTokenizer (see aviary.tokenizer.Tokenizer)."""

    eot_id: int = 0

    def __init__(self, path: str | os.PathLike | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path) if path is not None else NEOX_TOKENIZER
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises its own Exception type for a missing or bad file
            raise ValueError(f"{self.path}: cannot read a tokenizers JSON file: {e}") from None
        try:
            self._tok.encode_special_tokens = True  # "<|endoftext|>" in text is text (see the module docstring)
        except AttributeError:
            raise ImportError("the 20B tokenizer needs tokenizers>=0.15.1 (for encode_special_tokens)") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # id -> bytes: BPE tokens through the byte-level alphabet, added tokens as their text, specials as b""
        alphabet = _byte_level_alphabet()
        self._bytes: list[bytes | None] = [None] * self.vocab_size
        for token, i in self._tok.get_vocab(with_added_tokens=False).items():
            self._bytes[i] = bytes(alphabet[ch] for ch in token)
        for i, added in self._tok.get_added_tokens_decoder().items():
            self._bytes[i] = b"" if added.special else added.content.encode("utf-8")
        self._max_id = max(i for i, b in enumerate(self._bytes) if b is not None)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"NeoXTokenizer({str(self.path)!r})"

    def encode(self, text: str) -> list[int]:
        """Token ids of a str. A str with lone surrogates raises UnicodeEncodeError (as WorldTokenizer does)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, not {type(text).__name__}; use encode_bytes for bytes")
        try:
            return self._tok.encode(text).ids
        except TypeError:  # the library's error for a str it cannot convert to UTF-8: a lone surrogate
            text.encode("utf-8")  # raises UnicodeEncodeError
            raise

    def encode_bytes(self, data: bytes) -> list[int]:
        """The 20B tokenizer encodes text: `data` must be UTF-8 (ValueError otherwise)."""
        return self._tok.encode(_utf8_text(data)).ids

    def encode_batch(self, texts: Iterable[str | bytes], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts (bytes must be UTF-8); `tokenizers` uses all cores (set RAYON_NUM_THREADS to limit
        them); num_threads=1 encodes one by one on this thread."""
        texts = [t if isinstance(t, str) else _utf8_text(t) for t in texts]
        if num_threads == 1:
            return [self.encode(t) for t in texts]
        try:
            return [e.ids for e in self._tok.encode_batch(texts)]
        except TypeError:  # as in encode: find the text with a lone surrogate
            for t in texts:
                t.encode("utf-8")
            raise

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table, parts = self._bytes, []
        for position, item in enumerate(id_list(ids)):
            token_id = item if type(item) is int else as_id(item, position)
            token = table[token_id] if 0 <= token_id < len(table) else None
            if token is None:
                raise ValueError(f"token id {token_id!r} at position {position} is not in the vocabulary "
                                 f"(ids 0..{self._max_id})")
            parts.append(token)
        return b"".join(parts)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (invalid UTF-8 becomes U+FFFD), the same as `tokenizers`' decode."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self.decode_bytes)
