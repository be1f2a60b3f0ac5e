"""Turn a file (or a Hugging Face model folder) into a state dict with the official BlinkDL key names.

Nothing here unpickles arbitrary objects: `.pth`/`.bin` files go through `torch.load(weights_only=True)`,
which only rebuilds tensors and plain containers, and refuses anything that would run code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from aviary.io import names

__all__ = ["CheckpointError", "read_state_dict", "write_state_dict"]

PICKLE_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt"}
SAFETENSORS_SUFFIXES = {".safetensors"}
# A folder written by Hugging Face `save_pretrained`: weights in one of these (possibly sharded)
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not describe a supported model. Names the file."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def _load_pickle(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(path, f"refused to unpickle: the file holds objects other than tensors "
                                    f"(it could run code when loaded), so it is not read ({e})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(path, f"not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # Lightning-style wrapper
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"expected a state dict (name -> tensor), found {type(obj).__name__}")
    return obj


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"not a readable safetensors file (truncated or corrupt?): {e}") from None


def _weight_files(folder: Path) -> list[Path]:
    for stem in HF_WEIGHT_FILES:
        if (folder / stem).is_file():
            return [folder / stem]
        shards = sorted(folder.glob(stem.replace(".", "-*-of-*.", 1)))
        if shards:
            return shards
    found = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES | SAFETENSORS_SUFFIXES)
    if len(found) == 1:
        return found
    raise CheckpointError(folder, f"no weights found: expected one of {HF_WEIGHT_FILES} (or shards), "
                                  f"or exactly one .pth/.safetensors file; found {[p.name for p in found]}")


def _read_file(path: Path) -> dict:
    if path.suffix in SAFETENSORS_SUFFIXES:
        return _load_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _load_pickle(path)
    raise CheckpointError(path, f"unknown checkpoint extension {path.suffix!r}; expected one of "
                                f"{sorted(PICKLE_SUFFIXES | SAFETENSORS_SUFFIXES)} or a model folder")


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Read a checkpoint and return (state dict with official names, source layout name).

    The layout is one of `names.LAYOUTS` ("official", "hf-rwkv4", "hf-rwkv5", "hf-rwkv6", "fla-rwkv7").
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    files = _weight_files(path) if path.is_dir() else [path]
    sd: dict = {}
    for f in files:
        sd.update(_read_file(f))
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    bad = [k for k in bad if k not in names.PIP_CONVERTED_MARKERS]
    if bad:
        raise CheckpointError(path, f"entries that are not tensors: {bad[:5]}")
    try:
        return names.to_official(sd)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None


def write_state_dict(sd: dict[str, torch.Tensor], path: str | os.PathLike, layout: str = "official") -> None:
    """Write official-named `sd` to `path` in `layout`; the format follows the extension
    (.safetensors, or .pth/.pt/.bin). Written to a temporary file first, then renamed."""
    path = Path(path)
    out = names.from_official(sd, layout)
    out = {k: v.detach().contiguous().cpu() for k, v in out.items()}
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file

        save_file(out, str(tmp), metadata={"format": "pt"})
    elif path.suffix in PICKLE_SUFFIXES:
        torch.save(out, tmp)
    else:
        raise CheckpointError(path, f"cannot tell the output format from extension {path.suffix!r}")
    os.replace(tmp, path)
