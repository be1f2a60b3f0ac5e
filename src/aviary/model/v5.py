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

import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary import kernels
from aviary.config import ModelConfig
from aviary.kernels import Linear
from aviary.model.rwkv import group_norm
from aviary.model.v4 import ChannelMix, lerp
from aviary.ops import gla

__all__ = ["ChannelMix", "TimeMix", "decode_block", "decode_blocks"]

SUPPORTS_RESCALE = True


def wkv_shape(config: ModelConfig) -> tuple[int, ...]:
    return (config.n_head, config.head_size, config.head_size)


def empty_wkv(config: ModelConfig, batch_size: int, device) -> torch.Tensor:
    return torch.zeros(batch_size, *wkv_shape(config), device=device)


class TimeMix(nn.Module):
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


_ATT_VECTORS = ("time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g", "time_decay", "time_faaaa")


def _layer(block: nn.Module, shift, wkv, shift_out, wkv_out) -> kernels.BlockLayer | None:
    """`block` as the C blocks take it (`aviary.kernels.BlockLayer`, fields in the order of
    `_kernels.V5_BLOCK_FIELDS`), or None if a product has no kernel."""
    # module._parameters / _modules rather than attribute access: this runs for every layer of every step
    bm = block._modules
    att, ffn = bm["att"], bm["ffn"]
    ap, am, fp, fm = att._parameters, att._modules, ffn._parameters, ffn._modules
    ln1, ln2, ln_x = bm["ln1"], bm["ln2"], am["ln_x"]
    p1, p2, px = ln1._parameters, ln2._parameters, ln_x._parameters
    params = [p1["weight"], p1["bias"], p2["weight"], p2["bias"], *(ap[n] for n in _ATT_VECTORS), px["weight"],
              px["bias"]]
    att_w = kernels.product_weights((am["receptance"], am["key"], am["value"], am["gate"], am["output"]))
    ffn_w = kernels.product_weights((fm["key"], fm["receptance"], fm["value"]))
    if att_w is None or ffn_w is None:
        return None
    params += [*att_w, fp["time_mix_k"], fp["time_mix_r"], *ffn_w]
    return kernels.block_layer(block, params, ap["time_faaaa"].shape[0], (ln1.eps, ln2.eps, ln_x.eps),
                               att.layer_id == 0, shift, wkv, shift_out, wkv_out)


def decode_blocks(blocks, x, shift, wkv, shift_out, wkv_out):
    """All of `blocks` for one token in one C call (`aviary.kernels.rwkv5_blocks`): `Block.forward`
    (aviary/model/rwkv.py) with this file's time-mix and RWKV-4's channel-mix, ~40 torch ops and 8
    products a layer otherwise.

    x [B, 1, C]; shift [B, L, 2, C] and wkv [B, L, H, N, N] the state's tensors; the new ones are written
    into shift_out and wkv_out (which may be shift and wkv). Returns x after the last block, or None,
    having done nothing, where the kernels cannot take these blocks (gradients, a weight type or device
    they do not handle): the caller then runs each `block` itself, the reference."""
    layers = kernels.block_layers(blocks, _layer, shift, wkv, shift_out, wkv_out)
    return None if layers is None else kernels.rwkv5_blocks(layers, x)


def decode_block(block: nn.Module, x, shift, wkv, shift_out, wkv_out):
    """One block of `decode_blocks`: x [B, 1, C]; shift [B, 2, C]; wkv [B, H, N, N]. Returns x, or None
    where the kernels cannot take it."""
    layer = _layer(block, shift, wkv, shift_out, wkv_out)
    return None if layer is None else kernels.rwkv5_blocks([layer], x)
