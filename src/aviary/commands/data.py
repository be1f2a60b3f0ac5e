"""Prepare and inspect training data in the binidx format (`.bin` + `.idx`, uint16 token ids, the
end-of-document id 0 after every document), the format RWKV-LM and Megatron read.

`prepare` reads plain text files (one document per file) and JSONL files (*.jsonl, *.ndjson, *.json: one
`{"text": ...}` document per line, --field for another field), optionally compressed (.gz, .bz2, .xz,
.lzma, .zst), tokenizes them with the RWKV World tokenizer on all cores, and writes OUT.bin + OUT.idx.
--input lines makes every line a document; empty documents are skipped. Chat JSONL (one
`{"messages": [{"role", "content"}, ...]}` or `{"prompt", "completion"}` per line; found by its first line,
or --input chat) is rendered in the chat format --chat-format names (world by default; g1, raven), as
`aviary chat` and `aviary serve` render it, and OUT.mask marks the assistant's replies: only those tokens are
trained. The files are read as `aviary tokenize` reads them. Every input is checked first (exists, not
empty, UTF-8), and the output appears only when it is complete (an error, Ctrl-C or SIGTERM leaves nothing
behind). An existing dataset is replaced only with --force.

`inspect` shows a dataset's documents, token counts, its loss mask (the share of tokens trained; in the
documents shown, the trained tokens are [[bracketed]]) and the sampling plan for a context length: how many
windows one epoch visits, and RWKV-LM's "magic prime" for the same data.

examples:
  aviary data prepare ../shared/data/corpus/train.jsonl.xz data/corpus-train
  aviary data prepare notes/*.txt books.jsonl.gz data/mine --threads 8
  aviary data prepare examples/data/chat-demo.jsonl data/chat-demo      # -> .bin, .idx and .mask
  aviary data inspect data/corpus-train --ctx-len 512 --show 2
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading

from aviary.commands._common import add_chat_format_argument, add_input_arguments

HELP = "tokenize text/JSONL/chat into binidx training data, or inspect a binidx dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("prepare", help="text / JSONL / chat files -> OUT.bin + OUT.idx (+ OUT.mask for chat)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="the input files, then the output prefix OUT (OUT.bin + OUT.idx [+ OUT.mask])")
    p.add_argument("--threads", type=int, default=None, help="tokenizer threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="replace the dataset OUT if it exists")
    add_input_arguments(p, chat=True)
    add_chat_format_argument(p, recorded=False)
    i = sub.add_parser("inspect", help="documents, token counts and the sampling plan of a binidx dataset")
    i.add_argument("prefix", metavar="DATA", help="binidx prefix (DATA.bin + DATA.idx)")
    i.add_argument("--ctx-len", type=int, default=512, help="context length for the sampling plan [512]")
    i.add_argument("--show", type=int, default=1, help="documents to print the start of [1]")
    i.add_argument("--chars", type=int, default=300, help="characters shown per document [300]")


@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM raises SystemExit(143) instead of killing the process at once, so that the cleanup of
    unfinished output (the writer's temporary files) runs, as it does for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _prepare(args: argparse.Namespace) -> int:
    from aviary.train.data import binidx_paths, mask_path, prepare

    if len(args.paths) < 2:
        raise ValueError("give at least one INPUT and the OUT prefix")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: must be >= 1")
    *inputs, out = args.paths
    existing = [str(p) for p in (*binidx_paths(out), mask_path(out)) if p.exists()]
    if existing and not args.force:
        raise FileExistsError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                              "pass --force to replace the dataset")
    with _sigterm_exits():
        r = prepare(inputs, out, num_threads=args.threads, progress=not args.quiet, format=args.input,
                    field=args.field, chat_format=args.chat_format or "world")
    files = f"{r.bin_path}, {r.idx_path} and {r.mask_path}" if r.mask_path else f"{r.bin_path} and {r.idx_path}"
    print(f"wrote {files}: {r.documents:,} documents, {r.tokens:,} tokens "
          f"({r.characters / max(r.tokens, 1):.2f} characters per token)")
    if r.mask_path:
        texts = r.documents - r.conversations
        print(f"{r.conversations:,} conversations; {r.targets:,} tokens ({r.targets / r.tokens:.1%}) are training "
              "targets: the assistant's replies" + (f", and all of the {texts:,} text documents" if texts else ""))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from aviary.train.data import BinIdx
    from aviary.train.sampler import WindowSampler, magic_prime

    if args.ctx_len < 1:
        raise ValueError(f"--ctx-len {args.ctx_len}: must be >= 1")
    if min(args.show, args.chars) < 0:
        raise ValueError("--show and --chars must be >= 0")
    ds = BinIdx(args.prefix)
    sizes = ds.sizes.astype(np.int64)
    print(f"dataset     {ds.bin_path} + {ds.idx_path.name}")
    print(f"dtype       {ds.dtype}")
    print(f"documents   {ds.n_documents:,}")
    print(f"tokens      {len(ds):,}")
    if ds.has_mask:
        targets = int(np.count_nonzero(ds.mask))
        print(f"mask        {ds.mask_path.name}: {targets:,} tokens ({targets / len(ds):.1%}) are training targets, "
              "the rest is context")
    else:
        print("mask        none: every token is a training target")
    if len(sizes):
        print(f"doc length  min {sizes.min():,}, median {int(np.median(sizes)):,}, max {sizes.max():,} tokens")
    T = args.ctx_len
    sampler = WindowSampler(len(ds), T)
    print(f"sampling    ctx_len {T}: {sampler.n_windows:,} windows of {T + 1} tokens, each visited once per "
          f"epoch in a fixed pseudo-random order (cube map mod prime {sampler.p})")
    with contextlib.suppress(ValueError):  # too small for a magic prime
        print(f"            RWKV-LM --magic_prime {magic_prime(len(ds) // T)} (--my_exit_tokens {len(ds)})")
    print(f"            first windows: {[sampler.window(k) for k in range(min(8, sampler.n_windows))]}")
    if args.show:
        try:
            from aviary.tokenizer import WorldTokenizer

            tok = WorldTokenizer()
        except ImportError:
            tok = None
        if ds.has_mask:
            print("\n(the training targets are shown [[like this]])")
        for i in range(min(args.show, ds.n_documents)):
            ids = ds.document(i)
            print(f"\n--- document {i}: {len(ids):,} tokens ---")
            print(_marked_text(tok, ids, ds.document_mask(i) if ds.has_mask else None, args.chars))
    return 0


def _marked_text(tok, ids, mask, chars: int) -> str:
    """The start of a document: its first `chars` tokens decoded (or as numbers, for ids of another
    tokenizer) and cut at `chars` characters, with each run of target tokens in [[ ]] when there is a mask."""
    import numpy as np

    more = len(ids) > chars
    ids = ids[:chars]
    mask = np.zeros(len(ids), dtype=bool) if mask is None else mask[:chars]
    cuts = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    runs = list(zip(np.split(ids, cuts), (bool(m[0]) for m in np.split(mask, cuts)), strict=True))
    try:
        if tok is None:
            raise ValueError("no tokenizer")
        texts = [tok.decode([int(t) for t in r]) for r, _ in runs]
    except ValueError:  # ids of another tokenizer
        texts, chars = [" ".join(map(str, r)) + " " for r, _ in runs], 6 * 60  # about 60 ids
    out, left = [], chars
    for (_, target), text in zip(runs, texts, strict=True):
        if left <= 0:
            more = True
            break
        piece, left = text[:left], left - len(text)
        out.append(f"[[{piece}]]" if target else piece)
    return "".join(out) + ("..." if more or left < 0 else "")


def run(args: argparse.Namespace) -> int:
    return _prepare(args) if args.action == "prepare" else _inspect(args)
