"""Training checkpoints (written atomically, last N kept) and export to the official `.pth` / safetensors.

A training checkpoint `DIR/checkpoints/step-00001000.pt` holds everything an exact resume needs: the fp32
weights, the optimizer state, the step and the config. The data order is a pure function of the step
(`sampler.WindowSampler`), so nothing else is needed: a resumed run computes the same losses, bit for bit
in fp32 on CPU, as one that was never stopped.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["export", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint"]

_NAME = re.compile(r"^step-(\d{8,})\.pt$")
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | os.PathLike, step: int, payload: dict[str, Any], keep_last: int) -> Path:
    """Write `payload` as DIR/checkpoints/step-N.pt through a temporary file and a rename, then delete all
    but the newest `keep_last`. A crash at any moment leaves either the old set or the new one."""
    d = Path(run_dir) / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step-{step:08d}.pt"
    tmp = d / f".{path.name}.tmp"
    torch.save(payload, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint's payload. Raises CheckpointError naming the file when it is unreadable (a
    truncated copy, a pickle that would run code) or lacks the model, optimizer or step."""
    from aviary.io.checkpoint import CheckpointError, first_sentence, unpickling_problem

    fix = "delete it to resume from the checkpoint before it, or choose another --out.dir"
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing them itself
            warnings.simplefilter("ignore")
            # weights_only: a checkpoint holds tensors, numbers, strings and dicts only; nothing runs on load
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(path, f"{unpickling_problem(e)}; {fix}") from None
    except Exception as e:  # a damaged file fails inside torch.load in any number of ways
        raise CheckpointError(path, f"not a readable training checkpoint (truncated or corrupt?): "
                                    f"{type(e).__name__}: {first_sentence(e)}; {fix}") from None
    if not (isinstance(payload, dict) and isinstance(payload.get("optimizer"), dict)
            and isinstance(payload.get("model"), dict)
            and all(isinstance(v, torch.Tensor) for v in payload["model"].values())
            and type(payload.get("step")) is int and payload["step"] >= 0):
        raise CheckpointError(path, f"not a training checkpoint (expected a model state dict, an optimizer state "
                                    f"and a step); {fix}")
    return payload


def export(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, dtype: str = "bf16") -> Path:
    """Write official-named weights as `.pth` or `.safetensors` (by suffix), cast to `dtype`.
    The result loads with `aviary.load` and with the `rwkv` pip package."""
    from aviary.io import write_state_dict

    cast = EXPORT_DTYPES[dtype]
    sd = {k: v.detach().to("cpu", cast).contiguous() for k, v in state_dict.items()}
    write_state_dict(sd, path)
    return Path(path)
