"""RWKV-5.2 "Eagle": multi-head matrix-valued state with a static per-channel decay.

    xk, xv, xr, xg = x*mu + sx*(1-mu)                     (time_mix_*, as RWKV-4)
    r, k, v = W xr, W xk, W xv  -> [H, N] per token;  g = silu(W_g xg)
    w = exp(-exp(time_decay))  [H, N], constant over time;  u = time_faaaa [H, N]
    y_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T);   S_t = diag(w) S_{t-1} + k_t v_t^T   (aviary.ops.gla)
    out = W_o (GroupNorm_H(y) * g)

Channel-mix is RWKV-4's. Mirrors RWKV-LM `RWKV-v5/src/model.py` (RWKV_Tmix_x052).
Glossary: H heads, N head size (C = H*N); S [K=N, V=N] per head.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary.config import ModelConfig
from aviary.cpu import Linear
from aviary.cpu.blocks import BlockRecord
from aviary.model.common import (
    VersionSpec,
    group_norm,
    group_rule_v4_v6,
    head_sizes,
    head_wkv_shape,
    init_emb_head,
    init_fill,
    init_ln_x,
    init_orthogonal,
    layer_ratios,
    zero_head_wkv,
)
from aviary.model.v4 import ChannelMix, lerp
from aviary.ops import gla

__all__ = ["CPU_BLOCK", "SPEC", "ChannelMix", "TimeMix", "init_decay_bonus_and_matrices"]


class TimeMix(nn.Module):
    op = "gla"  # its aviary.ops op: the backends a model of this version can use

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.layer_id = layer_id
        self.time_mix_k = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_g = nn.Parameter(torch.ones(1, 1, C))
        self.time_decay = nn.Parameter(torch.zeros(H, N))
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        self.receptance = Linear(C, C, bias=False)
        self.key = Linear(C, C, bias=False)
        self.value = Linear(C, C, bias=False)
        self.gate = Linear(C, C, bias=False)
        self.output = Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    def forward(self, x, sx, wkv, v_first, backend: str, wkv_out=None):
        """x, sx [B, T, C]; wkv [B, H, N, N] -> (out [B, T, C], wkv, v_first unchanged)."""
        B, T, C = x.shape
        H, N = self.time_faaaa.shape
        r = self.receptance(lerp(x, sx, self.time_mix_r)).view(B, T, H, N).float()
        k = self.key(lerp(x, sx, self.time_mix_k)).view(B, T, H, N).float()
        v = self.value(lerp(x, sx, self.time_mix_v)).view(B, T, H, N).float()
        g = F.silu(self.gate(lerp(x, sx, self.time_mix_g)))  # [B, T, C]
        logw = -torch.exp(self.time_decay.float())[None, None]  # [1, 1, H, N]
        y, wkv = gla(r, k, v, logw, self.time_faaaa.float(), wkv, backend=backend, out=wkv_out)
        y = group_norm(y.reshape(B, T, C), self.ln_x.weight, self.ln_x.bias, H)
        return self.output(y.to(x.dtype) * g), wkv, v_first


# Where the C decode block (aviary.cpu.blocks; src/aviary/csrc/blocks.c) finds its fields in a Block.
CPU_BLOCK = BlockRecord(
    version=5,
    params={"ln1_w": "ln1.weight", "ln1_b": "ln1.bias", "ln2_w": "ln2.weight", "ln2_b": "ln2.bias",
            **{f"mix_{n}": f"att.time_mix_{n}" for n in "kvrg"}, "decay": "att.time_decay",
            "faaaa": "att.time_faaaa", "ln_x_w": "att.ln_x.weight", "ln_x_b": "att.ln_x.bias",
            "ffn_mix_k": "ffn.time_mix_k", "ffn_mix_r": "ffn.time_mix_r"},
    products={"receptance": "att.receptance", "key": "att.key", "value": "att.value", "gate": "att.gate",
              "output": "att.output", "ffn_key": "ffn.key", "ffn_receptance": "ffn.receptance",
              "ffn_value": "ffn.value"},
    heads="faaaa", ln_x="att.ln_x")


def default_sizes(C: int) -> dict[str, int]:
    """A new model of width C: ffn int(3.5C) rounded down to a multiple of 32."""
    return {"dim_ffn": int(3.5 * C) // 32 * 32}


def init_decay_bonus_and_matrices(att: nn.Module, ffn: nn.Module, g: torch.Generator, i: int, L: int,
                                  C: int) -> None:
    """What the official initialisation of RWKV-5.2 and RWKV-6 share: decay, bonus, ln_x and the matrices."""
    r01, _, _ = layer_ratios(i, L, C)
    n = torch.arange(C, dtype=torch.float64)
    init_fill(att.time_decay, -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r01))
    init_fill(att.time_faaaa, r01 * (1 - n / (C - 1)) + 0.1 * ((n + 1) % 3 - 1))
    init_ln_x(att, i, L)
    for lin, gain in ((att.receptance, 1.0), (att.key, 0.1), (att.value, 1.0), (att.gate, 0.1), (att.output, 0),
                      (ffn.key, 1.0), (ffn.receptance, 0), (ffn.value, 0)):
        init_orthogonal(lin.weight, gain, g)


def init(model: nn.Module, g: torch.Generator, lr_init: float) -> None:
    """The official initialisation, RWKV-LM `RWKV-v5/src/model.py` (RWKV_Tmix_x052 / RWKV_CMix_x052 and
    generate_init_weight; notation: aviary.model.common)."""
    cfg = model.config
    C, L = cfg.n_embd, cfg.n_layer
    init_emb_head(model, g, 1e-4)
    for i, block in enumerate(model.blocks):
        r01, r1a0, ddd = layer_ratios(i, L, C)
        att, ffn = block.att, block.ffn
        init_decay_bonus_and_matrices(att, ffn, g, i, L, C)
        init_fill(att.time_mix_k, ddd**r1a0)
        init_fill(att.time_mix_v, ddd**r1a0 + 0.3 * r01)
        init_fill(att.time_mix_r, ddd ** (0.5 * r1a0))
        init_fill(att.time_mix_g, ddd ** (0.5 * r1a0))
        init_fill(ffn.time_mix_k, ddd**r1a0)
        init_fill(ffn.time_mix_r, ddd**r1a0)


def sizes_from_shapes(shape_of, C: int, L: int) -> dict[str, int]:
    """The head size from the bonus `time_faaaa` [H, N]."""
    return head_sizes(shape_of, "blocks.0.att.time_faaaa", C)


SPEC = VersionSpec(
    version=5, time_mix=TimeMix, channel_mix=ChannelMix, wkv_shape=head_wkv_shape, empty_wkv=zero_head_wkv,
    default_sizes=default_sizes, sizes_from_shapes=sizes_from_shapes, init=init,
    param_group=partial(group_rule_v4_v6, needs_weight=True),
    supports_rescale=True, cpu_block=CPU_BLOCK)
