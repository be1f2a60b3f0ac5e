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

Conversations (`aviary data prepare`, format "chat") are JSON Lines too, one per line, in either shape:

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}          one user message and the assistant's reply

`read_conversations` gives each as a list of `aviary.chat_format.ChatMessage`; `is_chat_file` says whether a
JSON Lines file's first record is a conversation rather than a document with the text field.

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

from aviary.chat_format import ROLES, ChatMessage

__all__ = ["COMPRESSION_SUFFIXES", "FORMATS", "DataError", "check_input", "input_format", "is_chat_file",
           "open_binary", "read_conversations", "read_documents"]

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


def _json(line: bytes, path: str | os.PathLike, lineno: int) -> object:
    """One JSON Lines line, parsed."""
    text = _utf8(line, path, lineno)
    if lineno == 1:
        text = text.removeprefix("\ufeff")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(_name(path), f"not JSON ({e.msg} at column {e.colno})", lineno) from None
    except RecursionError:
        raise DataError(_name(path), "not JSON (nested too deeply)", lineno) from None


def _string(value: object, what: str, path: str | os.PathLike, lineno: int) -> str:
    """`value` if it is a string that is text (no lone surrogate); `what` names it in the error."""
    if not isinstance(value, str):
        raise DataError(_name(path), f"{what} is {_JSON_TYPES.get(type(value), 'no string')}, not a string", lineno)
    bad = SURROGATE.search(value)
    if bad:
        raise DataError(_name(path), f"{what} has a lone surrogate {bad.group()!r} at character {bad.start()}, "
                                     "which is not text", lineno)
    return value


def _jsonl_text(line: bytes, path: str | os.PathLike, lineno: int, field: str) -> str:
    """The string `field` of one JSON Lines line."""
    obj = _json(line, path, lineno)
    if not isinstance(obj, dict) or field not in obj:
        hint = " (it is a conversation: a file holds documents or conversations, not both)" if (
            isinstance(obj, dict) and _is_conversation(obj)) else ""
        raise DataError(_name(path), f"not a JSON object with a {field!r} field{hint}", lineno)
    return _string(obj[field], f"field {field!r}", path, lineno)


def _numbered_lines(f: BinaryIO, path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line) of an open file; a read error (truncated or corrupt compressed data) is a
    DataError naming the file and the last line read."""
    lineno = 0
    try:
        for lineno, line in enumerate(_lines(f), 1):
            yield lineno, line
    except _read_errors() as e:
        raise _read_error(path, e, lineno) from None


def _read_error(path: str | os.PathLike, e: BaseException, lineno: int = 0) -> DataError:
    suffix = compression(path)
    what = f"not a readable {suffix} file (truncated or corrupt?)" if suffix else "cannot read it"
    after = f" after line {lineno}" if lineno else ""
    return DataError(_name(path), f"{what}{after}: {e}")


def read_documents(path: str | os.PathLike, format: str = "auto", field: str = "text", *,
                   decode: bool = True) -> Iterator[str | bytes]:
    """The documents of one file, one at a time (see the module docstring for `format` and `decode`).
    Raises DataError naming the file and line."""
    fmt = input_format(path, format)
    with open_binary(path) as f:
        if fmt == "doc":
            try:
                data = f.read()
            except _read_errors() as e:
                raise _read_error(path, e) from None
            yield _utf8(data, path) if decode else data
            return
        for lineno, line in _numbered_lines(f, path):
            if fmt == "lines":
                yield _utf8(line, path, lineno) if decode else line
            elif line.strip():
                yield _jsonl_text(line, path, lineno, field)


# ---- conversations -------------------------------------------------------------------------------


def _is_conversation(obj: dict) -> bool:
    return "messages" in obj or "prompt" in obj or "completion" in obj


def _conversation(obj: object, path: str | os.PathLike, lineno: int) -> list[ChatMessage]:
    """One record of a chat file -> its messages, checked: known roles, string contents, at least one
    assistant message, and no empty reply."""
    def fail(problem: str) -> DataError:
        return DataError(_name(path), problem, lineno)

    shapes = '{"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "completion": ...}'
    if not isinstance(obj, dict) or not _is_conversation(obj):
        raise fail(f"not a conversation: a chat file holds one {shapes} per line")
    if "messages" in obj:
        if "prompt" in obj or "completion" in obj:
            raise fail("has both 'messages' and 'prompt'/'completion': give one conversation per line")
        items = obj["messages"]
        if not isinstance(items, list):
            raise fail(f"'messages' is {_JSON_TYPES.get(type(items), 'a string')}, not an array")
        if not items:
            raise fail("'messages' is empty")
        messages = []
        for j, m in enumerate(items, 1):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise fail(f"message {j} is not an object with 'role' and 'content'")
            if not isinstance(m["role"], str) or m["role"] not in ROLES:
                raise fail(f"message {j} has role {m['role']!r}; the roles are {', '.join(ROLES)}")
            reasoning = _string(m.get("reasoning_content", ""), f"message {j}'s reasoning_content", path, lineno)
            content = _string(m["content"], f"message {j}'s content", path, lineno)
            messages.append(ChatMessage(m["role"], content, reasoning))  # reasoning: a think block in g1
    else:
        missing = [k for k in ("prompt", "completion") if k not in obj]
        if missing:
            raise fail(f"has no {missing[0]!r}: a prompt/completion record needs both")
        messages = [ChatMessage("user", _string(obj["prompt"], "'prompt'", path, lineno)),
                    ChatMessage("assistant", _string(obj["completion"], "'completion'", path, lineno))]
    replies = [j for j, m in enumerate(messages, 1) if ROLES[m.role] == "Assistant"]
    if not replies:
        raise fail("has no assistant message: nothing to train on")
    empty = next((j for j in replies if not messages[j - 1].content.strip()), None)
    if empty is not None:
        raise fail(f"message {empty} is an empty assistant reply" if "messages" in obj else "'completion' is empty")
    return messages


def read_conversations(path: str | os.PathLike) -> Iterator[tuple[int, list[ChatMessage]]]:
    """(line number, messages) of every conversation in a chat file (JSON Lines; blank lines skipped).
    Raises DataError naming the file and line."""
    with open_binary(path) as f:
        for lineno, line in _numbered_lines(f, path):
            if line.strip():
                yield lineno, _conversation(_json(line, path, lineno), path, lineno)


def is_chat_file(path: str | os.PathLike, field: str = "text") -> bool:
    """Whether a JSON Lines file's first record is a conversation and has no `field` (a document). A file
    that cannot be read or parsed is not one: reading it as documents then reports the problem."""
    if str(path) == "-":
        return False  # stdin cannot be read twice
    try:
        with open_binary(path) as f:
            line = next((line for _, line in _numbered_lines(f, path) if line.strip()), None)
        obj = _json(line, path, 1) if line is not None else None
    except DataError:
        return False
    return isinstance(obj, dict) and field not in obj and _is_conversation(obj)


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
