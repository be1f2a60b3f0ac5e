"""Training data: the binidx format (Megatron `MMapIndexedDataset`, as RWKV-LM reads it), its loss mask, and
`prepare`.

A dataset is two files with the same stem, and a third for chat data:

    NAME.bin   every document's token ids concatenated, each document followed by the end-of-document id 0
    NAME.idx   b"MMIDIDX\\x00\\x00", <Q version=1, <B dtype code (8 = uint16), <Q n_seq, <Q n_doc,
               int32 sizes[n_seq], int64 byte_pointers[n_seq], int64 doc_idx[n_doc]
    NAME.mask  b"AVYMASK\\x00", <Q version=1, <Q n_tokens, <Q crc32 of NAME.idx's sizes array (which documents
               it masks), then uint8 mask[n_tokens] (Aviary's, optional): mask[i] = 1 when token i of the stream
               is a training target (the loss of predicting it from the tokens before it counts), 0 when it is
               only context

The trainer treats `.bin` as one flat token stream and cuts windows of ctx_len+1 tokens from it, across
document boundaries (reference section 8.5): inputs x = tokens[o:o+T], targets y = tokens[o+1:o+T+1],
weighted by mask[o+1:o+T+1]. Without NAME.mask (plain text, RWKV-LM's own files) every token is a target.
`prepare` turns text files and JSONL (`{"text": ...}` per line, optionally compressed) into that format
with the World tokenizer, and chat JSONL (`{"messages": [...]}`, `{"prompt", "completion"}`) too: each
conversation rendered in a chat format of `aviary.chat_format` (RWKV World unless `chat_format` names
another; the server's function, segment by segment), masked so that only the assistant's replies are targets.
The files are read by `aviary.textio`.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aviary.chat_format import ChatFormat, get_format
from aviary.textio import DataError, check_input, input_format, is_chat_file, read_conversations, read_documents

__all__ = ["BinIdx", "DataError", "prepare", "read_documents", "write_binidx", "binidx_paths", "mask_path"]

MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float64,
               8: np.uint16}
EOT = 0  # end-of-document id of the World tokenizer (and of RWKV-LM's make_data.py)
MASK_MAGIC = b"AVYMASK\x00"
MASK_HEADER = struct.Struct("<8sQQQ")  # magic, version, n_tokens, crc32(sizes): 32 bytes, then a byte per token


def _stem(prefix: str | os.PathLike) -> Path:
    p = Path(prefix)
    return p.with_suffix("") if p.suffix in (".bin", ".idx", ".mask") else p


def binidx_paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """'data/train' or 'data/train.bin' or 'data/train.idx' -> (data/train.bin, data/train.idx)."""
    p = _stem(prefix)
    return p.with_name(p.name + ".bin"), p.with_name(p.name + ".idx")


def mask_path(prefix: str | os.PathLike) -> Path:
    """'data/train' (or .bin, .idx) -> data/train.mask, the loss mask of a chat dataset."""
    p = _stem(prefix)
    return p.with_name(p.name + ".mask")


# ---- binidx ------------------------------------------------------------------------------------


class BinIdx:
    """A read-only binidx dataset, memory-mapped. `len(ds)` is the number of tokens in the flat stream.

    `ds.get(offset, length)` -> int64 array of `length` tokens starting at token `offset` of the stream;
    `ds.document(i)` -> the tokens of document i (with its trailing 0);
    `ds.get_mask(offset, length)` -> bool array, True where the token is a training target (all True when
    the dataset has no NAME.mask); `ds.mask` is the uint8 memmap, or None.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.bin_path, self.idx_path = binidx_paths(prefix)
        for p in (self.bin_path, self.idx_path):
            if not p.is_file():
                raise DataError(p, "no such file (a binidx dataset is NAME.bin + NAME.idx; "
                                   "make one with `aviary data prepare`)")
        with open(self.idx_path, "rb") as f:
            head = f.read(9 + 8 + 1 + 8 + 8)
            if len(head) < 34 or head[:9] != MAGIC:
                raise DataError(self.idx_path, "not a binidx index (bad magic; expected MMIDIDX)")
            version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != 1 or code not in DTYPE_CODES:
            raise DataError(self.idx_path, f"unsupported index version {version} or dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        needed, have = 34 + 12 * n_seq + 8 * n_doc, os.path.getsize(self.idx_path)
        if have < needed:
            raise DataError(self.idx_path, f"lists {n_seq:,} documents and {n_doc:,} document ends, which take "
                                           f"{needed:,} bytes, but the file has {have:,} (truncated or corrupt)")
        idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        off = 34
        self.sizes = np.frombuffer(idx, dtype=np.int32, count=n_seq, offset=off)
        off += 4 * n_seq
        self.pointers = np.frombuffer(idx, dtype=np.int64, count=n_seq, offset=off)
        off += 8 * n_seq
        self.doc_idx = np.frombuffer(idx, dtype=np.int64, count=n_doc, offset=off)
        n_bytes = os.path.getsize(self.bin_path)
        if n_bytes == 0:
            raise DataError(self.bin_path, "empty token file")
        if n_bytes % self.dtype.itemsize:
            raise DataError(self.bin_path, f"{n_bytes:,} bytes is not a whole number of {self.dtype} tokens "
                                           "(truncated or corrupt)")
        if n_seq and self.sizes.min() < 0:
            i = int(self.sizes.argmin())
            raise DataError(self.idx_path, f"document {i} has a negative size ({int(self.sizes[i])})")
        if n_seq and (self.pointers.min() < 0 or self.pointers.max() > n_bytes  # (no overflow in the sum below)
                      or (self.pointers + self.sizes.astype(np.int64) * self.dtype.itemsize).max() > n_bytes):
            raise DataError(self.idx_path, f"a document pointer lies outside {self.bin_path.name} (corrupt index)")
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        expected = int(self.sizes.sum(dtype=np.int64)) if n_seq else 0
        if expected != len(self.tokens):
            raise DataError(self.bin_path, f"holds {len(self.tokens)} tokens but the index lists {expected}")
        self.mask_path = mask_path(prefix)
        self.mask: np.ndarray | None = _open_mask(self.mask_path, len(self.tokens), _sizes_crc(self.sizes)) \
            if self.mask_path.exists() else None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def has_mask(self) -> bool:
        return self.mask is not None

    @property
    def n_documents(self) -> int:
        return len(self.sizes)

    def get(self, offset: int, length: int) -> np.ndarray:
        if offset < 0 or offset + length > len(self.tokens):
            raise IndexError(f"tokens [{offset}, {offset + length}) outside a stream of {len(self.tokens)}")
        return np.asarray(self.tokens[offset:offset + length], dtype=np.int64)

    def get_mask(self, offset: int, length: int) -> np.ndarray:
        """Whether each of tokens [offset, offset + length) is a training target (bool; all True without
        a mask). A window x = get(o, T), y = get(o + 1, T) weights its losses by get_mask(o + 1, T)."""
        if offset < 0 or offset + length > len(self.tokens):
            raise IndexError(f"tokens [{offset}, {offset + length}) outside a stream of {len(self.tokens)}")
        if self.mask is None:
            return np.ones(length, dtype=bool)
        return np.asarray(self.mask[offset:offset + length], dtype=bool)

    def document(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start:start + int(self.sizes[i])], dtype=np.int64)

    def document_mask(self, i: int) -> np.ndarray:
        """get_mask over document i."""
        return self.get_mask(int(self.pointers[i]) // self.dtype.itemsize, int(self.sizes[i]))


def _sizes_crc(sizes: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(sizes, dtype="<i4").tobytes())


def _open_mask(path: Path, n_tokens: int, sizes_crc: int, chunk: int = 1 << 24) -> np.ndarray:
    """NAME.mask as a uint8 memmap, checked against the dataset (token count, document sizes) and every
    byte 0 or 1 (one pass over the file, in chunks of `chunk` bytes)."""
    if not path.is_file():
        raise DataError(path, "is not a file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(MASK_HEADER.size)
    if len(head) < MASK_HEADER.size or head[:8] != MASK_MAGIC:
        raise DataError(path, "not a loss mask (bad magic; expected AVYMASK; made by `aviary data prepare`)")
    _, version, n, crc = MASK_HEADER.unpack(head)
    if version != 1:
        raise DataError(path, f"unsupported mask version {version}")
    if n != n_tokens or size != MASK_HEADER.size + n:
        raise DataError(path, f"masks {n:,} tokens in {size - MASK_HEADER.size:,} bytes, but the dataset has "
                              f"{n_tokens:,} tokens (a mask of another dataset, or truncated)")
    if crc != sizes_crc:
        raise DataError(path, "was written for documents of other sizes than the index lists (a mask of "
                              "another dataset)")
    mask = np.memmap(path, dtype=np.uint8, mode="r", offset=MASK_HEADER.size, shape=(n,))
    for start in range(0, n, chunk):
        part = mask[start:start + chunk]
        if part.max() > 1:
            at = start + int(np.argmax(part > 1))
            raise DataError(path, f"token {at:,} has mask value {int(mask[at])}; a mask holds only 0 and 1")
    return mask


class BinIdxWriter:
    """Appends documents to NAME.bin.tmp (and their loss mask to NAME.mask.tmp, with `mask=True`) and writes
    NAME.idx at `close()`; the files appear by rename only when everything was written (an interrupted run
    never leaves a half-written dataset). A dataset written without a mask removes a NAME.mask left by an
    earlier dataset of the same name."""

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16, *, mask: bool = False):
        self.bin_path, self.idx_path = binidx_paths(prefix)
        self.mask_path = mask_path(prefix)
        for p in (self.bin_path, self.idx_path, self.mask_path):
            if p.is_dir():
                raise DataError(p, "is a directory; choose another output name")
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.code = {np.dtype(v): k for k, v in DTYPE_CODES.items() if k != 7}[self.dtype]
        self._tmp_bin = self.bin_path.with_name(self.bin_path.name + ".tmp")
        self._tmp_mask = self.mask_path.with_name(self.mask_path.name + ".tmp")
        self._f = open(self._tmp_bin, "wb")  # noqa: SIM115 (closed by close/abort)
        self.writes_mask = mask
        self._m = None
        if mask:
            self._m = open(self._tmp_mask, "wb")  # noqa: SIM115 (closed by close/abort)
            self._m.write(MASK_HEADER.pack(MASK_MAGIC, 1, 0, 0))  # the counts are filled in by close()
        self.sizes: list[int] = []

    def add(self, ids: Sequence[int] | np.ndarray, mask: Sequence[int] | np.ndarray | None = None) -> None:
        """One document; the end-of-document id must already be at its end. `mask` (0/1 per token) is
        required when the writer writes a mask, refused otherwise."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id out of range for {self.dtype} in document {len(self.sizes)}")
        if (mask is None) != (self._m is None):
            raise ValueError(f"document {len(self.sizes)}: a mask is {'required' if mask is None else 'given'} "
                             f"but the dataset is written {'with' if mask is None else 'without'} one")
        if mask is not None:
            m = np.asarray(mask)
            if m.shape != arr.shape or (m.size and (m.min() < 0 or m.max() > 1)):
                raise ValueError(f"document {len(self.sizes)}: the mask must be 0/1, one per token")
            self._m.write(m.astype(np.uint8).tobytes())
        self._f.write(arr.astype(self.dtype).tobytes())
        self.sizes.append(int(arr.size))

    def close(self) -> None:
        self._f.close()
        sizes = np.asarray(self.sizes, dtype=np.int32)
        if self._m is not None:
            self._m.seek(0)
            self._m.write(MASK_HEADER.pack(MASK_MAGIC, 1, sum(self.sizes), _sizes_crc(sizes)))
            self._m.close()
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            pointers[1:] = np.cumsum(sizes[:-1].astype(np.int64)) * self.dtype.itemsize
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)  # Megatron: 0, then one entry per document end
        tmp_idx = self.idx_path.with_name(self.idx_path.name + ".tmp")
        try:
            with open(tmp_idx, "wb") as f:
                f.write(MAGIC + struct.pack("<QBQQ", 1, self.code, len(sizes), len(doc_idx)))
                f.write(sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes())
            # the mask first: a run stopped between renames leaves a mask that does not fit the old index
            # (refused when read), never new tokens without their mask (silently trained on every token)
            if self._m is not None:
                os.replace(self._tmp_mask, self.mask_path)
            else:
                self.mask_path.unlink(missing_ok=True)
            os.replace(self._tmp_bin, self.bin_path)
            os.replace(tmp_idx, self.idx_path)
        except BaseException:
            for p in (self._tmp_bin, tmp_idx, self._tmp_mask):
                p.unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        self._f.close()
        self._tmp_bin.unlink(missing_ok=True)
        if self._m is not None:
            self._m.close()
            self._tmp_mask.unlink(missing_ok=True)


def write_binidx(prefix: str | os.PathLike, documents: Iterable[Sequence[int]]) -> tuple[Path, Path]:
    """Write token-id documents (each already ending with 0) as a uint16 binidx dataset."""
    w = BinIdxWriter(prefix)
    try:
        for doc in documents:
            w.add(doc)
    except BaseException:
        w.abort()
        raise
    w.close()
    return w.bin_path, w.idx_path


# ---- prepare -------------------------------------------------------------------------------------


CHAT = "chat"  # the input format of conversations, beside aviary.textio.FORMATS


@dataclass
class PrepareReport:
    bin_path: Path
    idx_path: Path
    documents: int  # conversations included
    tokens: int
    characters: int
    conversations: int = 0
    targets: int = 0  # tokens the loss trains on (all of them without a mask)
    mask_path: Path | None = None


def _default_encoder(num_threads: int | None) -> Callable[[list[str]], list[list[int]]]:
    from aviary.tokenizer import WorldTokenizer

    tok = WorldTokenizer()
    return lambda texts: tok.encode_batch(texts, num_threads=num_threads)


def file_format(path: str | os.PathLike, format: str = "auto", field: str = "text") -> str:
    """"chat", or the text format `aviary.textio.input_format` gives: `format` when it is not "auto";
    for "auto", "chat" when a JSON Lines file's first record is a conversation without `field`."""
    if format == CHAT:
        return CHAT
    fmt = input_format(path, format)
    return CHAT if format == "auto" and fmt == "jsonl" and is_chat_file(path, field) else fmt


# A document to write: its segments, each tokenized on its own, with whether the segment's tokens are targets,
# and whether the closing end-of-document id is one.
Segments = list[tuple[str, bool]]


def _documents(path: str | os.PathLike, fmt: str, field: str,
               chat_format: ChatFormat) -> Iterable[tuple[Segments, bool]]:
    if fmt == CHAT:
        # only the replies are targets; the end-of-document id is not: a reply ends with its blank line
        # (the server's stop string), and the model never has to write the id after it
        for _, messages in read_conversations(path):
            yield chat_format.segments(messages, reply_prompt=False), False
    else:
        for text in read_documents(path, fmt, field):
            if text:
                yield [(text, True)], True  # text: every token, as without a mask


def prepare(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *, num_threads: int | None = None,
            encode_batch: Callable[[list[str]], list[list[int]]] | None = None, batch_docs: int = 256,
            progress: bool = True, format: str = "auto", field: str = "text",
            chat_format: str | ChatFormat = "world") -> PrepareReport:
    """Tokenize text/JSONL/chat files into OUT.bin + OUT.idx (uint16, 0 after each document), and OUT.mask
    when an input holds conversations.

    Every input is checked (exists, non-empty, UTF-8) before any tokenizing starts. `format` and `field`
    say how a file splits into documents (`aviary.textio.read_documents`; "chat" or a JSONL file whose
    first record is a conversation: `file_format`); empty documents are skipped. A conversation is rendered
    in `chat_format` (`aviary.chat_format.ChatFormat.segments`), each segment tokenized on its own, and only
    its assistant replies are targets in OUT.mask; text documents in the same dataset are targets throughout.
    `encode_batch` defaults to the World tokenizer's `encode_batch` on `num_threads` threads (all cores when None).
    """
    from tqdm import tqdm

    if not inputs:
        raise DataError(out, "no input files given")
    formats = []
    for p in inputs:
        check_input(p)
        formats.append(file_format(p, format, field))  # an unknown format: refused before any tokenizing too
    chat_format = get_format(chat_format)
    encode = encode_batch or _default_encoder(num_threads)
    total_bytes = sum(Path(p).stat().st_size for p in inputs)
    writer = BinIdxWriter(out, mask=CHAT in formats)
    n_docs = n_chats = n_tok = n_chars = n_targets = 0

    def flush(batch: list[tuple[Segments, bool]], chat: bool) -> None:
        nonlocal n_docs, n_chats, n_tok, n_chars, n_targets
        encoded = iter(encode([text for segments, _ in batch for text, _ in segments]))
        for segments, eot_target in batch:
            ids, mask = [], []
            for text, target in segments:
                seg_ids = list(next(encoded))
                ids += seg_ids
                mask += [int(target)] * len(seg_ids)
                n_chars += len(text)
            ids.append(EOT)
            mask.append(int(eot_target))
            writer.add(ids, mask if writer.writes_mask else None)
            n_docs, n_chats, n_tok, n_targets = n_docs + 1, n_chats + chat, n_tok + len(ids), n_targets + sum(mask)

    try:
        # disable=None: no bar when stderr is not a terminal (a log file gets no carriage-return lines)
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing",
                  disable=None if progress else True) as bar:
            for p, fmt in zip(inputs, formats, strict=True):
                batch: list[tuple[Segments, bool]] = []
                for doc in _documents(p, fmt, field, chat_format):
                    batch.append(doc)
                    if len(batch) >= batch_docs:
                        flush(batch, fmt == CHAT)
                        batch = []
                        bar.set_postfix(docs=n_docs, tokens=n_tok)
                flush(batch, fmt == CHAT)
                bar.update(Path(p).stat().st_size)
        if n_docs == 0:
            raise DataError(inputs[0], "the inputs hold no documents with text")
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return PrepareReport(writer.bin_path, writer.idx_path, n_docs, n_tok, n_chars, n_chats, n_targets,
                         writer.mask_path if writer.writes_mask else None)
