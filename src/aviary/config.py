"""Model configuration: a frozen dataclass, inferred from a checkpoint's keys and shapes.

`infer_config` is the one place that knows how to read an official (BlinkDL key names) state dict
and say which RWKV generation it is and how big every part is. Detection follows the rule in the
reference doc (section 7.2): v7 keys (`att.r_k`) first, then v6 (`time_maa`), then v5 (`ln_x`), else v4.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

__all__ = ["ModelConfig", "ConfigError", "infer_config"]

VERSIONS = (4, 5, 6, 7)


class ConfigError(ValueError):
    """A state dict whose keys or shapes do not describe a supported RWKV model."""


@dataclass(frozen=True)
class ModelConfig:
    """Every size a model needs. LoRA ranks that a version lacks are 0.

    version:    4, 5 (5.2 "Eagle"), 6 ("Finch") or 7 ("Goose")
    n_layer:    number of blocks L
    n_embd:     model width C
    vocab_size: V (rows of emb.weight; 65536 for World models)
    dim_ffn:    channel-mix hidden width F
    head_size:  N, channels per head (v5-v7; C for v4, which has no heads)
    rank_mix, rank_decay:            v6 LoRA ranks of time_maa_w1 / time_decay_w1
    rank_w, rank_a, rank_v, rank_g:  v7 LoRA ranks of w1 / a1 / v1 / g1
    """

    version: int
    n_layer: int
    n_embd: int
    vocab_size: int
    dim_ffn: int
    head_size: int = 64
    rank_mix: int = 0
    rank_decay: int = 0
    rank_w: int = 0
    rank_a: int = 0
    rank_v: int = 0
    rank_g: int = 0

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ConfigError(f"version must be one of {VERSIONS}, got {self.version}")
        for name in ("n_layer", "n_embd", "vocab_size", "dim_ffn", "head_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.head_size:
            raise ConfigError(f"n_embd={self.n_embd} is not a multiple of head_size={self.head_size}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# a block index as official files write it: no leading zeros, and never absurdly long
_BLOCK = re.compile(r"^blocks\.(0|[1-9]\d{0,8})\.")


def _shape(sd: Mapping[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in sd:
        raise ConfigError(f"missing tensor '{key}'")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise ConfigError(f"tensor '{key}' has shape {shape}: expected {ndim} dimensions")
    return shape


def block_count(sd: Mapping[str, torch.Tensor]) -> int:
    """The number of blocks: their indices must run 0, 1, ..., n-1 without a gap. (Taking the largest
    index instead would let one stray key claim a hundred million layers.)"""
    indices = sorted({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})
    if indices != list(range(len(indices))):
        shown = ", ".join(map(str, indices[:4])) + (f", ..., {indices[-1]}" if len(indices) > 4 else "")
        raise ConfigError(f"block indices must run 0, 1, 2, ... without gaps; found blocks {shown}")
    return len(indices)


def detect_version(sd: Mapping[str, torch.Tensor]) -> int:
    """Which RWKV generation an official-named state dict belongs to (reference doc section 7.2)."""
    if "emb.weight" not in sd or not any(_BLOCK.match(k) for k in sd):
        raise ConfigError(
            "unknown key layout: expected official RWKV names ('emb.weight', 'blocks.0.att...'); "
            f"first keys are {sorted(sd)[:5]}"
        )
    if "blocks.0.att.r_k" in sd or "blocks.0.att.k_k" in sd:
        return 7
    if any("time_maa" in k for k in sd):
        return 6
    if any(".ln_x." in k for k in sd):
        decay = sd.get("blocks.0.att.time_decay")
        if "blocks.0.att.gate.weight" in sd and decay is not None and decay.dim() == 2 and decay.shape[1] > 1:
            return 5
        raise ConfigError("RWKV-5.0/5.1 checkpoints (per-head decay) are not supported; only 5.2 (Eagle)")
    if "blocks.0.att.time_first" in sd:
        return 4
    raise ConfigError(f"unknown key layout: cannot tell the RWKV version from keys {sorted(sd)[:8]}")


def infer_config(sd: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Read version and every size from an official-named state dict. Raises ConfigError.

    Only the shapes are read, so `sd` may hold meta tensors. Whether every tensor is there with the
    shape these sizes imply is for `aviary.loading.check_state_dict` to say."""
    from aviary.model import VERSIONS  # here, not at the top: aviary.model imports this module

    version = detect_version(sd)
    vocab_size, n_embd = _shape(sd, "emb.weight", 2)
    n_layer = block_count(sd)
    dim_ffn = _shape(sd, "blocks.0.ffn.key.weight", 2)[0]
    fields = VERSIONS[version].sizes_from_shapes(lambda key, ndim: _shape(sd, key, ndim), n_embd, n_layer)
    return ModelConfig(version=version, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size,
                       dim_ffn=dim_ffn, **fields)
