"""What every Aviary tokenizer offers (`Tokenizer`), and the streaming decoder they share."""

from __future__ import annotations

import codecs
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """text <-> token ids. `WorldTokenizer` (RWKV-5/6/7, World RWKV-4) and `NeoXTokenizer` (RWKV-4 Pile)."""

    vocab_size: int  # rows of the model's embedding
    eot_id: int  # end of document; decodes to nothing

    def encode(self, text: str) -> list[int]: ...
    def encode_bytes(self, data: bytes) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def decode_bytes(self, ids: Iterable[int]) -> bytes: ...
    def stream_decoder(self) -> StreamDecoder: ...
    def __len__(self) -> int: ...


def id_list(ids: Iterable[int]) -> Sequence[int]:
    """ids as a list or tuple: also takes one int, any iterable, numpy arrays and torch tensors.

    Text and bytes are refused (TypeError): b"\\x05\\x06" iterates as the ints 5, 6, but it is not a list of ids.
    """
    if isinstance(ids, str | bytes | bytearray | memoryview | bool):
        raise TypeError(f"token ids must be a sequence of integers, not {type(ids).__name__}")
    if isinstance(ids, int):
        return [ids]
    if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
        ids = ids.tolist()
        return [ids] if isinstance(ids, int) else ids
    return ids if isinstance(ids, list | tuple) else list(ids)


def as_id(item: object, position: int) -> int:
    """One token id as an int (numpy ints through __index__); TypeError for bools and non-integers, with the
    same messages as the compiled decoder."""
    if isinstance(item, bool):
        raise TypeError(f"token ids must be integers, not bool (item {position})")
    try:
        return operator.index(item)
    except TypeError:
        raise TypeError(f"token ids must be integers; item {position} is {type(item).__name__}") from None


class StreamDecoder:
    """Turns ids arriving one by one into text, holding back bytes until they form whole UTF-8 characters.

    A token can end inside a multi-byte character ("😀" is three tokens in the World vocabulary), so
    decoding each token on its own would print replacement characters. `push` returns only complete
    text; `flush` returns what is left (an incomplete tail becomes U+FFFD) and starts over. The
    concatenation of everything returned equals `tokenizer.decode(all_ids)` however the ids are split.

        dec = tok.stream_decoder()
        for token in generated:
            print(dec.push(token), end="", flush=True)
        print(dec.flush())
    """

    def __init__(self, decode_bytes: Callable[[Iterable[int]], bytes]):
        self._decode_bytes = decode_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: int | Iterable[int]) -> str:
        """Add one id or several; return the text they complete. A bad id raises ValueError and changes nothing."""
        data = self._decode_bytes([ids] if isinstance(ids, int) else ids)
        return self._utf8.decode(data)

    def flush(self) -> str:
        """The held-back bytes (an incomplete character becomes U+FFFD); the decoder is then empty."""
        return self._utf8.decode(b"", final=True)

    @property
    def pending(self) -> bytes:
        """Bytes received but not yet returned as text (at most 3, the start of one character)."""
        return self._utf8.getstate()[0]
