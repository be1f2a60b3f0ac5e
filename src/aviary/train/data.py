"""Training data: the binidx format (Megatron `MMapIndexedDataset`, as RWKV-LM reads it) and `prepare`.

A dataset is two files with the same stem:

    NAME.bin   every document's token ids concatenated, each document followed by the end-of-document id 0
    NAME.idx   b"MMIDIDX\\x00\\x00", <Q version=1, <B dtype code (8 = uint16), <Q n_seq, <Q n_doc,
               int32 sizes[n_seq], int64 byte_pointers[n_seq], int64 doc_idx[n_doc]

The trainer treats `.bin` as one flat token stream and cuts windows of ctx_len+1 tokens from it, across
document boundaries (reference section 8.5). `prepare` turns text files and JSONL (`{"text": ...}` per line,
optionally compressed) into that format with the World tokenizer; the files are read by `aviary.textio`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aviary.textio import DataError, check_input, input_format, read_documents

__all__ = ["BinIdx", "DataError", "prepare", "read_documents", "write_binidx", "binidx_paths"]

MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float64,
               8: np.uint16}
EOT = 0  # end-of-document id of the World tokenizer (and of RWKV-LM's make_data.py)


def binidx_paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """'data/train' or 'data/train.bin' or 'data/train.idx' -> (data/train.bin, data/train.idx)."""
    p = Path(prefix)
    if p.suffix in (".bin", ".idx"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".bin"), p.with_name(p.name + ".idx")


# ---- binidx ------------------------------------------------------------------------------------


class BinIdx:
    """A read-only binidx dataset, memory-mapped. `len(ds)` is the number of tokens in the flat stream.

    `ds.get(offset, length)` -> int64 array of `length` tokens starting at token `offset` of the stream;
    `ds.document(i)` -> the tokens of document i (with its trailing 0).
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

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_documents(self) -> int:
        return len(self.sizes)

    def get(self, offset: int, length: int) -> np.ndarray:
        if offset < 0 or offset + length > len(self.tokens):
            raise IndexError(f"tokens [{offset}, {offset + length}) outside a stream of {len(self.tokens)}")
        return np.asarray(self.tokens[offset:offset + length], dtype=np.int64)

    def document(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start:start + int(self.sizes[i])], dtype=np.int64)


class BinIdxWriter:
    """Appends documents to NAME.bin.tmp and writes NAME.idx at `close()`; both files appear at once, by
    rename, only when everything was written (an interrupted run never leaves a half-written dataset)."""

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16):
        self.bin_path, self.idx_path = binidx_paths(prefix)
        for p in (self.bin_path, self.idx_path):
            if p.is_dir():
                raise DataError(p, "is a directory; choose another output name")
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.code = {np.dtype(v): k for k, v in DTYPE_CODES.items() if k != 7}[self.dtype]
        self._tmp_bin = self.bin_path.with_name(self.bin_path.name + ".tmp")
        self._f = open(self._tmp_bin, "wb")  # noqa: SIM115 (closed by close/abort)
        self.sizes: list[int] = []

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        """One document; the end-of-document id must already be at its end."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id out of range for {self.dtype} in document {len(self.sizes)}")
        self._f.write(arr.astype(self.dtype).tobytes())
        self.sizes.append(int(arr.size))

    def close(self) -> None:
        self._f.close()
        sizes = np.asarray(self.sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            pointers[1:] = np.cumsum(sizes[:-1].astype(np.int64)) * self.dtype.itemsize
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)  # Megatron: 0, then one entry per document end
        tmp_idx = self.idx_path.with_name(self.idx_path.name + ".tmp")
        try:
            with open(tmp_idx, "wb") as f:
                f.write(MAGIC + struct.pack("<QBQQ", 1, self.code, len(sizes), len(doc_idx)))
                f.write(sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes())
            os.replace(self._tmp_bin, self.bin_path)
            os.replace(tmp_idx, self.idx_path)
        except BaseException:
            self._tmp_bin.unlink(missing_ok=True)
            tmp_idx.unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        self._f.close()
        self._tmp_bin.unlink(missing_ok=True)


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


@dataclass
class PrepareReport:
    bin_path: Path
    idx_path: Path
    documents: int
    tokens: int
    characters: int


def _default_encoder(num_threads: int | None) -> Callable[[list[str]], list[list[int]]]:
    from aviary.tokenizer import WorldTokenizer

    tok = WorldTokenizer()
    return lambda texts: tok.encode_batch(texts, num_threads=num_threads)


def prepare(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *, num_threads: int | None = None,
            encode_batch: Callable[[list[str]], list[list[int]]] | None = None, batch_docs: int = 256,
            progress: bool = True, format: str = "auto", field: str = "text") -> PrepareReport:
    """Tokenize text/JSONL files into OUT.bin + OUT.idx (uint16, 0 after each document).

    Every input is checked (exists, non-empty, UTF-8) before any tokenizing starts. `format` and `field`
    say how a file splits into documents (`aviary.textio.read_documents`); empty documents are skipped.
    `encode_batch` defaults to the World tokenizer's `encode_batch` on `num_threads` threads (all cores
    when None).
    """
    from tqdm import tqdm

    if not inputs:
        raise DataError(out, "no input files given")
    for p in inputs:
        check_input(p)
        input_format(p, format)  # an unknown format: refused before any tokenizing too
    encode = encode_batch or _default_encoder(num_threads)
    total_bytes = sum(Path(p).stat().st_size for p in inputs)
    writer = BinIdxWriter(out)
    n_docs = n_tok = n_chars = 0
    try:
        # disable=None: no bar when stderr is not a terminal (a log file gets no carriage-return lines)
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing",
                  disable=None if progress else True) as bar:
            for p in inputs:
                batch: list[str] = []

                def flush(batch: list[str]) -> None:
                    nonlocal n_docs, n_tok, n_chars
                    for text, ids in zip(batch, encode(batch), strict=True):
                        writer.add(list(ids) + [EOT])
                        n_docs += 1
                        n_tok += len(ids) + 1
                        n_chars += len(text)
                    bar.set_postfix(docs=n_docs, tokens=n_tok)

                for text in read_documents(p, format, field):
                    if text:
                        batch.append(text)
                    if len(batch) >= batch_docs:
                        flush(batch)
                        batch = []
                flush(batch)
                bar.update(Path(p).stat().st_size)
        if n_docs == 0:
            raise DataError(inputs[0], "the inputs hold no documents with text")
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return PrepareReport(writer.bin_path, writer.idx_path, n_docs, n_tok, n_chars)
