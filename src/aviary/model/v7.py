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
from aviary.model.rwkv import group_norm
from aviary.model.v5 import empty_wkv, wkv_shape
from aviary.ops import delta_rule

__all__ = ["CPU_BLOCK", "ChannelMix", "TimeMix", "empty_wkv", "wkv_shape"]

SUPPORTS_RESCALE = False  # the reference runs v7 in fp16 without it
DECAY_SCALE = math.exp(-0.5)  # the pip package writes 0.606531


def _vec(C: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(1, 1, C))


class TimeMix(nn.Module):
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
