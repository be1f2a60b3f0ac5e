"""Options shared by the verbs that run a model (generate, chat, serve): which model, how to load it,
which tokenizer, and the sampling settings."""

from __future__ import annotations

import argparse
import os
import re


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="weight precision (float16 needs a GPU; default: float32)")
    group.add_argument("--quantize", default=None, choices=["int8"],
                       help="int8: int8 weight-only block linears and head (faster CPU decode, small logit error; "
                            "see docs/benchmarks.md)")
    group.add_argument("--tokenizer", default=None, metavar="NAME|PATH",
                       help="world, 20b, or a vocabulary/tokenizer file (default: the one for the model's version)")
    group.add_argument("--state", default=None, metavar="FILE",
                       help="start from this state: a file saved by Aviary (chat /save, RWKVState.save) or an "
                            "official state-tuning file with blocks.N.att.time_state tensors")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int = 200) -> None:
    group = parser.add_argument_group("sampling (defaults: the reference pipeline's)")
    group.add_argument("-n", "--max-tokens", type=int, default=max_tokens,
                       help=f"tokens to generate (default {max_tokens})")
    group.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    group.add_argument("--top-p", type=float, default=0.85, help="nucleus mass to keep (default 0.85)")
    group.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    group.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * max prob (default 0 = off)")
    group.add_argument("--presence-penalty", type=float, default=0.2, help="(default 0.2)")
    group.add_argument("--frequency-penalty", type=float, default=0.2, help="(default 0.2)")
    group.add_argument("--penalty-decay", type=float, default=0.996,
                       help="per-token decay of the counts (default 0.996)")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop before this text (repeatable; escapes like \\n are understood)")
    group.add_argument("--ban", action="append", type=int, default=[], metavar="ID", help="never emit this token id")
    group.add_argument("--seed", type=int, default=None, help="make sampling reproducible")


_ESCAPE = re.compile(r"\\(?:([\\nrt0])|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))")
_SIMPLE = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t", "0": "\0"}


def unescape(text: str) -> str:
    """`\\n` typed on a command line -> a newline. Understood: \\n \\r \\t \\0 \\\\ \\xHH \\uHHHH
    \\UHHHHHHHH; anything else (an unknown escape, a surrogate) stays as typed, so `C:\\xfiles` is no error."""
    def one(m: re.Match) -> str:
        simple, *hexes = m.groups()
        if simple:
            return _SIMPLE[simple]
        code = int(next(h for h in hexes if h), 16)
        return chr(code) if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else m.group(0)  # no surrogates

    return _ESCAPE.sub(one, text)


def sampling_params(args: argparse.Namespace, **fixed):
    from aviary.generation import SamplingParams

    settings = dict(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, min_p=args.min_p, presence_penalty=args.presence_penalty,
                    frequency_penalty=args.frequency_penalty, penalty_decay=args.penalty_decay,
                    stop=tuple(unescape(s) for s in args.stop), banned_tokens=tuple(args.ban), seed=args.seed)
    settings.update(fixed)
    return SamplingParams(**settings)


def resolve_model_path(model: str | None) -> str:
    if model is not None:
        if not os.path.exists(model):
            raise FileNotFoundError(f"no such checkpoint: {model}")
        return model
    from aviary.models import default_model_path

    return str(default_model_path())


def load_model(args: argparse.Namespace, model: str | None):
    """(model, tokenizer, starting state or None) from the parsed options."""
    import aviary
    from aviary.devices import check_device

    check_device(args.device)
    path = resolve_model_path(model)
    net = aviary.load(path, device=args.device, dtype=args.dtype, quantize=args.quantize)
    tokenizer = aviary.load_tokenizer(args.tokenizer, version=net.config.version)
    state = None
    if args.state:
        state = load_start_state(net, args.state, args.device)
    return net, tokenizer, state


def load_start_state(model, path: str, device: str = "cpu"):
    """An Aviary state file -> that state; a state-tuning file -> None, after making its time_state the
    model's initial state (so every new sequence starts from it)."""
    import torch

    from aviary.io import CheckpointError, read_time_state
    from aviary.state import RWKVState, StateError

    try:
        state = RWKVState.load(path, device=device)
    except StateError as not_ours:
        try:
            wkv = read_time_state(path)
        except CheckpointError as not_official:
            raise StateError(f"{path}: neither an Aviary state file ({not_ours}) nor a state-tuning file "
                             f"({not_official})") from None
        if not wkv.is_floating_point() or not bool(torch.isfinite(wkv).all()):
            why = f"is {wkv.dtype}" if not wkv.is_floating_point() else "holds NaN or Inf values"
            raise StateError(f"{path}: the state-tuning file's time_state {why}") from None
        try:
            model.set_initial_state(wkv.float().transpose(-1, -2).to(device))  # official [H, V, K] -> [H, K, V]
        except StateError as e:
            raise StateError(f"{path}: {e}") from None
        return None
    model.check_state(state, 1)
    return state
