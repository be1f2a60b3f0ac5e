"""RWKV-7 "Goose": the generalised delta rule with a vector-valued, data-dependent decay.

    xx = sx - x;   x_f = x + xx*x_f                       for f in r, w, k, v, a, g
    r, k, v = W x_r, W x_k, W x_v
    decay = exp(-e^{-1/2} sigmoid(w0 + tanh(x_w w1) w2))   in (0.545, 1), soft-clamped
    v = v + (v_first - v) * sigmoid(v0 + (x_v v1) v2)     layers >= 1 (value residual to layer 0's v)
    a = sigmoid(a0 + (x_a a1) a2)                         "in-context learning rate"
    g = sigmoid(x_g g1) g2                                (no activation after g2)
    kk = normalize_per_head(k * k_k);   k = k * (1 + (a-1) k_a)
    S_t = diag(decay) S_{t-1} - (kk a) (kk^T S_{t-1}) + k v^T;   y_t = S_t^T r_t   (aviary.ops.delta)
    y = GroupNorm_H(y) + (sum_head r*k*r_k) v;            out = W_o (y * g)

Channel-mix: out = W_v relu(W_k (x + xx*x_k))^2 (no receptance gate).
Mirrors RWKV-LM `RWKV-v7/rwkv_v7_demo.py` and the pip package's `RWKV_x070_TMix_seq`.
Glossary: Dw, Da, Dv, Dg = LoRA ranks of w, a, v, g. Layer 0's v0/v1/v2 exist in official files but are unused.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary.config import ModelConfig
from aviary.cpu import Linear, matmul, steps
from aviary.cpu.blocks import BlockRecord
from aviary.model.common import (
    VersionSpec,
    dims_above_one,
    group_norm,
    head_sizes,
    head_wkv_shape,
    init_emb_head,
    init_fill,
    init_ln_x,
    init_orthogonal,
    layer_ratios,
    lora_width,
    zero_head_wkv,
)
from aviary.ops import delta_rule

__all__ = ["CPU_BLOCK", "SPEC", "ChannelMix", "TimeMix"]

DECAY_SCALE = math.exp(-0.5)  # the pip package writes 0.606531


def _vec(C: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(1, 1, C))


class TimeMix(nn.Module):
    op = "delta_rule"  # its aviary.ops op: the backends a model of this version can use

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.layer_id = layer_id
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
            setattr(self, name, _vec(C))
        for name, rank in (("w", config.rank_w), ("a", config.rank_a), ("v", config.rank_v), ("g", config.rank_g)):
            setattr(self, f"{name}1", nn.Parameter(torch.zeros(C, rank)))
            setattr(self, f"{name}2", nn.Parameter(torch.zeros(rank, C)))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = Linear(C, C, bias=False)
        self.key = Linear(C, C, bias=False)
        self.value = Linear(C, C, bias=False)
        self.output = Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    def forward(self, x, sx, wkv, v_first, backend: str, wkv_out=None):
        """x, sx [B, T, C]; wkv [B, H, N, N]; v_first [B, T, C] or None -> (out, wkv, v_first)."""
        B, T, C = x.shape
        H, N = self.r_k.shape
        xx = sx - x
        xr, xw, xk = (torch.addcmul(x, xx, m) for m in (self.x_r, self.x_w, self.x_k))  # x + xx*m, one op
        xv, xa, xg = (torch.addcmul(x, xx, m) for m in (self.x_v, self.x_a, self.x_g))
        r = self.receptance(xr)  # [B, T, C]
        k = self.key(xk)
        v = self.value(xv)
        w_lora = matmul(torch.tanh(matmul(xw, self.w1)), self.w2)  # [B, T, C]
        a_lora = matmul(matmul(xa, self.a1), self.a2)
        v_lora = None if self.layer_id == 0 else matmul(matmul(xv, self.v1), self.v2)
        g = matmul(torch.sigmoid(matmul(xg, self.g1)), self.g2)
        if self.layer_id == 0:
            v_first = v
        if T == 1:  # decode: everything below, up to the output projection, in one C call where it runs
            params = dict(w0=self.w0, a0=self.a0, v0=self.v0, k_k=self.k_k, k_a=self.k_a, r_k=self.r_k,
                          ln_w=self.ln_x.weight, ln_b=self.ln_x.bias)
            per_row = (r, k, v, w_lora, a_lora, g) + (() if v_lora is None else (v_lora, v_first))
            if steps.steps_available(wkv, *per_row, *params.values()):
                y, wkv = steps.rwkv7_tail(r, k, v, w_lora, a_lora, v_lora, v_first, g, wkv, out=wkv_out,
                                            eps=self.ln_x.eps, decay_scale=DECAY_SCALE, **params)
                return self.output(y), wkv, v_first
        logw = -DECAY_SCALE * torch.sigmoid((self.w0 + w_lora).float())  # log decay in (-0.607, 0)
        if v_lora is not None:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + v_lora)
        a = torch.sigmoid(self.a0 + a_lora)  # [B, T, C]
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)  # [B, T, H, N]
        k = k * (1 + (a - 1) * self.k_a)

        def heads(t):
            return t.reshape(B, T, H, N).float()

        y, wkv = delta_rule(heads(r), logw.view(B, T, H, N), heads(k), heads(v), -kk.float(),
                            heads(kk.reshape(B, T, C) * a), wkv, backend=backend, out=wkv_out)
        y = group_norm(y.reshape(B, T, C), self.ln_x.weight, self.ln_x.bias, H).to(x.dtype)
        bonus = (r * k * self.r_k.view(1, 1, C)).view(B, T, H, N).sum(-1, keepdim=True)  # [B, T, H, 1]
        y = y + (bonus * v.view(B, T, H, N)).view(B, T, C)
        return self.output(y * g), wkv, v_first


class ChannelMix(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C, F_ = config.n_embd, config.dim_ffn
        self.x_k = _vec(C)
        self.key = Linear(C, F_, bias=False)
        self.value = Linear(F_, C, bias=False)

    def forward(self, x, sx):
        k = torch.relu(self.key(torch.addcmul(x, sx - x, self.x_k))).square()  # [B, T, F]
        return self.value(k)


# Where the C decode block (aviary.cpu.blocks; src/aviary/csrc/blocks.c) finds its fields in a Block.
CPU_BLOCK = BlockRecord(
    version=7,
    params={"ln1_w": "ln1.weight", "ln1_b": "ln1.bias", "ln2_w": "ln2.weight", "ln2_b": "ln2.bias",
            **{n: f"att.{n}" for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a",
                                       "r_k", "w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")},
            "ln_x_w": "att.ln_x.weight", "ln_x_b": "att.ln_x.bias", "ffn_x_k": "ffn.x_k"},
    products={"receptance": "att.receptance", "key": "att.key", "value": "att.value", "output": "att.output",
              "ffn_key": "ffn.key", "ffn_value": "ffn.value"},
    lora_pairs=(("w1", "w2", 1), ("a1", "a2", 1), ("v1", "v2", 1), ("g1", "g2", 1)),
    heads="r_k", ln_x="att.ln_x", constant=DECAY_SCALE, v_first=True)


def default_sizes(C: int) -> dict[str, int]:
    """A new model of width C: ffn 4C; LoRA ranks k*sqrt(C) to a multiple of 32, at least 32, with k = 2.5
    (decay w), 2.5 (a, the in-context learning rate), 1.7 (value residual v), 5 (gate g). These are the
    "suggestion" lines (D_DECAY_LORA, D_AAA_LORA, D_MV_LORA, D_GATE_LORA) of RWKV-LM
    `RWKV-v7/train_temp/src/model.py` as of 2026-08 (commit 118e451). Its earlier k = 1.8 / 1.8 / 1.3 and
    gate 0.6*C^0.8 give the same ranks at C = 768 but not at most widths (C = 128: gate 32, not 64)."""
    return {"dim_ffn": 4 * C, "rank_w": lora_width(2.5, C), "rank_a": lora_width(2.5, C),
            "rank_v": lora_width(1.7, C), "rank_g": lora_width(5, C)}


def init(model: nn.Module, g: torch.Generator, lr_init: float) -> None:
    """The official initialisation, RWKV-LM `RWKV-v7/train_temp/src/model.py` (RWKV_Tmix_x070 /
    RWKV_CMix_x070 and generate_init_weight; notation: aviary.model.common). N is the head size."""
    cfg = model.config
    C, L, N = cfg.n_embd, cfg.n_layer, cfg.head_size
    init_emb_head(model, g, 1e-4)
    n = torch.arange(C, dtype=torch.float64)
    linear = n / (C - 1) - 0.5
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = z * z.abs()
    for i, block in enumerate(model.blocks):
        r01, r1a0, ddd = layer_ratios(i, L, C)
        att, ffn = block.att, block.ffn
        www = -6 + 6 * (n / (C - 1)) ** (1 + r01**0.3)
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            init_fill(getattr(att, name), 1 - ddd ** (power * r1a0))
        init_fill(att.w0, www + 0.5 + 2.5 * zigzag)  # "0.5 comes from softplus"
        init_fill(att.a0, -0.19 + 0.3 * zigzag + 0.4 * linear)
        init_fill(att.v0, 0.73 - 0.4 * linear)
        for name in ("w", "a", "v", "g"):
            getattr(att, f"{name}1").zero_()
            init_orthogonal(getattr(att, f"{name}2"), 0.1, g, sqrt_ratio=True)
        init_fill(att.k_k, 0.71 - 0.1 * linear)
        init_fill(att.k_a, 1.02)
        init_fill(att.r_k, -0.04)
        init_ln_x(att, i, L)
        for lin, gain in ((att.receptance, 1.0), (att.key, 0.1), (att.value, 1.0), (att.output, 0),
                          (ffn.key, 1.0), (ffn.value, 0)):
            init_orthogonal(lin.weight, gain, g)
        init_fill(ffn.x_k, 1 - ddd ** (r1a0**4))


def param_group(name: str, p: torch.Tensor, wd: float) -> tuple[float, bool]:
    """RWKV-LM v7 train_temp `configure_optimizers`: att.w0 2x; 2-D `.weight` decayed; the rest 1x."""
    if name.endswith("att.w0"):
        return 2.0, False
    if dims_above_one(p) >= 2 and wd > 0 and ".weight" in name:
        return 1.0, True
    return 1.0, False


def sizes_from_shapes(shape_of, C: int, L: int) -> dict[str, int]:
    """The head size from `r_k` [H, N]; the LoRA ranks from `w1`, `a1`, `g1`, `v1` [C, rank]. Layer 0's v1
    exists in official files but is unused: the value-residual rank is read from layer 1 when there is one."""
    v1 = "blocks.1.att.v1" if L > 1 else "blocks.0.att.v1"
    return {**head_sizes(shape_of, "blocks.0.att.r_k", C),
            "rank_w": shape_of("blocks.0.att.w1", 2)[1], "rank_a": shape_of("blocks.0.att.a1", 2)[1],
            "rank_v": shape_of(v1, 2)[1], "rank_g": shape_of("blocks.0.att.g1", 2)[1]}


SPEC = VersionSpec(
    version=7, time_mix=TimeMix, channel_mix=ChannelMix, wkv_shape=head_wkv_shape, empty_wkv=zero_head_wkv,
    default_sizes=default_sizes, sizes_from_shapes=sizes_from_shapes, init=init, param_group=param_group,
    supports_rescale=False,  # the reference runs v7 in fp16 without it
    cpu_block=CPU_BLOCK)
