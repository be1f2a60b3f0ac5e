"""The `aviary` command. One verb per user intent; `--help` comes from the same table that dispatches.

Each verb lives in `aviary/commands/<verb>.py` and defines `HELP` (one line), `add_arguments(parser)`
and `run(args) -> int`. Command modules import heavy dependencies (torch, ...) inside `run`, so
`aviary --help` stays fast.

Errors. Bad input (a missing or malformed file, an option out of range, a device this machine lacks) is
an *expected* error: `main` prints it as one line, `aviary VERB: error: ...`, and returns 2. Anything else
is a bug and keeps its traceback. The expected errors are `EXPECTED_ERRORS`: ValueError (Aviary's own
errors derive from it: CheckpointError, StateError, ConfigError, DataError, GenerationError), OSError and
EOFError. Code that calls a library which reports bad input in some other way (torch.load's RuntimeError,
safetensors' SafetensorError, a decompressor's LZMAError) converts the error where it knows the file or
option, `raise CheckpointError(path, "...") from None`, so that the line names it; it does not widen
EXPECTED_ERRORS, since catching RuntimeError here would hide bugs as well. Option syntax errors
(argparse) are printed as one line too, and exit with 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

COMMANDS: dict[str, str] = {
    "info": "aviary.commands.info",
    "convert": "aviary.commands.convert",
    "merge": "aviary.commands.merge",
    "generate": "aviary.commands.generate",
    "chat": "aviary.commands.chat",
    "serve": "aviary.commands.serve",
    "tokenize": "aviary.commands.tokenize",
    "data": "aviary.commands.data",
    "train": "aviary.commands.train",
    "eval": "aviary.commands.eval",
    "experiment": "aviary.commands.experiment",
    "embed": "aviary.commands.embed",
}

# what `main` reports in one line with exit code 2 (see the module docstring)
EXPECTED_ERRORS = (ValueError, OSError, EOFError)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other expected error (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def one_line(e: BaseException) -> str:
    """An exception's message on one line (some libraries' messages span several)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines) or type(e).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="aviary", description="RWKV-4/5/6/7: load official checkpoints, inspect, convert.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads that spin steal the core the next small op needs on a shared CPU (docs/benchmarks.md,
    # Design measurements item 1). OpenMP reads the variable when torch loads, which has not happened yet:
    # `import aviary` is lazy (aviary/__init__.py) and the command modules import torch inside run(). An
    # explicit OMP_WAIT_POLICY from the user wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # reported by the verb's parser, which knows the verb's options (argparse uses the top one)
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # a warning (NaN logits, a missing optional speed-up) is one line too, not Python's file:line and source
    show_warning = warnings.showwarning
    warnings.showwarning = lambda message, category, *_, **__: print(
        f"aviary {args.command}: warning: {message}", file=sys.stderr)
    try:
        return int(args._run(args) or 0)
    except EXPECTED_ERRORS as e:  # bad input: one clear line, no traceback
        print(f"aviary {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        warnings.showwarning = show_warning


if __name__ == "__main__":
    sys.exit(main())
