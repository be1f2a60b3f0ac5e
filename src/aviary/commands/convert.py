"""Convert a checkpoint between file formats and key layouts: official `.pth` <-> safetensors <->
Hugging Face (transformers RWKV-4, RWKV-5/6 remote code) <-> fla RWKV-7; and RWKV-6/7 to GGUF for llama.cpp
and ollama.

The source format and layout are detected. The output format follows DST: a name ending in .pth or
.safetensors is one file (official names unless --layout says otherwise); any other name is a model
folder with `model.safetensors` and a `config.json`, in the Hugging Face / fla layout of the model's
version unless --layout says otherwise. The checkpoint is checked to describe a complete model
before anything is written.

A DST ending in .gguf is a GGUF file that llama.cpp loads (`llama-cli -m model.gguf`; in ollama, a Modelfile
with `FROM ./model.gguf`), RWKV-6 and RWKV-7 only, its matrices in --outtype (f32, f16 or q8_0; llama.cpp
keeps 1-D and a few small tensors in f32 in any case). It needs the gguf package: pip install 'aviary[gguf]'.

examples:
  aviary convert RWKV-x060-World-1B6.pth rwkv6.safetensors --dtype bfloat16
  aviary convert RWKV-4-Pile-169M.pth rwkv4-hf/                # loads with RwkvForCausalLM.from_pretrained
  aviary convert rwkv7-fla-folder/ RWKV-x070.pth --layout official
  aviary convert RWKV-x070-World-1.5B.pth rwkv7-1.5b-q8_0.gguf --outtype q8_0   # for llama.cpp / ollama
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "convert a checkpoint between .pth, safetensors and Hugging Face / fla layouts, or to GGUF"

DTYPES = ("float32", "bfloat16", "float16")
# aviary.io.gguf.OUTTYPES, written out for the same reason as LAYOUTS below
GGUF_TYPES = ("f32", "f16", "q8_0")


# aviary.io.names.LAYOUTS, written out so that building the CLI's parser (`aviary --help`) does not import
# torch; tests/cli/test_cli_io.py checks that the two agree
LAYOUTS = ("official", "hf-rwkv4", "hf-rwkv5", "hf-rwkv6", "fla-rwkv7")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help=".pth / .safetensors file, or a Hugging Face / fla folder")
    parser.add_argument("dst", metavar="DST", help="output: NAME.pth, NAME.safetensors, NAME.gguf, or a folder")
    parser.add_argument("--layout", choices=LAYOUTS,
                        help="key names to write (default: official for a file, the HF/fla layout of the "
                             "model's version for a folder)")
    parser.add_argument("--dtype", choices=DTYPES, help="cast floating-point tensors (default: keep)")
    parser.add_argument("--outtype", choices=GGUF_TYPES,
                        help="type of the matrices of a .gguf DST (default: f16)")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")


def _check_model(sd: dict, src: str) -> int:
    """Refuse a checkpoint that does not describe a complete model before anything is written; returns
    the RWKV version."""
    from aviary.config import ConfigError
    from aviary.io import CheckpointError
    from aviary.loading import check_state_dict

    try:
        return check_state_dict(sd).version
    except ConfigError as e:
        raise CheckpointError(src, str(e)) from None


def _check_destination(dst: Path) -> None:
    """Fail before reading the source when the file DST cannot be written: one line naming the folder.
    (A folder DST is created with its missing parents; where that fails, the OSError names it.)"""
    import os

    if not dst.parent.is_dir():
        raise FileNotFoundError(f"{dst.parent}: no such folder to write {dst.name} into")
    if not os.access(dst.parent, os.W_OK):
        raise PermissionError(f"{dst.parent}: permission denied: cannot write {dst.name} there")


def _size(paths: list[Path]) -> str:
    n = sum(p.stat().st_size for p in paths)
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n:,} bytes"


def run(args: argparse.Namespace) -> int:
    import torch

    from aviary.io import read_state_dict, write_state_dict
    from aviary.io.checkpoint import is_file_path
    from aviary.io.names import library_layout

    dst = Path(args.dst)
    if dst.exists() and not args.force:
        raise FileExistsError(f"{dst} already exists; pass --force to overwrite it")
    if dst.suffix == ".gguf":
        return _run_gguf(args, dst)
    if args.outtype:
        raise ValueError("--outtype is for a .gguf DST; use --dtype for other formats")
    is_folder = not is_file_path(dst)
    if args.layout == "official" and is_folder:
        raise ValueError(f"{dst}: the official layout is a single file; end DST with .pth or .safetensors")
    if not is_folder:
        _check_destination(dst)

    sd, src_layout = read_state_dict(args.src)
    version = _check_model(sd, args.src)
    layout = args.layout or (library_layout(version) if is_folder else "official")
    if args.dtype:
        dtype = getattr(torch, args.dtype)
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    written = write_state_dict(sd, dst, layout)

    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()})
    contents = ", ".join(p.name for p in written) + ", " if is_folder else ""
    print(f"wrote {dst} ({contents}{_size(written)})")
    print(f"  RWKV-{version}, {len(sd)} tensors, {'/'.join(dtypes)}: {src_layout} -> {layout}")
    return 0


def _run_gguf(args: argparse.Namespace, dst: Path) -> int:
    from aviary.config import detect_version
    from aviary.io import CheckpointError, read_state_dict
    from aviary.io.gguf import GGUFError, require_gguf, write_gguf

    if args.layout or args.dtype:
        raise ValueError("a .gguf DST has llama.cpp's own names and types: use --outtype, not --layout or --dtype")
    require_gguf()  # before reading what may be gigabytes
    _check_destination(dst)
    sd, src_layout = read_state_dict(args.src)
    outtype = args.outtype or "f16"
    try:
        counts = write_gguf(sd, dst, outtype, name=Path(args.src).stem)
    except GGUFError as e:
        raise CheckpointError(args.src, str(e)) from None
    types = ", ".join(f"{n} {t.lower()}" for t, n in sorted(counts.items(), key=lambda x: -x[1]))
    print(f"wrote {dst} ({_size([dst])})")
    print(f"  RWKV-{detect_version(sd)}, {sum(counts.values())} tensors ({types}): {src_layout} -> gguf {outtype}")
    return 0
