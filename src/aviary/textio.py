"""Input documents: the one reader of text files behind `aviary tokenize`, `aviary data prepare` and the
evaluation commands. Standard library only (the commands' `--help` imports no torch).

A file is read according to its name:

    compressed:  by suffix, in any case: .gz, .bz2, .xz or .lzma, .zst (needs the `zstandard` package);
                 "-" reads stdin (uncompressed)
    format:      "auto"   JSON Lines for *.jsonl, *.ndjson and *.json (before a compression suffix; JSONL is
                          often named .json), otherwise "doc"
                 "doc"    the whole file is one document
                 "lines"  every line is one document, without its "\\n" (an empty line is an empty document)
                 "jsonl"  one JSON object per line, the document is its string `field` ("text"); blank lines
                          are skipped, a UTF-8 byte order mark before the first line is allowed

Documents are str, decoded as UTF-8 (strictly); with `decode=False`, "doc" and "lines" give the file's
bytes as they are (`aviary tokenize`: any bytes, and a byte-exact round trip). JSONL text is always str.

Every problem is a `DataError` naming the file and, where there is one, the line (`path:line: problem`):
no such file, truncated or corrupt compressed data (with the last line read), a line that is not JSON or
has no string `field`, text that is not UTF-8, a lone surrogate ("\\ud800" in JSON is no character, and
no tokenizer can take it).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import lzma
import os
import re
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["COMPRESSION_SUFFIXES", "FORMATS", "DataError", "check_input", "input_format", "open_binary",
           "read_documents"]

COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".lzma", ".zst")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
FORMATS = ("auto", "doc", "lines", "jsonl")
SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's "\ud800" escape: not a character, not encodable as UTF-8


class DataError(ValueError):
    """A data file that is missing, empty, not UTF-8 or not in the expected format; names the file (and
    the line, where there is one)."""

    def __init__(self, path: str | os.PathLike, problem: str, line: int | None = None):
        self.path, self.line = str(path), line
        super().__init__(f"{path}{f':{line}' if line else ''}: {problem}")


def _name(path: str | os.PathLike) -> str:
    return "stdin" if str(path) == "-" else str(path)


def compression(path: str | os.PathLike) -> str | None:
    """The compression suffix of `path` (".gz", ...), or None."""
    name = str(path).lower()
    return next((s for s in COMPRESSION_SUFFIXES if name.endswith(s)), None)


def input_format(path: str | os.PathLike, format: str = "auto") -> str:
    """"doc", "lines" or "jsonl": `format`, or for "auto" the one `path`'s name says."""
    if format not in FORMATS:
        raise ValueError(f"unknown input format {format!r}; choose one of {', '.join(FORMATS)}")
    if format != "auto":
        return format
    name = str(path).lower().removesuffix(compression(path) or "")
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "doc"


def _decompressed(raw: BinaryIO, suffix: str, path: str | os.PathLike) -> BinaryIO:
    if suffix == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if suffix == ".bz2":
        return bz2.BZ2File(raw)
    if suffix in (".xz", ".lzma"):
        return lzma.LZMAFile(raw)
    try:
        import zstandard
    except ImportError:
        raise DataError(path, "reading .zst needs the `zstandard` package (pip install zstandard)") from None
    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a truncated or corrupt (compressed) file raises while it is read."""
    errors = (OSError, EOFError, lzma.LZMAError, zlib.error)
    zstd = sys.modules.get("zstandard")  # imported by _decompressed when a .zst file is read
    return (*errors, zstd.ZstdError) if zstd is not None else errors


@contextlib.contextmanager
def open_binary(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """`path`'s bytes, decompressed by its suffix; "-" is stdin. A missing file or a directory is a
    DataError; errors while reading are the decompressor's (`read_documents` names them)."""
    if str(path) == "-":
        yield sys.stdin.buffer
        return
    try:
        raw = open(path, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        raise DataError(path, "no such file") from None
    except IsADirectoryError:
        raise DataError(path, "not a file (a directory)") from None
    with raw:
        suffix = compression(path)
        if suffix is None:
            yield raw
            return
        with _decompressed(raw, suffix, path) as f:
            yield f


def _lines(f: BinaryIO, block: int = 1 << 16) -> Iterator[bytes]:
    """The lines of a binary stream without their b"\\n"; a last line without one is a line too. (Read by
    blocks: not every decompressor's stream has readline.)"""
    pending: list[bytes] = []
    while chunk := f.read(block):
        *done, rest = chunk.split(b"\n")
        if done:
            done[0] = b"".join([*pending, done[0]])
            pending = []
            yield from done
        pending.append(rest)
    if any(pending):
        yield b"".join(pending)


def _utf8(data: bytes, path: str | os.PathLike, line: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = " of the line" if line else ""
        raise DataError(_name(path), f"not UTF-8 text (byte {e.start}{where}: {data[e.start:e.start + 1]!r})",
                        line) from None


_JSON_TYPES = {dict: "an object", list: "an array", bool: "a boolean", int: "a number", float: "a number",
               type(None): "null"}


def _jsonl_text(line: bytes, path: str | os.PathLike, lineno: int, field: str) -> str:
    """The string `field` of one JSON Lines line."""
    text = _utf8(line, path, lineno)
    if lineno == 1:
        text = text.removeprefix("\ufeff")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(_name(path), f"not JSON ({e.msg} at column {e.colno})", lineno) from None
    except RecursionError:
        raise DataError(_name(path), "not JSON (nested too deeply)", lineno) from None
    if not isinstance(obj, dict) or field not in obj:
        raise DataError(_name(path), f"not a JSON object with a {field!r} field", lineno)
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(_name(path), f"field {field!r} is {_JSON_TYPES.get(type(value), 'no string')}, not a "
                                     "string", lineno)
    bad = SURROGATE.search(value)
    if bad:
        raise DataError(_name(path), f"field {field!r} has a lone surrogate {bad.group()!r} at character "
                                     f"{bad.start()}, which is not text", lineno)
    return value


def read_documents(path: str | os.PathLike, format: str = "auto", field: str = "text", *,
                   decode: bool = True) -> Iterator[str | bytes]:
    """The documents of one file, one at a time (see the module docstring for `format` and `decode`).
    Raises DataError naming the file and line."""
    fmt = input_format(path, format)
    lineno = 0
    with open_binary(path) as f:
        try:
            if fmt == "doc":
                data = f.read()
                yield _utf8(data, path) if decode else data
                return
            for lineno, line in enumerate(_lines(f), 1):
                if fmt == "lines":
                    yield _utf8(line, path, lineno) if decode else line
                elif line.strip():
                    yield _jsonl_text(line, path, lineno, field)
        except _read_errors() as e:
            suffix = compression(path)
            what = f"not a readable {suffix} file (truncated or corrupt?)" if suffix else "cannot read it"
            after = f" after line {lineno}" if lineno else ""
            raise DataError(_name(path), f"{what}{after}: {e}") from None


def check_input(path: str | os.PathLike) -> None:
    """Cheap checks before a long job reads a file (`aviary data prepare` checks every input before it
    tokenizes any): it exists, is not empty, and starts as text in UTF-8."""
    p = Path(path)
    if not p.exists():
        raise DataError(p, "no such file")
    if not p.is_file():
        raise DataError(p, "not a file")
    if p.stat().st_size == 0:
        raise DataError(p, "the file is empty")
    try:
        with open_binary(p) as f:
            head = f.read(1 << 16)
    except _read_errors() as e:
        raise DataError(p, f"cannot read it: {e}") from None
    if not head.strip():
        raise DataError(p, "the file holds no text")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # a multi-byte character cut by the 64 KiB read is fine
            raise DataError(p, f"not UTF-8 text (byte {e.start}: {head[e.start:e.start + 1]!r})") from None
