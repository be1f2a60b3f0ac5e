"""RWKV-4: per-channel decay with a normalised weighted average ("WKV").

    xk = x*mu_k + sx*(1-mu_k)   (likewise xv, xr)        mu = time_mix_*, mu=1 keeps the current token
    r = sigmoid(W_r xr);  k = W_k xk;  v = W_v xv
    wkv_t = see aviary.ops.wkv4 (log-decay w = -exp(time_decay), bonus u = time_first)
    out = W_o (r * wkv)

Channel-mix:  out = sigmoid(W_r xr) * W_v relu(W_k xk)^2   (shared with RWKV-5).
Mirrors RWKV-LM `RWKV-v4neo/src/model.py` (RWKV_TimeMix, RWKV_ChannelMix) and the pip package's `att_seq`.
Glossary: B batch, T time, C width, F ffn width; sx = previous token's LayerNorm-ed input.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn

from aviary.config import ModelConfig
from aviary.cpu import Linear
from aviary.cpu.blocks import BlockRecord
from aviary.model.common import VersionSpec, group_rule_v4_v6, init_emb_head, init_fill, init_orthogonal, layer_ratios
from aviary.ops import wkv4
from aviary.ops.wkv4 import empty_state

__all__ = ["CPU_BLOCK", "SPEC", "ChannelMix", "TimeMix", "lerp"]


def wkv_shape(config: ModelConfig) -> tuple[int, ...]:
    return (3, config.n_embd)  # (num aa, den bb, max exponent pp) per channel


def empty_wkv(config: ModelConfig, batch_size: int, device) -> torch.Tensor:
    return empty_state(batch_size, config.n_embd, device)


def lerp(x: torch.Tensor, sx: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """RWKV-4/5 token mix: x*mix + sx*(1-mix)."""
    return x * mix + sx * (1 - mix)


class TimeMix(nn.Module):
    op = "wkv4"  # its aviary.ops op: the backends a model of this version can use

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C = config.n_embd
        self.layer_id = layer_id
        self.time_decay = nn.Parameter(torch.zeros(C))
        self.time_first = nn.Parameter(torch.zeros(C))
        self.time_mix_k = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.ones(1, 1, C))
        self.key = Linear(C, C, bias=False)
        self.value = Linear(C, C, bias=False)
        self.receptance = Linear(C, C, bias=False)
        self.output = Linear(C, C, bias=False)

    def forward(self, x, sx, wkv, v_first, backend: str, wkv_out=None):
        """x, sx [B, T, C]; wkv [B, 3, C] -> (out [B, T, C], wkv, v_first unchanged). wkv_out is ignored
        (a destination hint for the C steps of RWKV-5/6/7; RWKV-4's small state has none)."""
        r = torch.sigmoid(self.receptance(lerp(x, sx, self.time_mix_r)))  # [B, T, C]
        k = self.key(lerp(x, sx, self.time_mix_k)).float()  # [B, T, C]
        v = self.value(lerp(x, sx, self.time_mix_v)).float()  # [B, T, C]
        w = -torch.exp(self.time_decay.float())  # [C] log-decay per step
        y, wkv = wkv4(w, self.time_first.float(), k, v, wkv, backend=backend)
        return self.output(r * y.to(x.dtype)), wkv, v_first


class ChannelMix(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C, F = config.n_embd, config.dim_ffn
        self.time_mix_k = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.ones(1, 1, C))
        self.key = Linear(C, F, bias=False)
        self.receptance = Linear(C, C, bias=False)
        self.value = Linear(F, C, bias=False)

    def forward(self, x, sx):
        k = torch.relu(self.key(lerp(x, sx, self.time_mix_k))) ** 2  # [B, T, F]
        return torch.sigmoid(self.receptance(lerp(x, sx, self.time_mix_r))) * self.value(k)


# Where the C decode block (aviary.cpu.blocks; src/aviary/csrc/blocks.c) finds its fields in a Block. The
# state row of a layer is (aa, bb, pp) [3, C]; one "head" per channel.
CPU_BLOCK = BlockRecord(
    version=4,
    params={"ln1_w": "ln1.weight", "ln1_b": "ln1.bias", "ln2_w": "ln2.weight", "ln2_b": "ln2.bias",
            **{f"mix_{n}": f"att.time_mix_{n}" for n in "kvr"}, "decay": "att.time_decay",
            "first": "att.time_first", "ffn_mix_k": "ffn.time_mix_k", "ffn_mix_r": "ffn.time_mix_r"},
    products={"receptance": "att.receptance", "key": "att.key", "value": "att.value", "output": "att.output",
              "ffn_key": "ffn.key", "ffn_receptance": "ffn.receptance", "ffn_value": "ffn.value"},
    state_row=lambda C, H: (3, C))


def default_sizes(C: int) -> dict[str, int]:
    """A new model of width C: ffn 4C, no heads (head_size = C)."""
    return {"dim_ffn": 4 * C, "head_size": C}


def init(model: nn.Module, g: torch.Generator, lr_init: float) -> None:
    """The official initialisation, RWKV-LM `RWKV-v4neo/src/model.py` (notation: aviary.model.common)."""
    cfg = model.config
    C, L = cfg.n_embd, cfg.n_layer
    init_emb_head(model, g, lr_init)  # v4neo: emb ~ U(-lr_init, lr_init)
    h = torch.arange(C, dtype=torch.float64)
    zigzag = 0.5 * ((h + 1) % 3 - 1)
    for i, block in enumerate(model.blocks):
        r01, r1a0, ddd = layer_ratios(i, L, C)
        att, ffn = block.att, block.ffn
        init_fill(att.time_decay, -5 + 8 * (h / (C - 1)) ** (0.7 + 1.3 * r01))
        init_fill(att.time_first, math.log(0.3) + zigzag)
        init_fill(att.time_mix_k, ddd**r1a0)
        init_fill(att.time_mix_v, ddd**r1a0 + 0.3 * r01)
        init_fill(att.time_mix_r, ddd ** (0.5 * r1a0))
        init_fill(ffn.time_mix_k, ddd**r1a0)
        init_fill(ffn.time_mix_r, ddd**r1a0)
        for lin in (att.key, att.receptance, att.output, ffn.value, ffn.receptance):
            lin.weight.zero_()
        for lin in (att.value, ffn.key):
            init_orthogonal(lin.weight, 1.0, g, sqrt_ratio=True)


def sizes_from_shapes(shape_of, C: int, L: int) -> dict[str, int]:
    """RWKV-4 has no heads (head_size is C, one "head") and no LoRAs: nothing to read."""
    return {"head_size": C}


def state_features(wkv: torch.Tensor) -> torch.Tensor:
    """[B, L, 3, C] (rows aa, bb, pp) -> [B, L, C]: the ratio aa/bb, the state's weighted mean of past values
    (pp, a shared scale, cancels), as BlinkDL suggests for sentence embeddings from RWKV-4's state."""
    return wkv[:, :, 0] / wkv[:, :, 1].clamp_min(1e-30)


SPEC = VersionSpec(
    version=4, time_mix=TimeMix, channel_mix=ChannelMix, wkv_shape=wkv_shape, empty_wkv=empty_wkv,
    default_sizes=default_sizes, sizes_from_shapes=sizes_from_shapes, init=init,
    param_group=partial(group_rule_v4_v6, needs_weight=False),  # v4neo: every 2-D matrix is decayed
    supports_rescale=True, cpu_block=CPU_BLOCK, state_tuning=False, state_features=state_features)
