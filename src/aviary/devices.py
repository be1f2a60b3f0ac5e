"""A device name from a user -> a device this machine has, or one clear error saying why not.

torch reports a missing GPU with an AssertionError or a RuntimeError, and only once something is moved
there (after a model has loaded); this check runs first.
"""

from __future__ import annotations

import torch

__all__ = ["check_device"]


def check_device(name: str, option: str = "--device", hint: str = "--device cpu") -> torch.device:
    """`name` ("auto", "cpu", "cuda", "cuda:1", "mps") -> the torch device, or a ValueError naming `option`.
    "auto" is cuda when a GPU is usable, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{option} {name!r} is not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} {name}: no CUDA device (this torch {torch.__version__} has no CUDA support or "
                         f"sees no GPU); use {hint}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option} {name}: MPS (Apple GPU) is not available here; use {hint}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{option} {name}: Aviary runs on cpu, cuda and mps devices")
    return device
