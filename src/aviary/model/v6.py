"""RWKV-6 "Finch": data-dependent token shift ("ddlerp") and data-dependent decay, through small LoRAs.

    xx  = sx - x;   xxx = x + xx*maa_x
    m_f = tanh(xxx W1)[f] W2[f]            for f in (w, k, v, r, g)     (this order, as in the checkpoints)
    x_f = x + xx*(maa_f + m_f)             maa = 1 keeps the previous token (opposite sense to RWKV-4/5)
    r, k, v = W x_r, W x_k, W x_v;   g = silu(W_g x_g)
    w_t = exp(-exp(time_decay + tanh(x_w Wd1) Wd2))       per token and channel
    y, S: as RWKV-5 (aviary.ops.gla);   out = W_o (GroupNorm_H(y) * g)

Channel-mix:  xk = x + xx*maa_k;  xr = x + xx*maa_r;  out = sigmoid(W_r xr) * W_v relu(W_k xk)^2.
Mirrors RWKV-LM `RWKV-v5/src/model.py` (RWKV_Tmix_x060, RWKV_CMix_x060).
Glossary: D_mix = rank of time_maa_w1/w2, D_dec = rank of time_decay_w1/w2.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary.config import ModelConfig
from aviary.cpu import Linear, matmul
from aviary.cpu.blocks import BlockRecord
from aviary.model.common import (
    VersionSpec,
    group_norm,
    group_rule_v4_v6,
    head_sizes,
    head_wkv_shape,
    init_emb_head,
    init_fill,
    layer_ratios,
    zero_head_wkv,
)
from aviary.model.v5 import init_decay_bonus_and_matrices
from aviary.ops import gla

__all__ = ["CPU_BLOCK", "SPEC", "ChannelMix", "TimeMix"]


class TimeMix(nn.Module):
    op = "gla"  # its aviary.ops op: the backends a model of this version can use

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        D, Dd = config.rank_mix, config.rank_decay
        self.layer_id = layer_id
        for name in ("x", "w", "k", "v", "r", "g"):
            setattr(self, f"time_maa_{name}", nn.Parameter(torch.zeros(1, 1, C)))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * D))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, D, C))
        self.time_decay = nn.Parameter(torch.zeros(1, 1, C))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, Dd))
        self.time_decay_w2 = nn.Parameter(torch.zeros(Dd, C))
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
        xx = sx - x  # [B, T, C]
        xxx = torch.addcmul(x, xx, self.time_maa_x)  # x + xx*maa, one op
        h = torch.tanh(matmul(xxx, self.time_maa_w1)).view(B * T, 5, -1).transpose(0, 1)  # [5, B*T, D]
        mw, mk, mv, mr, mg = matmul(h.contiguous(), self.time_maa_w2).view(5, B, T, C)  # each [B, T, C]
        xw = torch.addcmul(x, xx, self.time_maa_w + mw)
        xk = torch.addcmul(x, xx, self.time_maa_k + mk)
        xv = torch.addcmul(x, xx, self.time_maa_v + mv)
        xr = torch.addcmul(x, xx, self.time_maa_r + mr)
        xg = torch.addcmul(x, xx, self.time_maa_g + mg)
        r = self.receptance(xr).view(B, T, H, N).float()
        k = self.key(xk).view(B, T, H, N).float()
        v = self.value(xv).view(B, T, H, N).float()
        g = F.silu(self.gate(xg))  # [B, T, C]
        wlog = self.time_decay + matmul(torch.tanh(matmul(xw, self.time_decay_w1)), self.time_decay_w2)  # [B, T, C]
        logw = -torch.exp(wlog.float()).view(B, T, H, N)
        y, wkv = gla(r, k, v, logw, self.time_faaaa.float(), wkv, backend=backend, out=wkv_out)
        y = group_norm(y.reshape(B, T, C), self.ln_x.weight, self.ln_x.bias, H)
        return self.output(y.to(x.dtype) * g), wkv, v_first


class ChannelMix(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C, F_ = config.n_embd, config.dim_ffn
        self.time_maa_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = Linear(C, F_, bias=False)
        self.receptance = Linear(C, C, bias=False)
        self.value = Linear(F_, C, bias=False)

    def forward(self, x, sx):
        xx = sx - x
        k = torch.relu(self.key(torch.addcmul(x, xx, self.time_maa_k))).square()  # [B, T, F]
        return torch.sigmoid(self.receptance(torch.addcmul(x, xx, self.time_maa_r))) * self.value(k)


# Where the C decode block (aviary.cpu.blocks; src/aviary/csrc/blocks.c) finds its fields in a Block.
CPU_BLOCK = BlockRecord(
    version=6,
    params={"ln1_w": "ln1.weight", "ln1_b": "ln1.bias", "ln2_w": "ln2.weight", "ln2_b": "ln2.bias",
            **{f"maa_{n}": f"att.time_maa_{n}" for n in ("x", "w", "k", "v", "r", "g", "w1", "w2")},
            "decay": "att.time_decay", "decay_w1": "att.time_decay_w1", "decay_w2": "att.time_decay_w2",
            "faaaa": "att.time_faaaa", "ln_x_w": "att.ln_x.weight", "ln_x_b": "att.ln_x.bias",
            "ffn_maa_k": "ffn.time_maa_k", "ffn_maa_r": "ffn.time_maa_r"},
    products={"receptance": "att.receptance", "key": "att.key", "value": "att.value", "gate": "att.gate",
              "output": "att.output", "ffn_key": "ffn.key", "ffn_receptance": "ffn.receptance",
              "ffn_value": "ffn.value"},
    lora_pairs=(("maa_w1", "maa_w2", 5), ("decay_w1", "decay_w2", 1)),
    heads="faaaa", ln_x="att.ln_x")


def default_sizes(C: int) -> dict[str, int]:
    """A new model of width C: ffn int(3.5C) rounded down to a multiple of 32; LoRA ranks 32 (mix) and 64
    (decay), doubled from C = 4096 (RWKV-LM `RWKV-v5/src/model.py`, RWKV_Tmix_x060)."""
    big = C >= 4096
    return {"dim_ffn": int(3.5 * C) // 32 * 32, "rank_mix": 64 if big else 32, "rank_decay": 128 if big else 64}


def init(model: nn.Module, g: torch.Generator, lr_init: float) -> None:
    """The official initialisation, RWKV-LM `RWKV-v5/src/model.py` (RWKV_Tmix_x060 / RWKV_CMix_x060 and
    generate_init_weight; notation: aviary.model.common)."""
    cfg = model.config
    C, L = cfg.n_embd, cfg.n_layer
    init_emb_head(model, g, 1e-4)
    for i, block in enumerate(model.blocks):
        r01, r1a0, ddd = layer_ratios(i, L, C)
        att, ffn = block.att, block.ffn
        init_decay_bonus_and_matrices(att, ffn, g, i, L, C)
        for name in ("x", "w", "k"):
            init_fill(getattr(att, f"time_maa_{name}"), 1 - ddd**r1a0)
        init_fill(att.time_maa_v, 1 - (ddd**r1a0 + 0.3 * r01))
        init_fill(att.time_maa_r, 1 - ddd ** (0.5 * r1a0))
        init_fill(att.time_maa_g, 1 - ddd ** (0.5 * r1a0))
        att.time_maa_w1.zero_()
        nn.init.uniform_(att.time_maa_w2, -0.01, 0.01, generator=g)
        att.time_decay_w1.zero_()
        nn.init.uniform_(att.time_decay_w2, -0.01, 0.01, generator=g)
        init_fill(ffn.time_maa_k, 1 - ddd ** (r1a0**3))
        init_fill(ffn.time_maa_r, 1 - ddd ** (r1a0**3))


def sizes_from_shapes(shape_of, C: int, L: int) -> dict[str, int]:
    """The head size from the bonus `time_faaaa` [H, N]; the LoRA ranks from `time_maa_w2` [5, rank, C]
    and `time_decay_w1` [C, rank]."""
    return {**head_sizes(shape_of, "blocks.0.att.time_faaaa", C),
            "rank_mix": shape_of("blocks.0.att.time_maa_w2", 3)[1],
            "rank_decay": shape_of("blocks.0.att.time_decay_w1", 2)[1]}


SPEC = VersionSpec(
    version=6, time_mix=TimeMix, channel_mix=ChannelMix, wkv_shape=head_wkv_shape, empty_wkv=zero_head_wkv,
    default_sizes=default_sizes, sizes_from_shapes=sizes_from_shapes, init=init,
    param_group=partial(group_rule_v4_v6, needs_weight=True),
    supports_rescale=True, cpu_block=CPU_BLOCK)
