"""Encode text files to token ids, decode ids back to text, or report bytes per token.

Inputs are files (plain, or compressed .gz/.bz2/.xz/.lzma/.zst) or stdin ("-" or no file). With --input
auto (the default) a *.jsonl, *.ndjson or *.json file holds one document per line in the field --field
("text"); any other file is one document, its bytes as they are (any bytes, not only UTF-8). --input lines
makes every line a document. Documents are encoded on all cores. The files are read as `aviary data
prepare` reads them (aviary.textio).

encode prints one line per document: its ids separated by spaces (--json: a JSON list). decode reads the
same (one document per line, ids separated by spaces or commas, or a JSON list) and writes the documents'
bytes exactly, one newline between documents (--json: one JSON string per document). With -o the output
appears only when complete: after an error no partial file is left.

examples:
  aviary tokenize encode notes.txt                       # ids of the whole file, one line
  echo "Hello, 世界 👋" | aviary tokenize encode
  aviary tokenize encode notes.txt | aviary tokenize decode    # the file again, byte for byte
  aviary tokenize encode --stats corpus/train.jsonl.xz corpus/valid.jsonl.xz
  aviary tokenize encode --tokenizer 20b --input lines --json questions.txt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from aviary.commands._common import add_input_arguments
from aviary.textio import read_documents

HELP = "encode/decode text with the World (or 20B) tokenizer; --stats: bytes per token"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    encode = sub.add_parser("encode", help="text -> token ids, one line per document",
                            description="Text -> token ids, one line per document.")
    decode = sub.add_parser("decode", help="token ids -> text", description="Token ids -> text.")
    for p in (encode, decode):
        p.add_argument("files", nargs="*", metavar="FILE", help='input files; "-" or none: stdin')
        p.add_argument("--tokenizer", default="world", metavar="NAME",
                       help="world (default), 20b, a World vocabulary .txt or a tokenizers .json file")
        p.add_argument("--json", action="store_true", help="JSON output (one value per document or a report)")
        p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    add_input_arguments(encode)
    encode.add_argument("--stats", action="store_true",
                        help="print documents, bytes, tokens and bytes per token for each input instead of ids")
    encode.add_argument("--threads", type=int, default=None, help="encoding threads (default: all cores)")


# --- input ------------------------------------------------------------------------------------------


def _parse_ids(line: bytes, where: str) -> list[int]:
    try:
        line = line.decode("utf-8").strip()
        if line.startswith("["):
            ids = json.loads(line)
            if not all(type(i) is int for i in ids):  # not bool: true is not token 1
                raise ValueError("not a list of integers")
            return ids
        return [int(tok) for tok in line.replace(",", " ").split()]
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{where}: cannot read token ids ({e})") from None


# --- actions ----------------------------------------------------------------------------------------


def _encode(args: argparse.Namespace, tok: Any, names: list[str], out: IO[bytes]) -> None:
    report = []
    for name in names:
        docs = list(read_documents(name, args.input, args.field, decode=False))
        start = time.perf_counter()
        ids = tok.encode_batch(docs, num_threads=args.threads)
        seconds = time.perf_counter() - start
        if args.stats:
            n_bytes = sum(len(d) if isinstance(d, bytes) else len(d.encode("utf-8")) for d in docs)
            n_tokens = sum(map(len, ids))
            report.append({"file": name, "documents": len(docs), "bytes": n_bytes, "tokens": n_tokens,
                           "bytes_per_token": n_bytes / n_tokens if n_tokens else None, "seconds": seconds})
            continue
        for doc_ids in ids:
            line = json.dumps(doc_ids) if args.json else " ".join(map(str, doc_ids))
            out.write(line.encode() + b"\n")
    if args.stats:
        _write_report(report, args.json, out)


def _write_report(report: list[dict], as_json: bool, out: IO[bytes]) -> None:
    if len(report) > 1:
        total = {key: sum(r[key] for r in report) for key in ("documents", "bytes", "tokens", "seconds")}
        total["bytes_per_token"] = total["bytes"] / total["tokens"] if total["tokens"] else None
        report.append({"file": "total", **total})
    if as_json:
        out.write((json.dumps(report, indent=2) + "\n").encode())
        return
    rows = [("file", "documents", "bytes", "tokens", "bytes/token")]
    for r in report:
        bpt = f"{r['bytes_per_token']:.3f}" if r["bytes_per_token"] is not None else "-"
        rows.append((r["file"], f"{r['documents']:,}", f"{r['bytes']:,}", f"{r['tokens']:,}", bpt))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        out.write(("  ".join(cells) + "\n").encode())


def _decode(args: argparse.Namespace, tok: Any, names: list[str], out: IO[bytes]) -> None:
    first = True
    for name in names:
        for lineno, line in enumerate(read_documents(name, "lines", decode=False), 1):
            where = f"{'stdin' if name == '-' else name}:{lineno}"
            ids = _parse_ids(line, where)
            try:
                data = tok.decode_bytes(ids)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if args.json:
                out.write((json.dumps(data.decode("utf-8", errors="replace"), ensure_ascii=False) + "\n").encode())
            else:
                out.write(data if first else b"\n" + data)
            first = False


@contextlib.contextmanager
def _open_output(path: str | None) -> Iterator[IO[bytes]]:
    if path is None:
        sys.stdout.flush()  # ids and text go to the binary stream: exact bytes, whatever the locale
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    if target.is_symlink() or (target.exists() and not target.is_file()):
        with open(target, "wb") as f:  # /dev/stdout, a pipe, a link: write through it; a rename would replace it
            yield f
        return
    tmp = target.with_name(target.name + ".tmp")  # the output appears whole, or not at all
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, target)
    except OSError as e:
        if e.filename != str(tmp):
            raise
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None  # the user's name, not ours
    finally:
        tmp.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    from aviary.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    names = args.files or ["-"]
    with _open_output(args.output) as out:
        (_encode if args.action == "encode" else _decode)(args, tok, names, out)
    return 0
