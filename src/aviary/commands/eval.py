"""Evaluate a model: perplexity of text, LAMBADA, loss by token position, and what a precision costs.

Every action runs the bundled default model unless --model names a checkpoint, with the usual loading options
(--dtype, --quantize, --adapter, ...). Documents are scored through the recurrent state in one pass (memory
does not grow with their length). Results print as a table; --json FILE also writes them as JSON. A progress
bar shows on a terminal (--quiet: none). docs/evaluation.md has the protocols and measured numbers.

examples:
  aviary eval ppl ../shared/data/corpus/valid.jsonl.xz
  aviary eval ppl notes.txt --window 1024 --json ppl.json          # disjoint 1024-token windows
  aviary eval lambada --limit 500                                  # the LAMBADA test set (lambada_openai)
  aviary eval lambada --file ../shared/data/eval/lambada_austen.jsonl --protocol rwkv-lm
  aviary eval loss-by-position ../shared/data/corpus/longdocs.jsonl.xz --out runs/positions
  aviary eval compare --model RWKV-x070-World-0.1B.pth --against fp32 --dtypes bf16,int8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from aviary.commands._common import add_input_arguments, add_model_arguments

HELP = "evaluate a model: ppl, lambada, loss-by-position, compare (precisions)"

# the shared data next to the repository (../shared/data from the repository root)
SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
LAMBADA_DEFAULT = SHARED_DATA / "eval" / "lambada_openai.jsonl.xz"
HELDOUT_DEFAULT = SHARED_DATA / "corpus" / "valid.jsonl.xz"


def _model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None, metavar="PATH", help="checkpoint (default: the bundled model)")


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    ppl = sub.add_parser("ppl", help="perplexity and bits per byte of text files", formatter_class=fmt,
                         description=_doc("aviary.eval.ppl") + "\nexample:\n  aviary eval ppl "
                                     "../shared/data/corpus/valid.jsonl.xz --max-documents 20")
    ppl.add_argument("files", nargs="+", metavar="FILE", help="text or JSONL files (compressed too)")
    ppl.add_argument("--window", type=int, default=None, metavar="N",
                     help="score in disjoint windows of N tokens, each from a fresh state (default: the whole "
                          "document through the state)")
    ppl.add_argument("--max-documents", type=int, default=None, metavar="N", help="only the first N of each file")
    add_input_arguments(ppl)

    lam = sub.add_parser("lambada", help="LAMBADA: accuracy and perplexity of the last word", formatter_class=fmt,
                         description=_doc("aviary.eval.last_word") + "\nexamples:\n  aviary eval lambada --limit 500"
                                     "\n  aviary eval lambada --file ../shared/data/eval/lambada_austen.jsonl")
    lam.add_argument("--file", default=None, metavar="F",
                     help=f"JSONL passages (default: the LAMBADA test set, {LAMBADA_DEFAULT})")
    lam.add_argument("--protocol", choices=("harness", "rwkv-lm"), default="harness",
                     help="lm-evaluation-harness's lambada_openai (default) or RWKV-LM's script")
    lam.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N passages")

    pos = sub.add_parser("loss-by-position", help="mean loss at each token position, in logarithmic bins",
                         formatter_class=fmt,
                         description=_doc("aviary.eval.positions") + "\nexample:\n  aviary eval loss-by-position "
                                     "../shared/data/corpus/longdocs.jsonl.xz --out runs/positions")
    pos.add_argument("files", nargs="+", metavar="DOCS", help="text or JSONL files (compressed too)")
    pos.add_argument("--out", required=True, metavar="DIR", help="write loss_by_position.csv and .png here")
    pos.add_argument("--max-tokens", type=int, default=None, metavar="N", help="cut each document after N tokens")
    pos.add_argument("--max-documents", type=int, default=None, metavar="N", help="only the first N of each file")
    pos.add_argument("--per-octave", type=int, default=4, metavar="K", help="bins per doubling of the position "
                                                                            "(default 4)")
    add_input_arguments(pos)

    cmp = sub.add_parser("compare", help="what bf16, fp16 or int8 costs against fp32", formatter_class=fmt,
                         description=_doc("aviary.eval.precision") + "\nexample:\n  aviary eval compare "
                                     "--against fp32 --dtypes bf16,int8 --tokens 2048")
    cmp.add_argument("files", nargs="*", metavar="FILE",
                     help=f"held-out text, text or JSONL (default: {HELDOUT_DEFAULT})")
    cmp.add_argument("--against", default="fp32", metavar="NAME", help="the reference precision (default fp32)")
    cmp.add_argument("--dtypes", default="bf16,int8", metavar="A,B",
                     help="precisions to compare: fp32, bf16, fp16, int8, bf16-int8 (default bf16,int8)")
    cmp.add_argument("--tokens", type=int, default=2048, metavar="N", help="positions compared (default 2048)")
    cmp.add_argument("--segment", type=int, default=256, metavar="N",
                     help="tokens per document segment, each from a fresh state (default 256)")
    add_input_arguments(cmp)
    group = cmp.add_argument_group("model")
    group.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    group.add_argument("--tokenizer", default=None, metavar="NAME|PATH", help="default: the model's version's")
    group.add_argument("--adapter", default=None, metavar="FILE", help="a fine-tuning adapter merged into each")
    group.add_argument("--adapter-alpha", type=float, default=None, metavar="ALPHA", help="RWKV-PEFT LoRA alpha")

    for p in (ppl, lam, pos):
        _model_option(p)
        add_model_arguments(p)
        _output_options(p)
    _model_option(cmp)
    _output_options(cmp)

    from aviary.eval.harness import HARNESS_HELP, add_harness_arguments  # imports neither lm-eval nor torch

    add_harness_arguments(sub.add_parser("harness", help=HARNESS_HELP, formatter_class=fmt,
                                         description=_doc("aviary.eval.harness")))


def _doc(module: str) -> str:
    """A module's docstring for --help, read without importing it (the eval modules import torch)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    return (ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or "") + "\n"


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _write_json(path: str | None, payload: object) -> None:
    if path is not None:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))])
                     for r in rows)


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


# ---- actions ---------------------------------------------------------------------------------------


def _ppl(args: argparse.Namespace) -> int:
    from aviary.commands._common import load_model
    from aviary.eval.ppl import perplexity

    _positive(args, "window", "max_documents")
    model, tokenizer, state = load_model(args, args.model)
    results = perplexity(model, tokenizer, args.files, window=args.window, input=args.input, field=args.field,
                         state=state, max_documents=args.max_documents, progress=_progress(args))
    rows = [("file", "documents", "tokens", "loss", "perplexity", "bits/byte")]
    rows += [(r.name, f"{r.documents:,}", f"{r.tokens:,}", f"{r.loss:.4f}", f"{r.perplexity:.2f}",
              f"{r.bits_per_byte:.4f}") for r in results]
    print(_table(rows))
    _write_json(args.json, {"window": args.window, "results": [r.to_dict() for r in results]})
    return 0


def _lambada(args: argparse.Namespace) -> int:
    from aviary.commands._common import load_model
    from aviary.eval.last_word import lambada

    _positive(args, "limit")
    path = args.file
    if path is None:
        if not LAMBADA_DEFAULT.exists():
            raise FileNotFoundError(f"the LAMBADA test set is not at {LAMBADA_DEFAULT}; give a file with --file "
                                    "(JSONL with a \"text\" field, or \"context\" and \"target\")")
        path = str(LAMBADA_DEFAULT)
    model, tokenizer, _ = load_model(args, args.model)
    r = lambada(model, tokenizer, path, protocol=args.protocol, limit=args.limit, progress=_progress(args))
    print(_table([("file", "protocol", "passages", "accuracy", "perplexity"),
                  (os.path.basename(r.file), r.protocol, f"{r.passages:,}",
                   f"{100 * r.accuracy:.2f} % ({r.correct})", f"{r.perplexity:.2f}")]))
    _write_json(args.json, r.to_dict())
    return 0


def _loss_by_position(args: argparse.Namespace) -> int:
    from aviary.commands._common import load_model
    from aviary.eval.positions import loss_by_position, plot_bins, write_csv

    _positive(args, "max_tokens", "max_documents", "per_octave")
    model, tokenizer, _ = load_model(args, args.model)
    bins = loss_by_position(model, tokenizer, args.files, input=args.input, field=args.field,
                            max_tokens=args.max_tokens, max_documents=args.max_documents,
                            per_octave=args.per_octave, progress=_progress(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(bins, out / "loss_by_position.csv")
    print(_table([("positions", "count", "loss")]
                 + [(f"{b.start}-{b.end - 1}", f"{b.count:,}", f"{b.loss:.4f}") for b in bins]))
    print(f"wrote {out / 'loss_by_position.csv'}", file=sys.stderr)
    try:
        plot_bins(bins, out / "loss_by_position.png", title=Path(args.model).name if args.model else "")
        print(f"wrote {out / 'loss_by_position.png'}", file=sys.stderr)
    except ImportError as e:
        print(f"aviary eval: warning: no figure: {e}", file=sys.stderr)
    _write_json(args.json, [b.to_dict() for b in bins])
    return 0


def _compare(args: argparse.Namespace) -> int:
    from aviary.commands._common import resolve_model_path
    from aviary.devices import check_device
    from aviary.eval.precision import VARIANTS, compare
    from aviary.textio import read_documents

    _positive(args, "tokens", "segment")
    check_device(args.device)
    path = resolve_model_path(args.model)
    variants = [v.strip() for v in args.dtypes.split(",") if v.strip()]
    if not variants:
        raise ValueError("--dtypes is empty")
    for name in (args.against, *variants):
        if name not in VARIANTS:
            raise ValueError(f"unknown precision {name!r}; choose from {', '.join(VARIANTS)}")
    adapter = None
    if args.adapter is not None:
        from aviary.peft import read_adapter

        adapter = read_adapter(args.adapter, **({} if args.adapter_alpha is None else {"alpha": args.adapter_alpha}))
    files = args.files or [str(HELDOUT_DEFAULT)]
    docs = [d for f in files for d in read_documents(f, args.input, args.field) if d.strip()]
    r = compare(path, docs, tokenizer=args.tokenizer, against=args.against, variants=variants, tokens=args.tokens,
                segment=args.segment, device=args.device, adapter=adapter)
    rows = [("precision", "loss", "Δ loss", "KL mean", "KL max", "top-1 agree", "logit RMS err"),
            (f"{r['reference']} (reference)", f"{r['loss_ref']:.4f}", "", "", "", "", "")]
    for name, e in r["variants"].items():
        rows.append((name, f"{e['loss']:.4f}", f"{e['loss'] - e['loss_ref']:+.4f}", f"{e['kl_mean']:.2e}",
                     f"{e['kl_max']:.2e}", f"{100 * e['top1_agree']:.2f} %", f"{100 * e['rel_rms']:.2f} %"))
    print(f"{Path(path).name}: {r['positions']} positions in {r['segments']} segments")
    print(_table(rows))
    _write_json(args.json, {"model": Path(path).name, **r})
    return 0


def _harness(args: argparse.Namespace) -> int:
    from aviary.eval.harness import run_harness

    return run_harness(args)


ACTIONS = {"ppl": _ppl, "lambada": _lambada, "loss-by-position": _loss_by_position, "compare": _compare,
           "harness": _harness}


def run(args: argparse.Namespace) -> int:
    return ACTIONS[args.action](args)
