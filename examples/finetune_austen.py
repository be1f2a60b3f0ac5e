"""Fine-tune the bundled default model on two Jane Austen novels it has never seen, with LoRA, with state
tuning and (for comparison) with every weight, and compare the validation loss before and after.

The data is `../shared/data/corpus/longdocs.jsonl.xz` (Persuasion and Northanger Abbey). Each novel is split
at the first paragraph break after 90 % of its characters: the first part is training text, the last ~10 %
of each novel is kept aside for validation and never trained on. Both parts go through `aviary data
prepare`, and each method is one `aviary train` command (printed before it runs). The validation loss is
the trainer's own: the mean loss per token over up to `--val-samples` windows of `--ctx-len` tokens spread
evenly over the held-out text, measured once before the first step (a fine-tuning run logs it as step 0)
and once after the last, on the same windows.

    python examples/finetune_austen.py                        # LoRA, state tuning, full fine-tune (~12 min)
    python examples/finetune_austen.py --methods lora --steps 20 --out runs/austen-try

Results, with the commands and times, are in docs/training.md ("Fine-tuning on real text").
"""

from __future__ import annotations

import argparse
import json
import lzma
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "corpus" / "longdocs.jsonl.xz"

# method -> (peft flags, learning rate peak, final): chosen from short trial runs on this data (docs/training.md)
METHODS = {
    "lora": (["--peft.method", "lora"], 1e-2, 1e-3),
    "state": (["--peft.method", "state"], 1.0, 0.1),
    "full": ([], 3e-3, 3e-4),
}


def split_novels(source: Path, valid_fraction: float) -> tuple[list[dict], list[dict], list[str]]:
    """Each document cut at the first paragraph break at or after (1 - valid_fraction) of its characters:
    (training part of each, validation part of each, a line per document saying where it was cut)."""
    train, valid, notes = [], [], []
    with lzma.open(source, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    for doc in docs:
        text = doc["text"]
        cut = text.find("\n\n", int(len(text) * (1 - valid_fraction)))
        cut = len(text) if cut < 0 else cut
        train.append({"text": text[:cut], "source": doc.get("source", "")})
        valid.append({"text": text[cut:].lstrip("\n"), "source": doc.get("source", "")})
        first_words = " ".join(text[cut:].split()[:8])
        notes.append(f"{doc.get('source', '?')}: {len(text):,} characters; training {cut:,} "
                     f"({100 * cut / len(text):.1f} %), validation from character {cut:,}: \"{first_words} ...\"")
    return train, valid, notes


def write_jsonl(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")


def run(cmd: list[str]) -> float:
    """Run a command, showing it; its wall time in seconds."""
    shown = ["python" if c == sys.executable else c for c in cmd]
    print("\n$ " + shlex.join(shown), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def read_log(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    end = next(r for r in records if r.get("event") == "end")
    vals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r and "event" not in r}
    speeds = sorted(r["tok_per_s"] for r in records if "tok_per_s" in r)
    return {"trainable": start["trainable_parameters"], "params": start["parameters"],
            "before": vals.get(0), "after": end["val_loss"], "train_wall_s": end["wall_s"],
            "tok_per_s": speeds[len(speeds) // 2] if speeds else float("nan"), "steps": end["step"],
            "tokens": end["tokens"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "finetune-austen",
                   help="folder for the split text, the binidx data and one run per method "
                        "(OUT/runs/METHOD is replaced on each run) [runs/finetune-austen]")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the novels, JSONL {text, source} [%(default)s]")
    p.add_argument("--methods", default="lora,state,full",
                   help="comma list of lora, state, full (every weight) [%(default)s]")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per method [%(default)s]")
    p.add_argument("--ctx-len", type=int, default=512, help="tokens per training and validation window [%(default)s]")
    p.add_argument("--micro-bsz", type=int, default=4, help="windows per step [%(default)s]")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="the part of each novel, at its end, kept aside for validation [%(default)s]")
    p.add_argument("--val-samples", type=int, default=64,
                   help="validation windows (at most what the held-out text has) [%(default)s]")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run [%(default)s]")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r; alpha = 2r [%(default)s]")
    for name, (_, lr, _) in METHODS.items():
        p.add_argument(f"--{name}-lr", type=float, default=lr, help=f"peak learning rate of {name} [%(default)s]")
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if not args.data.is_file():
        p.error(f"{args.data}: not found (the shared data folder, ../shared/data, see its README)")

    from aviary.models import default_model_path

    base = str(default_model_path())
    data_dir = args.out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train_docs, valid_docs, notes = split_novels(args.data, args.valid_fraction)
    print("split:\n  " + "\n  ".join(notes))
    write_jsonl(data_dir / "austen-train.jsonl", train_docs)
    write_jsonl(data_dir / "austen-valid.jsonl", valid_docs)
    aviary = [sys.executable, "-m", "aviary"]
    for part in ("train", "valid"):
        run([*aviary, "data", "prepare", "--quiet", "--force", str(data_dir / f"austen-{part}.jsonl"),
             str(data_dir / f"austen-{part}")])

    results = {}
    for method in methods:
        flags, lr, lr_final = METHODS[method]
        if method == "lora":
            flags = [*flags, "--peft.rank", str(args.lora_rank), "--peft.alpha", str(2 * args.lora_rank)]
        lr_final *= getattr(args, f"{method}_lr") / lr  # the same decay ratio for a learning rate given
        lr = getattr(args, f"{method}_lr")
        run_dir = args.out / "runs" / method
        if run_dir.exists():  # a fresh run each time (aviary train would resume from its checkpoint)
            shutil.rmtree(run_dir)
        cmd = [*aviary, "train", "--model.load", base, *flags, "--data.train", str(data_dir / "austen-train"),
               "--data.valid", str(data_dir / "austen-valid"), "--data.ctx_len", str(args.ctx_len),
               "--train.micro_bsz", str(args.micro_bsz), "--train.max_steps", str(args.steps),
               "--train.threads", str(args.threads), "--train.device", "cpu",
               "--optim.lr_init", f"{lr:g}", "--optim.lr_final", f"{lr_final:g}", "--optim.warmup_steps", "5",
               "--out.dir", str(run_dir), "--out.val_samples", str(args.val_samples), "--out.log_every", "5",
               "--out.save_every", str(args.steps), "--out.keep_last", "1", "--out.export", "safetensors",
               "--out.progress", "false"]
        wall = run(cmd)
        r = read_log(run_dir)
        r["lr"], r["wall_s"] = lr, wall
        file = run_dir / ("adapter.safetensors" if flags else "model.safetensors")
        r["file"], r["file_bytes"] = file.name, file.stat().st_size
        results[method] = r

    print(f"\nbase model: {base}")
    print(f"data: {args.data.name}; validation: the last {100 * args.valid_fraction:g} % of each novel; "
          f"{args.steps} steps x {args.micro_bsz} windows x {args.ctx_len} tokens per method")
    header = ("method", "lr", "trainable", "val before", "val after", "change", "file (bf16)", "size",
              "tok/s", "wall s")
    rows = [header]
    for method, r in results.items():
        rows.append((method, f"{r['lr']:g}", f"{r['trainable']:,}", f"{r['before']:.4f}", f"{r['after']:.4f}",
                     f"{r['after'] - r['before']:+.4f}", r["file"], f"{r['file_bytes'] / 1e6:.2f} MB",
                     f"{r['tok_per_s']:.0f}", f"{r['wall_s']:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    print("val: mean loss per token (nats) on the same held-out windows before the first step and after the last; "
          "wall: the whole `aviary train` command (model load, validations, export)")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
