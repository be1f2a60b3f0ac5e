"""The `aviary` command. One verb per user intent; `--help` comes from the same table that dispatches.

Each verb lives in `aviary/commands/<verb>.py` and defines `HELP` (one line), `add_arguments(parser)`
and `run(args) -> int`. Command modules import heavy dependencies (torch, ...) inside `run`, so
`aviary --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, str] = {
    "info": "aviary.commands.info",
    "convert": "aviary.commands.convert",
    "generate": "aviary.commands.generate",
    "chat": "aviary.commands.chat",
    "serve": "aviary.commands.serve",
    "tokenize": "aviary.commands.tokenize",
    "data": "aviary.commands.data",
    "train": "aviary.commands.train",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aviary", description="RWKV-4/5/6/7: load official checkpoints, inspect, convert.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads that spin steal the core the next small op needs: on a shared 2-core machine one
    # RWKV-7 decode step measured 950 ms spinning vs 72 ms passive (docs/benchmarks.md). OpenMP reads it
    # when torch loads, which has not happened yet: `import aviary` is lazy (aviary/__init__.py) and the
    # command modules import torch inside run(). An explicit OMP_WAIT_POLICY from the user wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, OSError) as e:  # user errors: one clear line, no traceback
        print(f"aviary {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
