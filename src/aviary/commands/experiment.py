"""Run one of the RWKV papers' experiments and write its table and figure.

  aviary experiment mqar --preset cpu --jobs 2 --out-dir mqar/      multi-query associative recall (Zoology's task)
  aviary experiment speed --preset cpu --out-dir speed/              time and memory of each mixer against length
  aviary experiment long-context --preset cpu --out-dir lc/          loss by position: RWKV against a Transformer

`aviary experiment NAME --help` lists an experiment's options. Each is also `python -m aviary.experiments.NAME`
(long-context: `long_context`); docs/evaluation.md has the measured results and the exact commands.
"""

from __future__ import annotations

import argparse
import importlib

HELP = "run a paper experiment: MQAR, speed and memory against length, loss by position"

EXPERIMENTS = {
    "mqar": "aviary.experiments.mqar",
    "speed": "aviary.experiments.speed",
    "long-context": "aviary.experiments.long_context",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", choices=sorted(EXPERIMENTS), metavar="EXPERIMENT",
                   help=f"one of {', '.join(sorted(EXPERIMENTS))}")
    # the experiment's own options: its parser is built in run(), so that `aviary --help` does not import torch
    p.add_argument("options", nargs=argparse.REMAINDER, help="the experiment's options (see EXPERIMENT --help)")


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(EXPERIMENTS[args.experiment])
    parser = type(args._parser)(prog=f"aviary experiment {args.experiment}", description=module.DESCRIPTION,
                                epilog=getattr(module, "EPILOG", None))
    module.add_arguments(parser)
    module.run_command(parser.parse_args(args.options), parser)
    return 0
