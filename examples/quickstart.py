"""Aviary quickstart: write a checkpoint in the official RWKV format, inspect it, load it, run it.

Until the project ships its own trained model, this uses RANDOM WEIGHTS (the output is noise): the
point is the workflow and the checks, not the text. Replace `path` with a real RWKV-4/5/6/7 `.pth`
to run a released model the same way.

    python examples/quickstart.py [--version 7] [--out DIR]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

import aviary
from aviary.cli import main as aviary_cli
from aviary.testing import random_config, save_random_checkpoint


def run(version: int, out: Path) -> None:
    path = out / f"random-rwkv{version}.pth"
    config = random_config(version, n_layer=4, n_embd=256, vocab_size=65536)
    save_random_checkpoint(path, config, seed=0)
    print(f"NOTE: {path} holds RANDOM weights in the official RWKV-{version} format (not a trained model).\n")

    aviary_cli(["info", str(path)])  # version, sizes and state size, read from keys and shapes

    model = aviary.load(path, dtype="float32")
    tokens = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t0 = time.perf_counter()
        logits, state = model(tokens)  # parallel form over the whole prompt
        prefill_s = time.perf_counter() - t0
        first, mid = model(tokens[:, :40])  # the same prompt in two calls, carrying the state
        rest, _ = model(tokens[:, 40:], mid)
        t0 = time.perf_counter()
        for _ in range(16):  # recurrent decoding, one token at a time: constant time and memory per token
            next_token = logits[:, -1:].argmax(-1)
            logits, state = model(next_token, state)
        decode_s = (time.perf_counter() - t0) / 16
    split_err = (torch.cat([first, rest], 1) - model(tokens)[0]).abs().max().item()
    print(f"\nprefill 64 tokens: {prefill_s * 1e3:.1f} ms;  decode: {decode_s * 1e3:.1f} ms/token")
    print(f"split prefill vs one call: max |logit difference| = {split_err:.2e}")
    print(f"state: {state.nbytes / 1024:.0f} KiB per sequence, whatever the context length")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", type=int, default=7, choices=[4, 5, 6, 7])
    parser.add_argument("--out", type=Path, default=None, help="folder for the checkpoint (default: a temp dir)")
    args = parser.parse_args()
    if args.out is None:
        with tempfile.TemporaryDirectory() as tmp:
            run(args.version, Path(tmp))
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        run(args.version, args.out)
