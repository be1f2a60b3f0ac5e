"""The one reader of input documents (aviary.textio), which `aviary tokenize` and `aviary data prepare` share:
formats, compression by suffix, bytes or text, and errors that name the file and line."""

import bz2
import gzip
import io
import json
import lzma
import sys

import pytest

from aviary.cli import main
from aviary.textio import DataError, check_input, input_format, read_documents

DOCS = ["Hello, 世界 👋", "", "line one\nline two\r\n", "The end"]


def jsonl(docs, field="text") -> bytes:
    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def zstd_compress(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data[:20]) + zstandard.ZstdCompressor().compress(data[20:])  # 2 frames


COMPRESSORS = [("", lambda b: b), (".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress),
               (".lzma", lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE)), (".GZ", gzip.compress),
               (".zst", zstd_compress)]


@pytest.mark.parametrize("suffix, compress", COMPRESSORS, ids=[s or "plain" for s, _ in COMPRESSORS])
def test_every_compression_gives_the_same_documents(tmp_path, suffix, compress):
    path = tmp_path / f"docs.jsonl{suffix}"
    path.write_bytes(compress(jsonl(DOCS)))
    assert list(read_documents(path)) == DOCS
    text = tmp_path / f"notes.txt{suffix}"
    text.write_bytes(compress("\n".join(DOCS).encode()))
    assert list(read_documents(text)) == ["\n".join(DOCS)]
    assert list(read_documents(text, "lines")) == "\n".join(DOCS).split("\n")
    check_input(path)


def test_formats_by_name_and_by_choice(tmp_path):
    assert [input_format(n) for n in ("a.jsonl", "a.NDJSON.gz", "a.json.zst", "a.txt.xz", "a.jsonl.txt", "-")] == \
        ["jsonl", "jsonl", "jsonl", "doc", "doc", "doc"]
    assert input_format("a.jsonl", "doc") == "doc"
    with pytest.raises(ValueError, match="unknown input format 'csv'"):
        input_format("a.csv", "csv")
    path = tmp_path / "docs.txt"
    path.write_bytes(jsonl(DOCS, field="body"))
    assert list(read_documents(path, "jsonl", "body")) == DOCS
    assert list(read_documents(path, "lines")) == [line.decode() for line in jsonl(DOCS, field="body").splitlines()]


def test_bytes_as_they_are_or_strict_utf8(tmp_path):
    data = b"caf\xc3\xa9\r\n\xff\xfe raw\n\nlast"
    path = tmp_path / "raw.txt"
    path.write_bytes(data)
    assert list(read_documents(path, decode=False)) == [data]
    assert list(read_documents(path, "lines", decode=False)) == [b"caf\xc3\xa9\r", b"\xff\xfe raw", b"", b"last"]
    with pytest.raises(DataError, match=r"raw\.txt: not UTF-8 text \(byte 7: b'\\xff'\)"):
        list(read_documents(path))
    with pytest.raises(DataError, match=r"raw\.txt:2: not UTF-8 text \(byte 0 of the line"):
        list(read_documents(path, "lines"))


def test_lines_split_across_read_blocks(tmp_path):
    lines = [f"{i} " + "x" * (i * 997 % 70_000) for i in range(60)]  # lines longer than a 64 KiB block too
    path = tmp_path / "long.txt.gz"
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    assert list(read_documents(path, "lines")) == lines


def test_a_byte_order_mark_before_jsonl_is_allowed(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl(["a", "b"]))
    assert list(read_documents(path)) == ["a", "b"]


def test_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(jsonl(["x", "y"]))))
    assert list(read_documents("-", "jsonl")) == ["x", "y"]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b'{"text": 5}\n')))
    with pytest.raises(DataError, match=r"^stdin:1: field 'text' is a number, not a string"):
        list(read_documents("-", "jsonl"))


@pytest.mark.parametrize("line, message", [
    (b'{"text": "a"', r"not JSON \(Expecting ',' delimiter at column 13\)"),
    (b"[" * 100_000, r"not JSON"),
    (b'["text"]', r"not a JSON object with a 'text' field"),
    (b'{"body": "a"}', r"not a JSON object with a 'text' field"),
    (b'{"text": null}', r"field 'text' is null, not a string"),
    (b'{"text": "a\\udfffb"}', r"field 'text' has a lone surrogate '\\udfff' at character 1, which is not text"),
    (b'{"text": "\xff"}', r"not UTF-8 text \(byte 10 of the line: b'\\xff'\)"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n\n' + line + b"\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: {message}") as e:
        list(read_documents(path))
    assert e.value.path == str(path) and e.value.line == 3


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: no such file"):
        list(read_documents(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="not a file"):
        list(read_documents(tmp_path))
    (tmp_path / "junk.txt.bz2").write_bytes(b"BZh9" + b"\x00" * 64)
    with pytest.raises(DataError, match=r"junk\.txt\.bz2: not a readable \.bz2 file \(truncated or corrupt\?\)"):
        list(read_documents(tmp_path / "junk.txt.bz2"))


def test_zst_without_zstandard_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # what importlib sees for a package that is not there
    (tmp_path / "a.txt.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(DataError, match=r"a\.txt\.zst: reading \.zst needs the `zstandard` package"):
        list(read_documents(tmp_path / "a.txt.zst"))


def test_tokenize_and_data_prepare_read_the_same_documents(tmp_path, capsys, monkeypatch):
    """Both commands take --input and --field and read through the same reader."""
    path = tmp_path / "docs.json.xz"  # .json: JSON Lines for both (auto)
    path.write_bytes(lzma.compress(jsonl(["alpha", "", "beta"], field="body")))
    assert main(["tokenize", "encode", "--field", "body", "--tokenizer", "20b", str(path)]) == 0
    ids = capsys.readouterr().out.splitlines()
    assert len(ids) == 3 and ids[1] == ""  # tokenize keeps empty documents (one line per document)
    seen = []
    monkeypatch.setattr("aviary.train.data._default_encoder",
                        lambda num_threads: lambda texts: seen.extend(texts) or [[1] for _ in texts])
    assert main(["data", "prepare", "--field", "body", str(path), str(tmp_path / "ds"), "--quiet"]) == 0
    assert seen == ["alpha", "beta"]  # data prepare skips them
    seen.clear()
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\n\nthree\n", encoding="utf-8")
    assert main(["data", "prepare", "--input", "lines", str(lines), str(tmp_path / "ds2"), "--quiet"]) == 0
    assert seen == ["one", "two", "three"]
