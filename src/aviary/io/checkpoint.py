"""Turn a file (or a Hugging Face model folder) into a state dict with the official BlinkDL key names,
and back.

Nothing here unpickles arbitrary objects: `.pth`/`.bin` files go through torch's weights-only unpickler,
which only rebuilds tensors and plain containers, and refuses anything that would import or call code.
What a file claims (tensor sizes, storages, zip records) is checked before its data is read
(`aviary.io.torchfile`), so a crafted file cannot make reading allocate more than its own size.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch

from aviary.config import infer_config
from aviary.io import names, torchfile
from aviary.io.hf_config import config_json

__all__ = ["CheckpointError", "read_state_dict", "read_time_state", "weight_files", "write_state_dict"]

PICKLE_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt"}
SAFETENSORS_SUFFIXES = {".safetensors"}
# A folder written by Hugging Face `save_pretrained`: weights in one of these (possibly sharded)
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
FOLDER_WEIGHTS = "model.safetensors"  # what `write_state_dict` writes into a folder


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not describe a supported model. Names the file."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def first_sentence(e: BaseException, limit: int = 200) -> str:
    """The useful part of a library's exception text, on one line."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[:limit] + "..."


def unpickling_problem(e: pickle.UnpicklingError) -> str:
    text = str(e)
    wanted = re.search(r"GLOBAL ([\w.]+)", text)
    if wanted:  # the pickle imports something (os.system, a class, ...): loading it could run code
        return f"refused to load: the pickle asks to import {wanted.group(1)}, which could run code"
    detail = re.search(r"Unsupported [^\n.]*", text)
    return ("not a PyTorch checkpoint of tensors (corrupt, or a pickle the safe weights-only loader "
            f"does not accept){': ' + detail.group(0).strip() if detail else ''}")


def _load_pickle(path: Path, size: int, head: bytes) -> dict:
    try:
        obj = torchfile.load(path, size, head)
    except torchfile.FileError as e:
        raise CheckpointError(path, str(e)) from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(path, unpickling_problem(e)) from None
    except EOFError:
        raise CheckpointError(path, "file ends early (empty, truncated or corrupt)") from None
    except Exception as e:  # garbage bytes make the unpickler fail in any number of ways
        raise CheckpointError(path, f"not a readable PyTorch checkpoint (truncated or corrupt?): "
                                    f"{type(e).__name__}: {first_sentence(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"expected a state dict (name -> tensor), found {type(obj).__name__}")
    return obj


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:  # the library checks its header (offsets inside the file, sizes matching shapes) before reading
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"not a readable safetensors file (truncated or corrupt?): "
                                    f"{first_sentence(e)}") from None


def _is_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian), then '{'."""
    return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


def _check_regular(path: Path) -> None:
    # a device (/dev/zero), FIFO or socket would be read forever, or block, before any check could run
    if path.is_dir():
        raise CheckpointError(path, "is a folder where a weight file was expected")
    if not path.is_file():
        raise CheckpointError(path, "not a regular file (a device, pipe or socket?)")


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files a checkpoint path stands for: the file itself, or the weights of a model folder
    (`model.safetensors`, `pytorch_model.bin`, their shards, or a folder's only .pth/.safetensors).
    Each is a regular file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    if not path.is_dir():
        _check_regular(path)
        return [path]
    try:
        found = _folder_weights(path)
    except PermissionError:
        raise CheckpointError(path, "permission denied: the folder cannot be listed") from None
    for f in found:
        _check_regular(f)
    return found


def _folder_weights(path: Path) -> list[Path]:
    for name in HF_WEIGHT_FILES:
        if (path / name).exists():
            return [path / name]
        shards = sorted(path.glob(name.replace(".", "-*-of-*.", 1)))  # model-00001-of-00002.safetensors
        if shards:
            return shards
    found = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES | SAFETENSORS_SUFFIXES)
    if len(found) == 1:
        return found
    raise CheckpointError(path, f"no weights found: expected one of {HF_WEIGHT_FILES} (or shards), "
                                f"or exactly one .pth/.safetensors file; found {[p.name for p in found]}")


def _read_file(path: Path) -> dict:
    if path.suffix not in PICKLE_SUFFIXES | SAFETENSORS_SUFFIXES:
        raise CheckpointError(path, f"unknown checkpoint extension {path.suffix!r}; expected one of "
                                    f"{sorted(PICKLE_SUFFIXES | SAFETENSORS_SUFFIXES)} or a model folder")
    try:  # opened here first, so that a file we may not read says so (the libraries say "No such file")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(path, f"cannot read the file: {e.strerror or e}") from None
    if path.suffix in SAFETENSORS_SUFFIXES:
        pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")  # PROTO n
        if not _is_safetensors(head, size) and (head.startswith(torchfile.ZIP_MAGIC) or pickled):
            raise CheckpointError(path, "this is a PyTorch checkpoint (zip or pickle), not safetensors: "
                                        "rename it to .pth")
        return _load_safetensors(path)
    if _is_safetensors(head, size):
        raise CheckpointError(path, f"this is a safetensors file, not a PyTorch checkpoint: rename it to "
                                    f"{path.stem}.safetensors")
    return _load_pickle(path, size, head)


def _dtype_problem(sd: dict[str, torch.Tensor]) -> str | None:
    """Weights must be floating point; float64 and float8 are cast on loading, integers and bools are not
    weights, and a complex tensor would lose its imaginary part."""
    bad: dict[str, list[str]] = {}
    for k, v in sd.items():
        if not v.is_floating_point():
            bad.setdefault(str(v.dtype).removeprefix("torch."), []).append(k)
    if not bad:
        return None
    listed = "; ".join(f"{dtype} {', '.join(keys[:4])}{f' ... ({len(keys)} tensors)' if len(keys) > 4 else ''}"
                       for dtype, keys in bad.items())
    return f"weights must be floating-point tensors, but these are not: {listed}"


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Read a checkpoint and return (state dict with official names, source layout name).

    The layout is one of `names.LAYOUTS` ("official", "hf-rwkv4", "hf-rwkv5", "hf-rwkv6", "fla-rwkv7").
    Tensors keep the dtype they have in the file, which must be a floating-point one. A file's claims are
    checked before its data is read (`aviary.io.torchfile`), so reading allocates at most the file's size
    (nothing for a zip-format .pth, which is memory-mapped). Raises CheckpointError naming the file.
    """
    sd: dict = {}
    for f in weight_files(path):
        sd.update(_read_file(f))
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    bad = [k for k in bad if k not in names.PIP_CONVERTED_MARKERS]
    if bad:
        raise CheckpointError(path, f"entries that are not tensors: {bad[:5]}")
    try:
        sd, layout = names.to_official(sd)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    problem = _dtype_problem(sd)
    if problem:
        raise CheckpointError(path, problem)
    return sd, layout


def is_file_path(path: str | os.PathLike) -> bool:
    """Whether `write_state_dict` writes `path` as one file (else as a model folder)."""
    return Path(path).suffix in PICKLE_SUFFIXES | SAFETENSORS_SUFFIXES


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write to a temporary file, then rename, so a failed write never leaves half a checkpoint.
    Every failure is an OSError naming the path (the libraries raise their own types)."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such folder to write {path.name} into")
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:  # an unwritable folder fails here, as a plain PermissionError
            if path.suffix not in SAFETENSORS_SUFFIXES:
                torch.save(tensors, f)
        if path.suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None  # name the file asked for, not the .tmp
    except Exception as e:  # a full disk, in the words of torch or safetensors
        tmp.unlink(missing_ok=True)
        raise OSError(f"{path}: cannot write: {first_sentence(e)}") from None


def write_state_dict(sd: dict[str, torch.Tensor], path: str | os.PathLike,
                     layout: str = "official") -> list[Path]:
    """Write official-named `sd` to `path` in `layout` and return the files written.

    A path ending in .safetensors or .pth/.pt/.bin/.ckpt is one file in that format. Any other path is a
    model folder (names like `rwkv7-0.1b` are common): `model.safetensors` plus, for the Hugging Face and
    fla layouts, a `config.json` for that library.
    """
    path = Path(path)
    out = {k: v.detach().contiguous().cpu() for k, v in names.from_official(sd, layout).items()}
    if is_file_path(path):
        _save(out, path)
        return [path]
    path.mkdir(parents=True, exist_ok=True)
    _save(out, path / FOLDER_WEIGHTS)
    written = [path / FOLDER_WEIGHTS]
    config = config_json(layout, infer_config(sd), sd["emb.weight"].dtype)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        written.append(path / "config.json")
    return written


def read_time_state(path: str | os.PathLike) -> torch.Tensor:
    """The state-tuned starting state in a file: every `blocks.i.att.time_state` tensor (a state-tuning
    run saves only these; a merged checkpoint has them beside the weights), stacked as [L, H, V, K]
    in the official orientation. Raises CheckpointError naming the file."""
    sd: dict = {}
    for f in weight_files(path):
        sd.update(_read_file(f))
    layers = {}
    for key, value in sd.items():
        name = key.removeprefix("_forward_module.") if isinstance(key, str) else ""
        parts = name.split(".")
        if (len(parts) == 4 and parts[0] == "blocks" and parts[1].isdigit() and len(parts[1]) < 10
                and name.endswith(".att.time_state") and isinstance(value, torch.Tensor)):
            layers[int(parts[1])] = value
    if not layers:
        raise CheckpointError(path, "no blocks.N.att.time_state tensors: not a state-tuning file")
    if sorted(layers) != list(range(len(layers))):
        raise CheckpointError(path, f"time_state tensors for layers {sorted(layers)}: some layers are missing")
    problem = _dtype_problem({f"blocks.{i}.att.time_state": t for i, t in layers.items()})
    if problem:
        raise CheckpointError(path, problem)
    shapes = {tuple(t.shape) for t in layers.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise CheckpointError(path, f"time_state tensors must all be [H, N, N], got shapes {sorted(shapes)}")
    return torch.stack([layers[i] for i in range(len(layers))])
