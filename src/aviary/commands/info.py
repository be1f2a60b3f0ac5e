"""Show what a checkpoint holds, without building the model: RWKV version, file format and key layout,
every size (layers, width, heads, ffn, LoRA ranks, vocabulary), the parameter count, the recurrent
state size per sequence, the dtypes in the file, whether it carries a state-tuned `time_state`, and what
a decode step on this CPU would run on. A checkpoint that `aviary.load` would refuse (a damaged file,
missing tensors, integer weights, ...) is an error here too; only NaN/infinite values are not looked for,
since that would read every weight. `--system` shows this machine's CPU backend instead: the CPU, the
instruction sets Aviary's C kernels were built for and can run here, the one in use (AVIARY_CPU_ISA
forces one: avx512, avx2, generic, torch), and why the kernels are missing if they failed to build.

examples:
  aviary info RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth
  aviary info --json ./rwkv7-hf-folder
  aviary info --system
  AVIARY_CPU_ISA=generic aviary info --system --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter
from typing import Any

HELP = "show a checkpoint's version, sizes, parameter count and state size"

VERSION_NAMES = {4: "RWKV-4", 5: 'RWKV-5.2 "Eagle"', 6: 'RWKV-6 "Finch"', 7: 'RWKV-7 "Goose"'}
# ModelConfig field -> the name `aviary info` shows for that LoRA rank
LORA_RANKS = {"rank_mix": "mix", "rank_decay": "decay", "rank_w": "w", "rank_a": "a", "rank_v": "v",
              "rank_g": "g"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?",
                        help=".pth / .safetensors file, or a Hugging Face / fla model folder")
    parser.add_argument("--system", action="store_true",
                        help="show this machine's CPU backend (instruction sets, the one in use, build problems)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _file_format(path: str | os.PathLike) -> str:
    from aviary.io.checkpoint import SAFETENSORS_SUFFIXES, weight_files

    files = weight_files(path)
    safetensors = files[0].suffix in SAFETENSORS_SUFFIXES
    kind = "safetensors" if safetensors else "PyTorch pickle (read with weights_only)"
    if os.path.isdir(path):
        shown = files[0].name if len(files) == 1 else f"{len(files)} shards {files[0].name} ..."
        return f"{kind}, folder with {shown}"
    return kind


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Everything `aviary info` shows, as plain data. Raises CheckpointError naming the file."""
    from aviary.config import ConfigError
    from aviary.io import CheckpointError, read_state_dict
    from aviary.loading import check_state_dict
    from aviary.model import VERSIONS

    sd, layout = read_state_dict(path)  # refuses files that are not sound, or whose tensors are not floats
    time_state = sorted(k for k in sd if k.endswith(".att.time_state"))
    try:
        config = check_state_dict(sd)  # a complete model: what `aviary.load` would accept
    except ConfigError as e:
        raise CheckpointError(path, str(e)) from None
    wkv = math.prod(VERSIONS[config.version].wkv_shape(config))
    return {
        "path": str(path),
        "format": _file_format(path),
        "layout": layout,
        "version": config.version,
        "version_name": VERSION_NAMES[config.version],
        "config": config.to_dict(),
        "n_head": config.n_head,
        # a state-tuned time_state is a starting state, not a weight of the network
        "parameters": sum(t.numel() for k, t in sd.items() if k not in time_state),
        # token-shift vectors for att and ffn plus the wkv memory of every layer, all float32
        "state_bytes": config.n_layer * (2 * config.n_embd + wkv) * 4,
        "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in sd.values()).most_common()),
        "time_state": bool(time_state),
        "cpu_decode": cpu_decode(),
    }


def cpu_decode() -> str:
    """What a float32/bfloat16/int8 decode step of a model loaded on this CPU runs on (without building it):
    every version has a C block, so that is the instruction set in use and the C blocks, or torch."""
    from aviary import cpu

    info = cpu.backend_info()
    if info["isa"] == "torch":
        why = "forced by AVIARY_CPU_ISA" if info["forced"] else "aviary._kernels is not built (aviary info --system)"
        return f"torch's kernels ({why})"
    dot = ", bf16 with the dot-product instruction" if info["bf16_dot"] else ""
    return f"C kernels, {info['isa']}: all blocks of a step in one C call{dot}, {info['threads']} threads"


def system() -> dict[str, Any]:
    """This machine's CPU backend, as plain data (aviary.cpu.backend_info)."""
    from aviary import cpu

    return cpu.backend_info()


def _system_table(info: dict[str, Any]) -> list[tuple[str, str]]:
    runnable = [n for n in info["runnable"] if n != "torch"]
    rows = [
        ("cpu", f"{info['cpu']} ({info['machine']})"),
        ("kernels built for", ", ".join(info["built"]) or "none"),
        ("runnable here", ", ".join(runnable) or "none (torch's kernels only)"),
        ("in use", info["isa"] + (f" (forced: AVIARY_CPU_ISA={info['forced']})" if info["forced"] else
                                  " (the best this CPU runs)" if info["isa"] != "torch" else "")),
        ("bf16 products", "bf16 dot-product instruction (x rounded to bf16)" if info["bf16_dot"]
         else "widened to float32" if info["isa"] != "torch" else "torch"),
        ("threads", str(info["threads"])),
    ]
    if info["build_error"]:
        rows.append(("build error", info["build_error"].strip()))
    return rows


def _table(info: dict[str, Any]) -> list[tuple[str, str]]:
    cfg = info["config"]
    if info["version"] == 4:
        heads = "none (one decay per channel)"
    else:
        heads = f"{info['n_head']} x head size {cfg['head_size']}"
    ranks = ", ".join(f"{name} {cfg[field]}" for field, name in LORA_RANKS.items() if cfg[field])
    dtypes = ", ".join(f"{name} ({count} tensors)" for name, count in info["dtypes"].items())
    return [
        ("checkpoint", info["path"]),
        ("format", info["format"]),
        ("layout", info["layout"]),
        ("version", info["version_name"]),
        ("layers", str(cfg["n_layer"])),
        ("width", str(cfg["n_embd"])),
        ("heads", heads),
        ("ffn", str(cfg["dim_ffn"])),
        ("LoRA ranks", ranks or "none"),
        ("vocab", str(cfg["vocab_size"])),
        ("parameters", f"{info['parameters']:,} ({_short(info['parameters'])})"),
        ("state", f"{info['state_bytes']:,} bytes per sequence (fp32)"),
        ("dtypes", dtypes),
        ("time_state", "yes (state-tuned: its initial state is used)" if info["time_state"] else "no"),
        ("cpu decode", info["cpu_decode"]),
    ]


def _short(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def run(args: argparse.Namespace) -> int:
    if args.system:
        info, rows = system(), None
        if args.checkpoint is not None:
            raise ValueError("--system describes this machine: give it without a CHECKPOINT")
    elif args.checkpoint is None:
        raise ValueError("give a CHECKPOINT (or --system for this machine's CPU backend)")
    else:
        info = describe(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        rows = _system_table(info) if args.system else _table(info)
        width = max(len(label) for label, _ in rows)
        for label, value in rows:
            print(f"{label:<{width}}  {value}")
    return 0
