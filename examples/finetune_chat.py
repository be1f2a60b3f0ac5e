"""A small chat fine-tune that shows the loss mask at work: LoRA on the bundled default model with the demo
conversations about Velmora, a made-up island (`examples/data/chat-demo.jsonl`, 42 conversations).

Six conversations are kept aside for validation (HELD_OUT below: each asks something that other, training
conversations also state, in other words). Both parts go through `aviary data prepare`, which renders them
in the RWKV World chat format and writes a loss mask: only the assistant's replies are trained, and the
validation loss is the mean loss per token of the assistant's replies of the held-out conversations. The
script runs `aviary train` with LoRA twice, on the masked data and on the same tokens without the mask
(every token trained), each validated on the held-out replies before the first step and every 10 steps; then
it asks the base model and the masked fine-tune (`aviary generate --adapter`, greedy) a few questions.

    python examples/finetune_chat.py                     # ~2 minutes on one CPU thread
    python examples/finetune_chat.py --steps 120 --lr 3e-3 --out runs/chat-try

The default model has 18 M parameters and has seen 1.2 M tokens: expect it to pick up the format and the
words of the replies, and to repeat training answers, not to reason about the island. Results:
docs/training.md ("Fine-tuning on real text").
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHATS = ROOT / "examples" / "data" / "chat-demo.jsonl"
# line numbers (0-based) of the validation conversations: Lantern Night's date (line 7 says it), the airport
# (the ferry: line 40), the gift (salt: line 40), the first settlers (Anka: line 36), Velmora in one sentence,
# brennal and its drink (lines 5, 6)
HELD_OUT = (8, 26, 33, 37, 39, 41)
# questions for generation: two held-out ones, one from the training conversations
QUESTIONS = (("held out", "When is Lantern Night celebrated?"),
             ("held out", "What gift should a visitor bring to a Velmoran home?"),
             ("trained", "What is the capital of Velmora?"))


def run(cmd: list[str], capture: bool = False) -> tuple[str, float]:
    """Run a command, showing it; (its stdout if captured, its wall time in seconds)."""
    shown = ["python" if c == sys.executable else c for c in cmd]
    print("\n$ " + shlex.join(shown), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE if capture else None, text=True)
    return (proc.stdout or ""), time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "finetune-chat",
                   help="folder for the data and the run (OUT/run is replaced on each run) [runs/finetune-chat]")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps [%(default)s]")
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (cosine to a tenth) [%(default)s]")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank) [%(default)s]")
    p.add_argument("--ctx-len", type=int, default=128, help="tokens per window [%(default)s]")
    p.add_argument("--threads", type=int, default=1, help="torch threads [%(default)s]")
    p.add_argument("--no-unmasked", action="store_true",
                   help="skip the comparison run that trains every token of the same data (no loss mask)")
    args = p.parse_args()

    from aviary.models import default_model_path

    base = str(default_model_path())
    data = args.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    lines = CHATS.read_text(encoding="utf-8").splitlines()
    train_lines = [x for i, x in enumerate(lines) if i not in HELD_OUT]
    valid_lines = [lines[i] for i in HELD_OUT]
    (data / "chat-train.jsonl").write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    (data / "chat-valid.jsonl").write_text("\n".join(valid_lines) + "\n", encoding="utf-8")
    print(f"{len(train_lines)} training conversations, {len(valid_lines)} held out (lines {list(HELD_OUT)} of "
          f"{CHATS.relative_to(ROOT)})")
    aviary = [sys.executable, "-m", "aviary"]
    for part in ("train", "valid"):
        run([*aviary, "data", "prepare", "--quiet", "--force", str(data / f"chat-{part}.jsonl"),
             str(data / f"chat-{part}")])
    from aviary.train.data import BinIdx

    valid = BinIdx(str(data / "chat-valid"))
    windows = (len(valid) - 1) // args.ctx_len
    targets, scored = int(valid.get_mask(0, len(valid)).sum()), int(valid.get_mask(1, windows * args.ctx_len).sum())
    print(f"validation: {len(valid)} tokens, {targets} of them assistant tokens; {windows} windows of "
          f"{args.ctx_len} score {scored} of those")

    # the same LoRA run twice: on the masked data (only replies trained), and on the same tokens without the
    # mask (every token trained, as a plain-text fine-tune would); both validated on the held-out replies
    for name in ("bin", "idx"):
        shutil.copyfile(data / f"chat-train.{name}", data / f"chat-train-nomask.{name}")
    runs = {}
    for kind, prefix in (("masked", "chat-train"), ("unmasked", "chat-train-nomask")):
        if kind == "unmasked" and args.no_unmasked:
            continue
        run_dir = args.out / ("run" if kind == "masked" else "run-unmasked")
        if run_dir.exists():  # a fresh run each time (aviary train would resume from its checkpoint)
            shutil.rmtree(run_dir)
        _, wall = run([*aviary, "train", "--model.load", base, "--peft.method", "lora", "--peft.rank",
                       str(args.rank), "--peft.alpha", str(2 * args.rank), "--data.train", str(data / prefix),
                       "--data.valid", str(data / "chat-valid"), "--data.ctx_len", str(args.ctx_len),
                       "--train.micro_bsz", "4", "--train.max_steps", str(args.steps), "--train.threads",
                       str(args.threads), "--train.device", "cpu", "--optim.lr_init", f"{args.lr:g}",
                       "--optim.lr_final", f"{args.lr / 10:g}", "--optim.warmup_steps", "5",
                       "--optim.weight_decay", "0", "--out.dir", str(run_dir), "--out.val_every", "10",
                       "--out.log_every", "5", "--out.save_every", str(args.steps), "--out.keep_last", "1",
                       "--out.export", "safetensors", "--out.progress", "false"])
        records = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
        runs[kind] = {"trainable": next(r for r in records if r.get("event") == "start")["trainable_parameters"],
                      "val_loss": {r["step"]: r["val_loss"] for r in records if "val_loss" in r and "event" not in r},
                      "train_loss": {r["step"]: r["loss"] for r in records if "loss" in r}, "wall_s": wall}
    vals, losses, wall = runs["masked"]["val_loss"], runs["masked"]["train_loss"], runs["masked"]["wall_s"]
    unmasked = runs.get("unmasked", {}).get("val_loss", {})
    adapter = args.out / "run" / "adapter.safetensors"

    answers = []
    for kind, question in QUESTIONS:
        prompt = f"User: {question}\\n\\nAssistant:"  # the chat format; aviary generate reads the escapes
        flags = [prompt, "-n", "48", "--temperature", "0", "--presence-penalty", "0", "--frequency-penalty", "0",
                 "--stop", "\\n\\n"]
        before, _ = run([*aviary, "generate", *flags], capture=True)
        after, _ = run([*aviary, "generate", "--adapter", str(adapter), *flags], capture=True)
        answers.append((kind, question, before.strip(), after.strip()))

    print(f"\nLoRA r {args.rank}, alpha {2 * args.rank}: {runs['masked']['trainable']:,} trainable parameters; "
          f"{args.steps} steps x 4 windows x {args.ctx_len} tokens, lr {args.lr:g}; {wall:.0f} s; "
          f"adapter {adapter.stat().st_size / 1e6:.2f} MB (bf16)")
    print("validation loss: mean per token of the held-out assistant replies (nats)")
    print("step  masked: train loss (replies)  masked: validation  unmasked (every token trained): validation")
    for step in sorted(set(vals) | {s for s in losses if s % 10 == 0}):
        cells = [f"{d[step]:.3f}" if step in d else "-" for d in (losses, vals, unmasked)]
        print(f"{step:4d}  {cells[0]:>28}  {cells[1]:>18}  {cells[2]:>48}")
    for kind, question, before, after in answers:
        print(f"\n[{kind}] User: {question}\n  base:       {before!r}\n  fine-tuned: {after!r}")
    (args.out / "results.json").write_text(json.dumps(
        {"runs": runs, "adapter_bytes": adapter.stat().st_size, "answers": answers}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
