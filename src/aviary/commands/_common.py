"""Options shared by several verbs: for those that run a model (generate, chat, serve), which model, how to
load it, which tokenizer, and the sampling settings; for those that read text (tokenize, data prepare), how
an input file splits into documents."""

from __future__ import annotations

import argparse
import os
import re


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="weight precision (float16 needs a GPU; default: float32)")
    group.add_argument("--backend", default="chunked", metavar="NAME",
                       help="how prompts (sequences) run: chunked (default), recurrent, or a GPU backend of the "
                            "model's version: fla (RWKV-5/6/7 on CUDA, pip install aviary[gpu]) or triton "
                            "(docs/training.md, Backends); one-token decode steps are the same for all")
    group.add_argument("--quantize", default=None, choices=["int8"],
                       help="int8: int8 weight-only block linears and head (faster CPU decode, small logit error; "
                            "see docs/benchmarks.md)")
    group.add_argument("--tokenizer", default=None, metavar="NAME|PATH",
                       help="world, 20b, or a vocabulary/tokenizer file (default: the one for the model's version)")
    group.add_argument("--state", default=None, metavar="FILE",
                       help="start from this state: a file saved by Aviary (chat /save, RWKVState.save) or an "
                            "official state-tuning file with blocks.N.att.time_state tensors")
    group.add_argument("--adapter", default=None, metavar="FILE",
                       help="a fine-tuning adapter (LoRA, PiSSA, MiSS or state tuning; Aviary's or RWKV-PEFT's "
                            ".pth/.safetensors), merged into the weights when the model loads (docs/finetuning.md)")
    group.add_argument("--adapter-alpha", type=float, default=None, metavar="ALPHA",
                       help="LoRA alpha of an RWKV-PEFT LoRA adapter (its files do not record it)")


def add_input_arguments(parser: argparse.ArgumentParser, chat: bool = False) -> None:
    """--input and --field: how each input file splits into documents (aviary.textio); with `chat`, also
    --input chat (JSONL conversations, `aviary data prepare`)."""
    from aviary.textio import FORMATS

    parser.add_argument("--input", choices=(*FORMATS, "chat") if chat else FORMATS, default="auto",
                        help="how a file splits into documents: doc (the whole file), lines (each line), jsonl "
                             "(one JSON object per line)"
                             + (', chat (one conversation per line: {"messages": [...]} or {"prompt", '
                                '"completion"})' if chat else "")
                             + "; default auto: *.jsonl, *.ndjson, *.json -> jsonl"
                             + (" (chat if the first line is a conversation)" if chat else "")
                             + ", any other -> doc (also when compressed: .gz .bz2 .xz .lzma .zst)")
    parser.add_argument("--field", default="text", help='the text field of jsonl documents (default "text")')


def add_chat_format_argument(parser, recorded: bool = True) -> None:
    """--chat-format: how chat messages become a prompt (aviary.chat_format; standard library only)."""
    from aviary.chat_format import FORMATS

    names = "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values())
    default = ("the format recorded with the model (a MODEL.aviary.json sidecar, safetensors metadata, or an "
               "official G1/Raven file name), else world") if recorded else "world"
    parser.add_argument("--chat-format", choices=list(FORMATS), default=None, metavar="NAME",
                        help=f"the chat format ({names}; default: {default})")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int = 200) -> None:
    """One option per SamplingParams field that has flags (aviary.generation.params.SETTINGS), with the
    reference pipeline's defaults (SamplingParams.reference()) and `max_tokens` for -n."""
    from aviary.generation.params import SETTINGS, SamplingParams

    defaults = SamplingParams.reference(max_new_tokens=max_tokens)
    group = parser.add_argument_group("sampling (defaults: the reference pipeline's)")
    for s in SETTINGS:
        if not s.flags:
            continue
        kind = unescape if s.kind is str else s.kind
        if s.many:  # repeatable
            group.add_argument(*s.flags, dest=s.name, type=kind, action="append", default=[],
                               metavar="TEXT" if s.kind is str else "ID", help=f"{s.help} (repeatable)")
        else:
            default = getattr(defaults, s.name)
            group.add_argument(*s.flags, dest=s.name, type=kind, default=default,
                               metavar=s.flags[-1].lstrip("-").replace("-", "_").upper(),
                               help=s.help if default is None else f"{s.help} (default {default})")


def sampling_params(args: argparse.Namespace, **fixed):
    """SamplingParams from the options `add_sampling_arguments` made; `fixed` overrides."""
    from aviary.generation.params import SETTINGS, SamplingParams

    return SamplingParams(**{**{s.name: getattr(args, s.name) for s in SETTINGS if s.flags}, **fixed})


def parse_setting(assignment: str, params):
    """chat's `/set NAME=VALUE` -> a new SamplingParams, validated. NAME is a field name (`-` for `_`);
    a list is comma-separated (`stop=\\n\\n,User:`, `banned_tokens=1,2`); `seed=none` clears the seed."""
    import dataclasses

    from aviary.generation.params import SETTINGS

    name, sep, value = (part.strip() for part in assignment.partition("="))
    setting = {s.name: s for s in SETTINGS}.get(name.replace("-", "_"))
    if not sep or setting is None:
        raise ValueError(f"use /set NAME=VALUE with NAME one of {', '.join(s.name for s in SETTINGS)}")
    if setting.many and setting.kind is str:
        parsed = tuple(unescape(v) for v in value.split(",") if v)
    elif setting.many:
        parsed = tuple(setting.kind(v) for v in value.split(",") if v.strip())
    elif setting.optional and value.lower() == "none":
        parsed = None
    else:
        parsed = setting.kind(value)
    return dataclasses.replace(params, **{setting.name: parsed})  # validates the value


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
    from aviary.loading import load_start_state

    check_device(args.device)
    path = resolve_model_path(model)
    adapter = getattr(args, "adapter", None)
    if adapter is not None:
        from aviary.peft import read_adapter

        alpha = getattr(args, "adapter_alpha", None)
        adapter = read_adapter(adapter, **({} if alpha is None else {"alpha": alpha}))
    net = aviary.load(path, device=args.device, dtype=args.dtype, quantize=args.quantize, adapter=adapter,
                      backend=getattr(args, "backend", "chunked"))
    tokenizer = aviary.load_tokenizer(args.tokenizer, version=net.config.version)
    state = load_start_state(net, args.state, args.device) if args.state else None
    return net, tokenizer, state
