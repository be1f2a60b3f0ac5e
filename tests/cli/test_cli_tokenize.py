"""`aviary tokenize`: encode, decode, --stats, through aviary.cli.main."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import sys
from pathlib import Path

import pytest

from aviary.cli import main
from aviary.tokenizer import load_tokenizer

TEXT = "Hello, 世界 👋\nThe Eiffel tower is in the city of\n"


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_bytes(TEXT.encode())
    return path


def _stdin(monkeypatch, data: bytes):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_encode_file_is_one_document(text_file, capsys):
    assert main(["tokenize", "encode", str(text_file)]) == 0
    out = capsys.readouterr().out
    assert out == " ".join(map(str, load_tokenizer("world").encode(TEXT))) + "\n"


def test_encode_then_decode_is_exact(tmp_path, text_file, capsysbinary, monkeypatch):
    data = TEXT.encode() + b"\xff\xfe raw bytes"  # not UTF-8: the World tokenizer still round-trips it
    text_file.write_bytes(data)
    ids_file = tmp_path / "ids.txt"
    assert main(["tokenize", "encode", str(text_file), "-o", str(ids_file)]) == 0
    assert main(["tokenize", "decode", str(ids_file), "-o", str(tmp_path / "back.bin")]) == 0
    assert (tmp_path / "back.bin").read_bytes() == data
    _stdin(monkeypatch, ids_file.read_bytes())
    assert main(["tokenize", "decode"]) == 0
    assert capsysbinary.readouterr().out == data  # raw bytes on stdout too


def test_lines_and_json(text_file, capsys, monkeypatch):
    tok = load_tokenizer("world")
    assert main(["tokenize", "encode", "--input", "lines", "--json", str(text_file)]) == 0
    out = capsys.readouterr().out
    assert [json.loads(line) for line in out.splitlines()] == [tok.encode(line) for line in TEXT.splitlines()]
    _stdin(monkeypatch, out.encode())
    assert main(["tokenize", "decode", "--json"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == TEXT.splitlines()


def test_stdin_and_20b(capsys, monkeypatch):
    _stdin(monkeypatch, b"Hello world")
    assert main(["tokenize", "encode", "--tokenizer", "20b"]) == 0
    assert capsys.readouterr().out == "12092 1533\n"


def test_stats_on_compressed_jsonl(tmp_path, capsys):
    docs = ["Hello, 世界 👋", "The Eiffel tower is in the city of", ""]
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    plain = tmp_path / "doc.txt"
    plain.write_text("abc", encoding="utf-8")
    assert main(["tokenize", "encode", "--stats", "--json", str(path), str(plain)]) == 0
    report = json.loads(capsys.readouterr().out)
    n_bytes = sum(len(d.encode()) for d in docs)
    assert [r["file"] for r in report] == [str(path), str(plain), "total"]
    assert report[0]["documents"] == 3 and report[0]["bytes"] == n_bytes and report[0]["tokens"] == 19
    assert report[0]["bytes_per_token"] == pytest.approx(n_bytes / 19)
    assert report[2]["bytes"] == n_bytes + 3
    assert main(["tokenize", "encode", "--stats", str(path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["file", "documents", "bytes", "tokens", "bytes/token"]
    assert table[1].split()[1:] == ["3", str(n_bytes), "19", f"{n_bytes / 19:.3f}"]


def test_errors_are_one_line(tmp_path, capsys, monkeypatch):
    _stdin(monkeypatch, b"1 2 70000\n")
    assert main(["tokenize", "decode"]) == 2
    assert "stdin:1: token id 70000 at position 2 is not in the vocabulary" in capsys.readouterr().err
    _stdin(monkeypatch, b"1 x\n")
    assert main(["tokenize", "decode"]) == 2
    assert "cannot read token ids" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n', encoding="utf-8")
    assert main(["tokenize", "encode", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main(["tokenize", "encode", str(tmp_path / "missing.txt")]) == 2
    assert main(["tokenize", "encode", "--tokenizer", "gpt2", str(bad)]) == 2
    assert "unknown tokenizer" in capsys.readouterr().err


# --- hostile and malformed input (issue 14): one line naming the file, exit 2, no partial output -------------


def _jsonl_bytes(n: int = 3000) -> bytes:
    return "".join(json.dumps({"text": f"document {i} " + "x" * (i % 97)}) + "\n" for i in range(n)).encode()


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), (".xz", lzma.compress), (".bz2", bz2.compress)])
def test_truncated_or_corrupt_compressed_input(tmp_path, capsys, suffix, compress):
    full = compress(_jsonl_bytes())
    for name, data in (("cut", full[: len(full) // 2]), ("junk", full[:4] + b"\x00" * 64 + full[68:])):
        path = tmp_path / f"{name}.jsonl{suffix}"
        path.write_bytes(data)
        assert main(["tokenize", "encode", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{path}: not a readable {suffix} file (truncated or corrupt?)" in err and len(err.splitlines()) == 1


def test_binary_ids_file_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "ids.txt"
    path.write_bytes(b"1 2 3\n\xff\xfe\x00\x01 7\n")
    assert main(["tokenize", "decode", str(path)]) == 2
    assert f"{path}:2: cannot read token ids" in capsys.readouterr().err


@pytest.mark.parametrize("line", ["[true, 5]", "[1.0]", "[" * 100_000, "5 x"])
def test_bad_id_lines_are_one_line_errors(tmp_path, capsys, line):
    path = tmp_path / "ids.txt"
    path.write_text("33 34\n" + line + "\n", encoding="utf-8")
    assert main(["tokenize", "decode", str(path)]) == 2
    assert f"{path}:2: cannot read token ids" in capsys.readouterr().err


def test_binary_vocabulary_file_is_named(tmp_path, text_file, capsys):
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(b"\xff\xfe1 'a' 1\n")
    assert main(["tokenize", "encode", "--tokenizer", str(vocab), str(text_file)]) == 2
    assert f"{vocab}:1: not a UTF-8 text file" in capsys.readouterr().err


@pytest.mark.parametrize("tokenizer", ["world", "20b"])
def test_jsonl_with_a_lone_surrogate_names_file_and_line(tmp_path, capsys, tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "a\\ud800b"}\n', encoding="utf-8")
    assert main(["tokenize", "encode", "--tokenizer", tokenizer, str(path)]) == 2
    assert f"{path}:2: field 'text' has a lone surrogate '\\ud800' at character 1" in capsys.readouterr().err


def test_decode_output_appears_only_when_complete(tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text("33 34 35\n1 2 70000\n", encoding="utf-8")
    out = tmp_path / "out.bin"
    assert main(["tokenize", "decode", str(ids), "-o", str(out)]) == 2
    assert "ids.txt:2: token id 70000" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt"]  # no partial out.bin, no .tmp left
    out.write_bytes(b"previous")
    assert main(["tokenize", "decode", str(ids), "-o", str(out)]) == 2
    assert out.read_bytes() == b"previous"  # an existing file is left as it was
    ids.write_text("33 34 35\n", encoding="utf-8")
    assert main(["tokenize", "decode", str(ids), "-o", str(ids)]) == 0  # output over its own input: read first
    assert ids.read_bytes() == b" !\""
    assert main(["tokenize", "decode", str(out.with_name("missing.txt")), "-o", str(out)]) == 2
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt", "out.bin"]


def test_output_to_a_device_or_a_link_is_written_in_place(tmp_path, text_file):
    assert main(["tokenize", "encode", str(text_file), "-o", "/dev/null"]) == 0  # not replaced by a file
    assert not Path("/dev/null").is_file()
    link, real = tmp_path / "link.txt", tmp_path / "real.txt"
    link.symlink_to(real)
    assert main(["tokenize", "encode", str(text_file), "-o", str(link)]) == 0
    assert link.is_symlink() and real.read_text() == " ".join(map(str, load_tokenizer("world").encode(TEXT))) + "\n"
