"""What every RWKV generation shares: the version protocol (`VersionSpec`), token shift, the norms, the
state shape of the matrix-state versions, and the helpers of the official initialisation.

The version files (`v4.py` ... `v7.py`) import this module; it imports none of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary.config import ConfigError, ModelConfig
from aviary.cpu.blocks import BlockRecord

__all__ = ["LayerNorm", "ShapeOf", "VersionSpec", "group_norm", "head_sizes", "head_wkv_shape", "lora_width",
           "token_shift", "zero_head_wkv"]


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one spec per version
class VersionSpec:
    """Everything the shared code knows about one RWKV generation. Each `model/vN.py` ends with its `SPEC`;
    `aviary.model.VERSIONS` maps the version number to it.

    time_mix, channel_mix: the mixers of a block, built as `time_mix(config, layer_id)`;
    wkv_shape:     config -> the shape S of one layer's wkv state for one sequence;
    empty_wkv:     (config, batch size, device) -> the state before any token, [B, *S] float32;
    sizes_from_shapes: (shape_of, C, L) -> the sizes of a checkpoint's model that are not C, L, the ffn
                   width or the vocabulary (head size, LoRA ranks), read from its tensors' shapes
                   (`aviary.config.infer_config`); `shape_of(key, ndim)` is the shape of tensor `key`, or
                   a ConfigError when it is missing or has another number of dimensions;
    default_sizes: width C -> the sizes of a new model of that width: `dim_ffn`, the LoRA ranks, and
                   `head_size` where the version fixes it (RWKV-4: C, one "head");
    init:          (model, generator, lr_init) -> None: the official initialisation, in place;
    param_group:   (parameter name, parameter, weight decay) -> (lr multiplier, weight-decayed?): the
                   optimizer group rule of the reference's `configure_optimizers`;
    supports_rescale: whether the fp16 layer rescale applies (`aviary.model.rescale`);
    cpu_block:     where the C decode block finds its fields in a Block (`aviary.cpu.blocks`);
    state_tuning:  whether a checkpoint may carry `blocks.N.att.time_state` (official [H, V, K] layout of
                   wkv_shape; `aviary.state.time_state_to_wkv` converts);
    state_features: wkv [B, L, *S] float32 -> [B, L, ...]: the state as sentence-embedding features
                   (`aviary.embeddings`, method "state"); the state itself unless a version says otherwise."""

    def time_state_shape(self, config: ModelConfig) -> tuple[int, ...]:
        """The official shape of one layer's `att.time_state`: wkv_shape with its last two axes swapped."""
        *head, k, v = self.wkv_shape(config)
        return (*head, v, k)

    version: int
    time_mix: type[nn.Module]
    channel_mix: type[nn.Module]
    wkv_shape: Callable[[ModelConfig], tuple[int, ...]]
    empty_wkv: Callable[[ModelConfig, int, torch.device | str | None], torch.Tensor]
    default_sizes: Callable[[int], dict[str, int]]
    sizes_from_shapes: Callable[[ShapeOf, int, int], dict[str, int]]
    init: Callable[[nn.Module, torch.Generator, float], None]
    param_group: Callable[[str, torch.Tensor, float], tuple[float, bool]]
    supports_rescale: bool
    cpu_block: BlockRecord
    state_tuning: bool = True  # whether its wkv state can be an official state-tuning `time_state` (not v4's)
    state_features: Callable[[torch.Tensor], torch.Tensor] = lambda wkv: wkv

    def __repr__(self) -> str:
        return f"VersionSpec(RWKV-{self.version})"


ShapeOf = Callable[[str, int], tuple[int, ...]]  # (tensor name, expected ndim) -> its shape


def head_sizes(shape_of: ShapeOf, key: str, C: int) -> dict[str, int]:
    """`head_size` from a per-head parameter `key` of shape [H, N] (v5-v7), checked against the width C."""
    n_head, head_size = shape_of(key, 2)
    if n_head * head_size != C:
        raise ConfigError(f"{key.rsplit('.', 1)[-1]} shape {(n_head, head_size)} does not match n_embd={C}")
    return {"head_size": head_size}


# ---- the math shared by every version ---------------------------------------------------------------


def token_shift(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """x [B, T, C], prev [B, C] -> the previous token's x at every position, [B, T, C]."""
    if x.shape[1] == 1:  # decode: the shift is just the stored token (no concatenation)
        return prev[:, None].to(x.dtype)
    return torch.cat([prev[:, None].to(x.dtype), x[:, :-1]], dim=1)


class Embedding(nn.Embedding):
    """nn.Embedding (same parameter and state dict) that leaves a weight on the meta device alone: a model built
    there (to load a checkpoint into, `aviary.loading`) has nothing to initialise, and torch's `normal_` on a meta
    tensor imports torch._dynamo, about 1.4 s of every model load."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state dict) that also normalises an input of another float dtype
    than its parameters, which it then casts: a bfloat16 model's prefill runs in float32 activations where
    torch has no bf16 instructions (see RWKV._run)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w.dtype != x.dtype:
            w, b = w.to(x.dtype), b.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def group_norm(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, n_head: int) -> torch.Tensor:
    """ln_x: GroupNorm with one group per head and eps 64e-5 (= 1e-5 * head_size_divisor**2, with
    the divisor 8 of official training), on [B, T, C]."""
    B, T, C = y.shape
    return F.group_norm(y.reshape(B * T, C), n_head, weight.float(), bias.float(), eps=64e-5).view(B, T, C)


def head_wkv_shape(config: ModelConfig) -> tuple[int, ...]:
    """The wkv state of one layer of RWKV-5/6/7: a [K, V] matrix per head, (H, N, N)."""
    return (config.n_head, config.head_size, config.head_size)


def zero_head_wkv(config: ModelConfig, batch_size: int, device) -> torch.Tensor:
    return torch.zeros(batch_size, *head_wkv_shape(config), device=device)


def lora_width(k: float, C: int) -> int:
    """RWKV-LM's suggested LoRA rank for width C: k*sqrt(C) to a multiple of 32, at least 32."""
    return max(32, int(round(k * C**0.5 / 32) * 32))


# ---- helpers of the official initialisation (reference section 8.1) -----------------------------------
#
# Notation: C width, L layers, V vocabulary; for block i
#     ddd[c] = c / C,  r01 = i / (L - 1),  r1a0 = 1 - i / L


def init_orthogonal(w: torch.Tensor, gain: float, g: torch.Generator, sqrt_ratio: bool = False) -> None:
    """Orthogonal with `gain` (times sqrt(rows/cols) when rows > cols and sqrt_ratio), or zeros for gain 0."""
    if gain == 0:
        w.zero_()
        return
    rows, cols = w.shape[-2], w.shape[-1]
    if sqrt_ratio and rows > cols:
        gain *= math.sqrt(rows / cols)
    nn.init.orthogonal_(w, gain=gain, generator=g)


def layer_ratios(layer_id: int, L: int, C: int) -> tuple[float, float, torch.Tensor]:
    """(r01, r1a0, ddd [C] float64) of block `layer_id`."""
    r01 = layer_id / (L - 1) if L > 1 else 0.0
    r1a0 = 1.0 - layer_id / L
    ddd = torch.arange(C, dtype=torch.float64) / C
    return r01, r1a0, ddd


def init_fill(p: torch.Tensor, value: torch.Tensor | float) -> None:
    """Set p to `value` (a tensor of p's numel, or a number), in p's shape and dtype."""
    if isinstance(value, torch.Tensor):
        p.copy_(value.reshape(p.shape).to(p.dtype))
    else:
        p.fill_(value)


def init_emb_head(model: nn.Module, g: torch.Generator, emb_scale: float) -> None:
    """emb ~ U(-emb_scale, emb_scale) ("SmallInitEmb": ln0 rescales it); head orthogonal with gain
    0.5*sqrt(V/C) (0.5 when V <= C); every LayerNorm weight 1, bias 0."""
    V, C = model.config.vocab_size, model.config.n_embd
    nn.init.uniform_(model.emb.weight, -emb_scale, emb_scale, generator=g)
    init_orthogonal(model.head.weight, 0.5 * math.sqrt(V / C) if V > C else 0.5, g)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_ln_x(att: nn.Module, layer_id: int, L: int) -> None:
    """The time-mix GroupNorm of RWKV-5/6/7: weight ((1 + i) / L)^0.7, bias 0."""
    init_fill(att.ln_x.weight, ((1 + layer_id) / L) ** 0.7)
    att.ln_x.bias.zero_()


# ---- optimizer groups (reference section 8.2) ---------------------------------------------------------


def dims_above_one(p: torch.Tensor) -> int:
    """Dimensions of size > 1 (RWKV-LM's `len(p.squeeze().shape)`; also works on FSDP's sharded DTensors)."""
    return sum(1 for s in p.shape if s != 1)


def group_rule_v4_v6(name: str, p: torch.Tensor, wd: float, needs_weight: bool) -> tuple[float, bool]:
    """RWKV-LM v4neo / v5 `configure_optimizers` (layerwise_lr on, stage 1), first match wins. v4neo
    decays every matrix of 2+ dimensions; v5/v6 (needs_weight) only `.weight` ones."""
    if "_w1" in name or "_w2" in name:
        return 1.0, False
    if "time_mix" in name or "time_maa" in name:
        return 1.0, False
    if "time_decay" in name or "time_daaaa" in name:
        return 2.0, False
    if "time_faaaa" in name:
        return 1.0, False
    if "time_first" in name:
        return 3.0, False
    if dims_above_one(p) >= 2 and wd > 0 and (".weight" in name or not needs_weight):
        return 1.0, True
    return 1.0, False
