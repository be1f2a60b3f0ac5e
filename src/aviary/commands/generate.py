"""Continue a prompt with an RWKV model and stream the text to the terminal.

The prompt runs through the parallel form in chunks, then tokens are sampled one at a time through the
recurrent form. Sampling defaults are the reference pipeline's (temperature 1, top-p 0.85, presence and
frequency penalties 0.2 decaying by 0.996 per token); `--temperature 0` is greedy and repeatable.
With one positional argument it is the prompt and the bundled default model is used.

examples:
  aviary generate "The Eiffel tower is in the city of"
  aviary generate RWKV-x070-World-0.1B.pth "Once upon a time" -n 100 --temperature 0.8 --seed 1
  aviary generate model.pth "Q: why is the sky blue?\\n\\nA:" --stop "\\n\\n" --temperature 0
  aviary generate model.pth --prompt-file story.txt --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
import time

from aviary.commands._common import add_model_arguments, add_sampling_arguments, load_model, sampling_params, unescape

HELP = "continue a prompt and stream the text"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="[MODEL] PROMPT",
                        help="checkpoint (default: the bundled model) and the prompt; escapes like \\n are understood")
    parser.add_argument("--prompt-file", default=None, help="read the prompt from this file (UTF-8)")
    parser.add_argument("--stats", action="store_true",
                        help="print prefill and decode speed, and what the decode step ran on, to stderr at the end")
    add_model_arguments(parser)
    add_sampling_arguments(parser)


def _split(args: argparse.Namespace) -> tuple[str | None, str]:
    positional = list(args.args)
    if args.prompt_file is not None:
        if len(positional) > 1:
            raise ValueError("give a MODEL and --prompt-file, not a prompt as well")
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return (positional[0] if positional else None), f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{args.prompt_file}: not UTF-8 text (byte {e.start})") from None
    if len(positional) == 1:
        return None, unescape(positional[0])
    if len(positional) == 2:
        return positional[0], unescape(positional[1])
    raise ValueError("give [MODEL] PROMPT (or --prompt-file)")


def run(args: argparse.Namespace) -> int:
    from aviary.generation import Engine

    model_path, prompt = _split(args)
    params = sampling_params(args)
    model, tokenizer, state = load_model(args, model_path)
    engine = Engine(model, tokenizer)
    t0 = time.perf_counter()
    seq = engine.add(prompt, params, state=state)
    t1 = time.perf_counter()
    while engine.has_work:
        for _, piece in engine.step():
            sys.stdout.write(piece)
            sys.stdout.flush()
    t2 = time.perf_counter()
    sys.stdout.write("\n")
    if args.stats:
        n_prompt, n_new = len(seq.prompt_tokens), len(seq.tokens)
        print(f"prefill {n_prompt} tokens in {t1 - t0:.2f} s ({n_prompt / max(t1 - t0, 1e-9):.1f} tok/s); "
              f"decode {n_new} tokens in {t2 - t1:.2f} s ({n_new / max(t2 - t1, 1e-9):.1f} tok/s); "
              f"finish: {seq.finish_reason}", file=sys.stderr)
        print(f"decode path: {model.decode_path}", file=sys.stderr)
    return 0
