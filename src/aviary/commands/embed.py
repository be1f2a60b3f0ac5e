"""Embed texts: one vector per text, as JSON Lines, .npy or .safetensors (aviary.embeddings, docs/embeddings.md).

Methods: mean (of the final hidden states; the default), last (the final hidden state at the last token),
state (the recurrent state, standardised per channel), emb-rwkv (an EmbeddingRWKV checkpoint from the
rwkv-emb project: EOS appended, its task head). Vectors are L2-normalised unless --no-normalize.
The first positional argument is the model if it names an existing file or folder; the others are texts.

examples:
  aviary embed "The cat sat on the mat." "A cat was sitting on a mat."
  aviary embed model.pth --file sentences.txt -o vectors.npy --method last
  aviary embed model.pth --file docs.jsonl --field body -o vectors.safetensors
  aviary embed rwkv0b1-emb-curriculum.pth --method emb-rwkv "query: what is RWKV?"
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from aviary.commands._common import add_model_arguments, unescape

HELP = "embed texts as vectors (JSONL, .npy or .safetensors)"

METHODS = ("mean", "last", "state", "emb-rwkv")  # aviary.embeddings.METHODS (not imported: --help needs no torch)
OUTPUTS = (".jsonl", ".npy", ".safetensors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="[MODEL] TEXT",
                        help="checkpoint (default: the bundled model) and texts; escapes like \\n are understood")
    parser.add_argument("--file", default=None,
                        help="read texts from this file: one a line (blank lines skipped), or JSON Lines (*.jsonl, "
                             "*.ndjson, *.json) with the text in --field")
    parser.add_argument("--field", default="text", help='the text field of JSON Lines (default "text")')
    parser.add_argument("-o", "--output", default=None, metavar="PATH",
                        help="*.jsonl, *.npy or *.safetensors (tensor 'embeddings', [N, D] float32); "
                             "default: JSON Lines on stdout")
    parser.add_argument("--method", choices=METHODS, default="mean", help="(default mean)")
    parser.add_argument("--task", choices=["[RETR]", "[STS]", "[CLS]"], default="[RETR]",
                        help="the EmbeddingRWKV head (emb-rwkv only; default [RETR])")
    parser.add_argument("--dimensions", type=int, default=None, metavar="N",
                        help="keep the first N coordinates and normalise again (only meaningful for a model "
                             "trained for it)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="texts run together (default 16)")
    parser.add_argument("--no-normalize", action="store_true", help="leave the vectors unnormalised")
    add_model_arguments(parser)


def _inputs(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(model path or None, texts)."""
    positional = list(args.args)
    model = positional.pop(0) if positional and os.path.exists(positional[0]) else None
    texts = [unescape(t) for t in positional]
    if args.file is not None:
        from aviary.textio import input_format, read_documents

        fmt = "jsonl" if input_format(args.file) == "jsonl" else "lines"
        texts += [t for t in read_documents(args.file, fmt, args.field) if t.strip()]
    if not texts:
        raise ValueError("no texts to embed: give texts as arguments or --file")
    return model, texts


def _check(args: argparse.Namespace) -> None:
    if args.output is not None and not args.output.lower().endswith(OUTPUTS):
        raise ValueError(f"--output must end with {', '.join(OUTPUTS)}, got {args.output}")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.dimensions is not None and args.dimensions < 1:
        raise ValueError("--dimensions must be >= 1")
    if args.method == "emb-rwkv" and (args.state or args.adapter):
        raise ValueError("--method emb-rwkv takes no --state or --adapter")


def run(args: argparse.Namespace) -> int:
    _check(args)
    model_path, texts = _inputs(args)
    from aviary.commands._common import load_model, resolve_model_path
    from aviary.embeddings import embed, load_embedding_rwkv, truncate

    if args.method == "emb-rwkv":
        from aviary.devices import check_device
        from aviary.tokenizer import load_tokenizer

        check_device(args.device)
        model = load_embedding_rwkv(resolve_model_path(model_path), device=args.device, dtype=args.dtype)
        if args.quantize:
            model.quantize(args.quantize)
        tokenizer = load_tokenizer(args.tokenizer, version=model.config.version)
    else:
        model, tokenizer, state = load_model(args, model_path)
        if state is not None:
            raise ValueError("aviary embed does not take --state: every text starts from the model's state")
    vectors = embed(model, tokenizer, texts, method=args.method, batch_size=args.batch_size, task=args.task,
                    normalize=not args.no_normalize)
    if args.dimensions is not None:
        vectors = truncate(vectors, args.dimensions)
    _write(args.output, texts, vectors)
    return 0


def _write(path: str | None, texts: list[str], vectors) -> None:
    if path is not None and path.lower().endswith(".npy"):
        import numpy as np

        np.save(path, vectors.numpy())
    elif path is not None and path.lower().endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({"embeddings": vectors.contiguous()}, path)
    else:
        out = sys.stdout if path is None else open(path, "w", encoding="utf-8")  # noqa: SIM115
        try:
            for i, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
                out.write(json.dumps({"index": i, "text": text, "embedding": vector.tolist()},
                                     ensure_ascii=False) + "\n")
        finally:
            if out is not sys.stdout:
                out.close()
