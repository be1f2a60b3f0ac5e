"""Key-name layouts of RWKV checkpoints and the maps between them and the official BlinkDL names."""

from __future__ import annotations

import torch

LAYOUTS = ("official",)
# keys the rwkv pip package adds to files it has converted (pre-transposed, possibly int8)
PIP_CONVERTED_MARKERS = ("_strategy", "_version", "_rescale_layer")


def to_official(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    if any(k in sd for k in PIP_CONVERTED_MARKERS):
        raise ValueError("this file was converted by the rwkv pip package for one strategy "
                         "(transposed, maybe int8); load the original checkpoint instead")
    prefix = "_forward_module."  # DeepSpeed stage-3 wrapper
    sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    return sd, "official"


def from_official(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    if layout != "official":
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    return dict(sd)
