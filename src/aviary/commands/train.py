"""Train an RWKV-4/5/6/7 model from scratch with the official recipe, continue from a checkpoint, or fine-tune
an adapter (LoRA, PiSSA, MiSS) or the starting state of one (--peft.method).

CONFIG is a YAML or TOML file with the sections below; every field can also be set (or overridden) on the
command line as `--section.field VALUE`. Data is binidx made by `aviary data prepare` (or by RWKV-LM's
make_data.py); chat data carries a loss mask, and only its target tokens are trained. The run directory
(--out.dir) receives log.jsonl, loss.png, checkpoints/ (written atomically, the last --out.keep_last kept;
with --peft.method only the adapter and the optimizer state) and, at the end, model.safetensors / model.pth
in the official format (the merged model after a fine-tune, with adapter.safetensors / adapter.pth beside
it). Running the same command again resumes exactly from the newest checkpoint. --train.chunk_len runs long
samples in chunks that carry the recurrent state (docs/training.md).

Several processes: launch the same command with torchrun; DDP is used (FSDP with --train.strategy fsdp).
  torchrun --nproc-per-node 8 -m aviary train CONFIG
  torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-endpoint HOST:29500 -m aviary train CONFIG

examples:
  aviary train configs/aviary-v7-tiny.yaml
  aviary train configs/aviary-v7-tiny.yaml --train.max_steps 100 --out.dir runs/try
  aviary train --model.load RWKV-x070-World-0.1B.pth --data.train data/mine --optim.lr_init 1e-5
  aviary train configs/finetune-lora.yaml
  aviary train --model.load RWKV-x070-World-0.1B.pth --data.train data/chat --peft.method state \
      --optim.lr_init 1 --optim.lr_final 0.01 --data.ctx_len 4096 --train.chunk_len 512
"""

from __future__ import annotations

import argparse

HELP = "train or fine-tune a model (YAML/TOML config, options override it)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from aviary.train.config import add_config_arguments

    parser.add_argument("config", metavar="CONFIG", nargs="?", help="YAML or TOML config file (optional)")
    parser.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import json
    import os

    from aviary.train.config import config_from_args

    cfg = config_from_args(args, args.config)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    cfg.validate()
    from aviary.train import train

    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    last = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    print(f"trained {result.steps} steps, {result.tokens:,} tokens in {result.wall_s:.0f} s{last}{val}; "
          f"run directory {result.run_dir}")
    for p in result.exported:
        print(f"exported {p}")
    return 0
