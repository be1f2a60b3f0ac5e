"""Merge a fine-tuning adapter into its base model: an official-format checkpoint that every RWKV runtime loads.

ADAPTER is a LoRA, PiSSA, MiSS or state-tuning adapter, written by Aviary (`aviary train` with a peft section,
`aviary.peft.save_adapter`) or by RWKV-PEFT (its `rwkv-N.pth`). The method and rank come from the file; an
RWKV-PEFT LoRA file does not record its alpha, so give --alpha (the merged update is alpha/rank * B A). A PiSSA
adapter needs its initial factors: NAME.init_pissa.pth (.safetensors) beside Aviary's NAME.pth (.safetensors),
init_pissa.pth beside RWKV-PEFT's file, or --init-pissa. A state-tuning adapter becomes `blocks.N.att.time_state`
in OUT, which aviary and the rwkv pip package read as the starting state. OUT is .pth or .safetensors; the
adapter is checked against BASE before anything is written.

examples:
  aviary merge RWKV-x070-World-0.1B.pth runs/lora/adapter.safetensors merged.pth
  aviary merge RWKV-x070-World-0.1B.pth rwkv-peft-out/rwkv-0.pth merged.pth --alpha 32
  aviary merge base.pth runs/pissa/adapter.pth merged.safetensors --dtype bfloat16
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "merge a LoRA / PiSSA / MiSS / state-tuning adapter into its base model"

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="the base model the adapter was trained on (.pth, .safetensors, "
                                                     "or a Hugging Face / fla folder)")
    parser.add_argument("adapter", metavar="ADAPTER", help="the adapter (.pth or .safetensors)")
    parser.add_argument("out", metavar="OUT", help="output checkpoint: NAME.pth or NAME.safetensors (official names)")
    parser.add_argument("--alpha", type=float, help="LoRA alpha, for RWKV-PEFT LoRA files (ours record it)")
    parser.add_argument("--init-pissa", metavar="FILE", help="PiSSA's initial factors, when not beside the adapter")
    parser.add_argument("--dtype", choices=DTYPES, help="cast the output (default: the base's dtype)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")


def run(args: argparse.Namespace) -> int:
    import torch

    from aviary.commands.convert import _check_destination, _check_model, _size
    from aviary.io import CheckpointError, read_state_dict, write_state_dict
    from aviary.peft import AdapterError, merge, read_adapter

    out = Path(args.out)
    if out.suffix not in (".pth", ".safetensors"):
        raise ValueError(f"{out}: the merged checkpoint is one file; end OUT with .pth or .safetensors")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    _check_destination(out)
    overrides = {k: v for k, v in (("alpha", args.alpha), ("init_pissa", args.init_pissa)) if v is not None}
    adapter = read_adapter(args.adapter, **overrides)
    sd, _layout = read_state_dict(args.base)
    _check_model(sd, args.base)
    try:
        merged = merge(sd, adapter)
    except AdapterError as e:
        raise CheckpointError(args.adapter, f"does not fit {args.base}: {e}") from None
    if args.dtype:
        dtype = getattr(torch, args.dtype)
        merged = {k: v.to(dtype) if v.is_floating_point() else v for k, v in merged.items()}
    version = _check_model(merged, str(out))
    written = write_state_dict(merged, out)

    cfg = adapter.config
    what = {"lora": f"LoRA rank {cfg.rank}, alpha {cfg.alpha:g}", "pissa": f"PiSSA rank {cfg.rank}",
            "miss": f"MiSS ({cfg.miss_mode}) rank {cfg.rank}", "state": "state tuning"}[cfg.method]
    for note in adapter.notes:
        print(f"{args.adapter}: {note}")
    print(f"wrote {out} ({_size(written)})")
    print(f"  RWKV-{version}, {what}, {len(adapter.tensors)} adapter tensors merged into {len(merged)} tensors")
    return 0
