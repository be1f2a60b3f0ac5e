"""The official initialisation of each RWKV generation (reference section 8.1), one function per version.

Notation: C width, H heads, N head size, L layers, V vocabulary; for block i:
    ddd[c] = c / C,  r01 = i / (L - 1),  r1a0 = 1 - i / L
Large matrices are orthogonal with a gain (times sqrt(rows/cols) when rows > cols, only in v4 and the v7
LoRA), or zero for the projections that write into the residual stream; emb is a tiny uniform that ln0
rescales ("SmallInitEmb"). `INITIALIZERS[version](model, lr_init)` fills a freshly built model in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from aviary.config import ModelConfig

__all__ = ["INITIALIZERS", "init_model", "model_config"]


def model_config(version: int, n_layer: int, n_embd: int, vocab_size: int = 65536, head_size: int = 64,
                 dim_ffn: int = 0) -> ModelConfig:
    """A ModelConfig with the official default ffn width and LoRA ranks for this width."""
    C = n_embd
    if not dim_ffn:
        dim_ffn = int(3.5 * C) // 32 * 32 if version in (5, 6) else 4 * C
    ranks: dict[str, int] = {}
    if version == 6:
        ranks = dict(rank_mix=64 if C >= 4096 else 32, rank_decay=128 if C >= 4096 else 64)
    elif version == 7:  # RWKV-LM v7 train_temp: ranks grow with sqrt(C) (gate with C^0.8), multiples of 32

        def lora(scale: float, power: float) -> int:
            return max(32, int(round(scale * C**power / 32) * 32))

        ranks = dict(rank_w=lora(1.8, 0.5), rank_a=lora(1.8, 0.5), rank_v=lora(1.3, 0.5), rank_g=lora(0.6, 0.8))
    return ModelConfig(version=version, n_layer=n_layer, n_embd=C, vocab_size=vocab_size, dim_ffn=dim_ffn,
                       head_size=C if version == 4 else head_size, **ranks)


def _ortho(w: torch.Tensor, gain: float, g: torch.Generator, sqrt_ratio: bool = False) -> None:
    if gain == 0:
        w.zero_()
        return
    rows, cols = w.shape[-2], w.shape[-1]
    if sqrt_ratio and rows > cols:
        gain *= math.sqrt(rows / cols)
    nn.init.orthogonal_(w, gain=gain, generator=g)


def _ratios(layer_id: int, L: int, C: int) -> tuple[float, float, torch.Tensor]:
    r01 = layer_id / (L - 1) if L > 1 else 0.0
    r1a0 = 1.0 - layer_id / L
    ddd = torch.arange(C, dtype=torch.float64) / C
    return r01, r1a0, ddd


def _set(p: torch.Tensor, value: torch.Tensor | float) -> None:
    if isinstance(value, torch.Tensor):
        p.copy_(value.reshape(p.shape).to(p.dtype))
    else:
        p.fill_(value)


def _emb_head(model: nn.Module, g: torch.Generator, emb_scale: float) -> None:
    V, C = model.config.vocab_size, model.config.n_embd
    nn.init.uniform_(model.emb.weight, -emb_scale, emb_scale, generator=g)
    _ortho(model.head.weight, 0.5 * math.sqrt(V / C) if V > C else 0.5, g)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _ln_x(att: nn.Module, layer_id: int, L: int) -> None:
    _set(att.ln_x.weight, ((1 + layer_id) / L) ** 0.7)
    att.ln_x.bias.zero_()


def init_v4(model: nn.Module, g: torch.Generator, lr_init: float) -> None:
    """RWKV-LM `RWKV-v4neo/src/model.py`."""
    cfg = model.config
    C, L = cfg.n_embd, cfg.n_layer
    _emb_head(model, g, lr_init)  # v4neo: emb ~ U(-lr_init, lr_init)
    h = torch.arange(C, dtype=torch.float64)
    zigzag = 0.5 * ((h + 1) % 3 - 1)
    for i, block in enumerate(model.blocks):
        r01, r1a0, ddd = _ratios(i, L, C)
        att, ffn = block.att, block.ffn
        _set(att.time_decay, -5 + 8 * (h / (C - 1)) ** (0.7 + 1.3 * r01))
        _set(att.time_first, math.log(0.3) + zigzag)
        _set(att.time_mix_k, ddd**r1a0)
        _set(att.time_mix_v, ddd**r1a0 + 0.3 * r01)
        _set(att.time_mix_r, ddd ** (0.5 * r1a0))
        _set(ffn.time_mix_k, ddd**r1a0)
        _set(ffn.time_mix_r, ddd**r1a0)
        for lin in (att.key, att.receptance, att.output, ffn.value, ffn.receptance):
            lin.weight.zero_()
        for lin in (att.value, ffn.key):
            _ortho(lin.weight, 1.0, g, sqrt_ratio=True)


def _v5_v6_common(att: nn.Module, ffn: nn.Module, g: torch.Generator, i: int, L: int, C: int) -> None:
    r01, _, _ = _ratios(i, L, C)
    n = torch.arange(C, dtype=torch.float64)
    _set(att.time_decay, -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r01))
    _set(att.time_faaaa, r01 * (1 - n / (C - 1)) + 0.1 * ((n + 1) % 3 - 1))
    _ln_x(att, i, L)
    for lin, gain in ((att.receptance, 1.0), (att.key, 0.1), (att.value, 1.0), (att.gate, 0.1), (att.output, 0),
                      (ffn.key, 1.0), (ffn.receptance, 0), (ffn.value, 0)):
        _ortho(lin.weight, gain, g)


def init_v5(model: nn.Module, g: torch.Generator, lr_init: float) -> None:
    """RWKV-LM `RWKV-v5/src/model.py`, RWKV_Tmix_x052 / RWKV_CMix_x052 and generate_init_weight."""
    cfg = model.config
    C, L = cfg.n_embd, cfg.n_layer
    _emb_head(model, g, 1e-4)
    for i, block in enumerate(model.blocks):
        r01, r1a0, ddd = _ratios(i, L, C)
        att, ffn = block.att, block.ffn
        _v5_v6_common(att, ffn, g, i, L, C)
        _set(att.time_mix_k, ddd**r1a0)
        _set(att.time_mix_v, ddd**r1a0 + 0.3 * r01)
        _set(att.time_mix_r, ddd ** (0.5 * r1a0))
        _set(att.time_mix_g, ddd ** (0.5 * r1a0))
        _set(ffn.time_mix_k, ddd**r1a0)
        _set(ffn.time_mix_r, ddd**r1a0)


def init_v6(model: nn.Module, g: torch.Generator, lr_init: float) -> None:
    """RWKV-LM `RWKV-v5/src/model.py`, RWKV_Tmix_x060 / RWKV_CMix_x060 and generate_init_weight."""
    cfg = model.config
    C, L = cfg.n_embd, cfg.n_layer
    _emb_head(model, g, 1e-4)
    for i, block in enumerate(model.blocks):
        r01, r1a0, ddd = _ratios(i, L, C)
        att, ffn = block.att, block.ffn
        _v5_v6_common(att, ffn, g, i, L, C)
        for name in ("x", "w", "k"):
            _set(getattr(att, f"time_maa_{name}"), 1 - ddd**r1a0)
        _set(att.time_maa_v, 1 - (ddd**r1a0 + 0.3 * r01))
        _set(att.time_maa_r, 1 - ddd ** (0.5 * r1a0))
        _set(att.time_maa_g, 1 - ddd ** (0.5 * r1a0))
        att.time_maa_w1.zero_()
        nn.init.uniform_(att.time_maa_w2, -0.01, 0.01, generator=g)
        att.time_decay_w1.zero_()
        nn.init.uniform_(att.time_decay_w2, -0.01, 0.01, generator=g)
        _set(ffn.time_maa_k, 1 - ddd ** (r1a0**3))
        _set(ffn.time_maa_r, 1 - ddd ** (r1a0**3))


def init_v7(model: nn.Module, g: torch.Generator, lr_init: float) -> None:
    """RWKV-LM `RWKV-v7/train_temp/src/model.py`, RWKV_Tmix_x070 / RWKV_CMix_x070 and generate_init_weight."""
    cfg = model.config
    C, L, N = cfg.n_embd, cfg.n_layer, cfg.head_size
    _emb_head(model, g, 1e-4)
    n = torch.arange(C, dtype=torch.float64)
    linear = n / (C - 1) - 0.5
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = z * z.abs()
    for i, block in enumerate(model.blocks):
        r01, r1a0, ddd = _ratios(i, L, C)
        att, ffn = block.att, block.ffn
        www = -6 + 6 * (n / (C - 1)) ** (1 + r01**0.3)
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            _set(getattr(att, name), 1 - ddd ** (power * r1a0))
        _set(att.w0, www + 0.5 + 2.5 * zigzag)  # "0.5 comes from softplus"
        _set(att.a0, -0.19 + 0.3 * zigzag + 0.4 * linear)
        _set(att.v0, 0.73 - 0.4 * linear)
        for name in ("w", "a", "v", "g"):
            getattr(att, f"{name}1").zero_()
            _ortho(getattr(att, f"{name}2"), 0.1, g, sqrt_ratio=True)
        _set(att.k_k, 0.71 - 0.1 * linear)
        _set(att.k_a, 1.02)
        _set(att.r_k, -0.04)
        _ln_x(att, i, L)
        for lin, gain in ((att.receptance, 1.0), (att.key, 0.1), (att.value, 1.0), (att.output, 0),
                          (ffn.key, 1.0), (ffn.value, 0)):
            _ortho(lin.weight, gain, g)
        _set(ffn.x_k, 1 - ddd ** (r1a0**4))


INITIALIZERS: dict[int, Callable[[nn.Module, torch.Generator, float], None]] = {
    4: init_v4, 5: init_v5, 6: init_v6, 7: init_v7}


@torch.no_grad()
def init_model(model: nn.Module, seed: int = 0, lr_init: float = 6e-4) -> nn.Module:
    """Fill `model` (an aviary RWKV on a real device) with the official initialisation, deterministically."""
    g = torch.Generator(device=model.emb.weight.device).manual_seed(seed)
    INITIALIZERS[model.config.version](model, g, lr_init)
    return model
