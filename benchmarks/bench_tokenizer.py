"""World tokenizer throughput: Aviary against its peers, in one process, on the same text.

    python benchmarks/bench_tokenizer.py                       # all of train.jsonl.xz + multilingual.jsonl.xz
    python benchmarks/bench_tokenizer.py --mb 4 --repeat 5     # a quicker run

Peers (each skipped, with a note, when not installed; `pip install -e ".[bench]"` gets the Rust ones):
  aviary (c)         WorldTokenizer(): the compiled trie, one document at a time, then encode_batch on N threads
  aviary (python)    WorldTokenizer(backend="python"), on a slice (--ref-mb)
  rwkv TRIE          the rwkv pip package's rwkv_tokenizer.TRIE_TOKENIZER (the reference), on the same slice
  pyrwkv-tokenizer   Rust (PyPI pyrwkv-tokenizer): encode per document, and its encode_batch
  rwkv-tokenizer     Rust (PyPI rwkv-tokenizer)

Every peer's ids are checked against Aviary's. MB/s counts UTF-8 input bytes for encoding and output bytes
for decoding (decoding Aviary's ids back to str); each figure is the best of --repeat passes, the peers
interleaved within each pass so that a busy machine slows them alike. Prints a table, writes JSON (with
`aviary.cpu.backend_info()` under "backend", like every benchmark; no model is loaded, so no decode path).
"""

from __future__ import annotations

import argparse
import importlib
import json
import lzma
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import backend_info  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_texts(data: Path, mb: float | None) -> list[str]:
    texts = []
    for rel in ("corpus/train.jsonl.xz", "tokenizer/multilingual.jsonl.xz"):
        with lzma.open(data / rel, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    if mb is not None:  # an even sample of documents, so both English and the multilingual set stay in
        budget, total = mb * 1e6, sum(len(t.encode()) for t in texts)
        step = max(1, round(total / budget))
        texts = texts[::step]
    return texts


def first_bytes(texts: list[str], mb: float) -> list[str]:
    out, size = [], 0
    for i, t in enumerate(texts):  # every k-th document up to mb, so the slice is mixed too
        if i % 7 == 0 and size < mb * 1e6:
            out.append(t)
            size += len(t.encode())
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def peers() -> dict[str, object]:
    """name -> an object with encode(str) -> list[int] and decode(list[int]) -> str; None when missing."""
    import aviary

    found: dict[str, object] = {"aviary (c)": aviary.WorldTokenizer()}
    found["aviary (python)"] = aviary.WorldTokenizer(backend="python")
    try:
        import rwkv
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
        found["rwkv TRIE"] = TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))
    except ImportError:
        found["rwkv TRIE"] = None
    for name, module in (("pyrwkv-tokenizer", "pyrwkv_tokenizer"), ("rwkv-tokenizer", "rwkv_tokenizer")):
        try:
            mod = importlib.import_module(module)
            found[name] = mod.RWKVTokenizer().tokenizer  # the Rust object itself, without the Python wrapper
        except ImportError:
            found[name] = None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--mb", type=float, default=None, help="use about this many MB of text (default: all)")
    parser.add_argument("--ref-mb", type=float, default=2.0, help="MB for the slow pure-Python tokenizers")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", default=None, help="thread counts for encode_batch, e.g. 1,2,4 "
                        "(default: 1, 2, 4, ... up to the cores)")
    parser.add_argument("--json", type=Path, default=Path("runs/bench_tokenizer.json"))
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    threads = [int(t) for t in args.threads.split(",")] if args.threads else \
        sorted({1, *[2**k for k in range(1, 8) if 2**k <= cores], cores})
    texts = load_texts(args.data, args.mb)
    slice_ = first_bytes(texts, args.ref_mb)
    n_bytes = sum(len(t.encode()) for t in texts)
    slice_bytes = sum(len(t.encode()) for t in slice_)
    found = peers()
    aviary_tok = found["aviary (c)"]
    expected = [aviary_tok.encode(t) for t in texts]
    expected_slice = [aviary_tok.encode(t) for t in slice_]
    n_tokens = sum(map(len, expected))
    print(f"{len(texts)} documents, {n_bytes / 1e6:.1f} MB, {n_tokens:,} tokens; slow peers on {len(slice_)} "
          f"documents, {slice_bytes / 1e6:.2f} MB; {cores} cores; best of {args.repeat}")

    # (row name, peer, texts, expected ids, kind)
    rows = []
    for name, tok in found.items():
        if tok is None:
            print(f"  {name}: not installed, skipped")
            continue
        slow = name in ("aviary (python)", "rwkv TRIE")
        rows.append((name, tok, slice_ if slow else texts, expected_slice if slow else expected, "single"))
    encode_times: dict[str, list[float]] = {r[0]: [] for r in rows}
    decode_times: dict[str, list[float]] = {r[0]: [] for r in rows}
    encode_cpu: dict[str, list[float]] = {r[0]: [] for r in rows}  # this thread's CPU time: robust to a busy machine
    batch_times: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        for name, tok, docs, want, _kind in rows:
            encode = tok.encode
            start, cpu = time.perf_counter(), time.thread_time()
            got = [encode(t) for t in docs]
            encode_times[name].append(time.perf_counter() - start)
            encode_cpu[name].append(time.thread_time() - cpu)
            if got != want:
                raise SystemExit(f"{name}: ids differ from Aviary's")
            decode = tok.decode
            start = time.perf_counter()
            back = [decode(ids) for ids in want]
            decode_times[name].append(time.perf_counter() - start)
            if back != docs:
                raise SystemExit(f"{name}: decode does not give the text back")
        for n in threads:
            start = time.perf_counter()
            got = aviary_tok.encode_batch(texts, num_threads=n)
            batch_times.setdefault(f"aviary (c) encode_batch, {n} thread{'s' * (n > 1)}", []).append(
                time.perf_counter() - start)
            if got != expected:
                raise SystemExit("aviary encode_batch: ids differ")
        if found.get("pyrwkv-tokenizer") is not None:
            start = time.perf_counter()
            got = found["pyrwkv-tokenizer"].encode_batch(texts)
            batch_times.setdefault(f"pyrwkv-tokenizer encode_batch ({cores} cores)", []).append(
                time.perf_counter() - start)
            if got != expected:
                raise SystemExit("pyrwkv-tokenizer encode_batch: ids differ")

    size = {r[0]: (slice_bytes if r[2] is slice_ else n_bytes) for r in rows}
    result = {"machine": {"cpu": cpu_name(), "cores": cores,
                          "python": platform.python_version(), "load_avg": os.getloadavg()},
              "backend": backend_info(),
              "documents": len(texts), "bytes": n_bytes, "tokens": n_tokens, "slice_bytes": slice_bytes,
              "repeat": args.repeat, "encode": {}, "encode_cpu": {}, "decode": {}, "batch": {}}
    base_enc = n_bytes / min(encode_times["aviary (c)"]) / 1e6
    base_dec = n_bytes / min(decode_times["aviary (c)"]) / 1e6
    base_cpu = n_bytes / min(encode_cpu["aviary (c)"]) / 1e6
    print(f"\n{'one thread':<28} {'encode MB/s':>12} {'aviary x':>9} {'encode MB/cpu-s':>16} {'aviary x':>9} "
          f"{'decode MB/s':>12} {'aviary x':>9}")
    for name, *_ in rows:
        enc = size[name] / min(encode_times[name]) / 1e6
        enc_cpu = size[name] / min(encode_cpu[name]) / 1e6
        dec = size[name] / min(decode_times[name]) / 1e6
        result["encode"][name] = enc
        result["encode_cpu"][name] = enc_cpu
        result["decode"][name] = dec
        print(f"{name:<28} {enc:12.1f} {base_enc / enc:9.2f} {enc_cpu:16.1f} {base_cpu / enc_cpu:9.2f} "
              f"{dec:12.1f} {base_dec / dec:9.2f}")
    print("(MB/s: wall clock; MB/cpu-s: per second of this thread's CPU time; aviary x: how many times faster "
          "Aviary's row is than this one)")
    print(f"\n{'batch encoding, all documents':<44} {'MB/s':>8} {'x 1 thread':>11}")
    for name, times in batch_times.items():
        mbs = n_bytes / min(times) / 1e6
        result["batch"][name] = mbs
        one = result["batch"].get("aviary (c) encode_batch, 1 thread", mbs)
        print(f"{name:<44} {mbs:8.1f} {mbs / one:11.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
