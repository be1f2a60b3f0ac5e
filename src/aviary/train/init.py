"""A new model's sizes and its official initialisation (reference section 8.1).

Both are the version's (`aviary.model.VERSIONS[v]`): `default_sizes` gives the ffn width and LoRA ranks of a
new model of width C, and `init` fills a freshly built model in place, next to the parameters it sets in
`model/vN.py`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from aviary.config import ConfigError, ModelConfig
from aviary.model import VERSIONS

__all__ = ["init_model", "model_config"]


def model_config(version: int, n_layer: int, n_embd: int, vocab_size: int = 65536, head_size: int = 64,
                 dim_ffn: int = 0, **ranks: int) -> ModelConfig:
    """A ModelConfig with the version's default ffn width (unless dim_ffn) and LoRA ranks for this width,
    unless given (`rank_g=32`, ...; 0 means the default)."""
    if version not in VERSIONS:
        raise ConfigError(f"version must be one of {tuple(VERSIONS)}, got {version}")
    sizes = {"head_size": head_size, **VERSIONS[version].default_sizes(n_embd)}
    if dim_ffn:
        sizes["dim_ffn"] = dim_ffn
    for name, rank in ranks.items():
        if name not in sizes or not name.startswith("rank_"):
            raise ConfigError(f"RWKV-{version} has no LoRA rank {name!r} (it has "
                              f"{', '.join(k for k in sizes if k.startswith('rank_'))})")
        if rank:
            sizes[name] = rank
    return ModelConfig(version=version, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, **sizes)


@torch.no_grad()
def init_model(model: nn.Module, seed: int = 0, lr_init: float = 6e-4) -> nn.Module:
    """Fill `model` (an aviary RWKV on a real device) with the official initialisation, deterministically."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    model.spec.init(model, g, lr_init)
    return model
