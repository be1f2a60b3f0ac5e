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

import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary import kernels
from aviary.config import ModelConfig
from aviary.kernels import Linear, matmul
from aviary.model.rwkv import group_norm
from aviary.model.v5 import empty_wkv, wkv_shape
from aviary.ops import gla

__all__ = ["ChannelMix", "TimeMix", "decode_block", "decode_blocks", "empty_wkv", "wkv_shape"]

SUPPORTS_RESCALE = True


class TimeMix(nn.Module):
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


_ATT_VECTORS = ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g", "time_maa_w1",
                "time_maa_w2", "time_decay", "time_decay_w1", "time_decay_w2", "time_faaaa")


def _layer(block: nn.Module, shift, wkv, shift_out, wkv_out) -> kernels.BlockLayer | None:
    """`block` as the C blocks take it (`aviary.kernels.BlockLayer`, fields in the order of
    `_kernels.V6_BLOCK_FIELDS`), or None if a product has no kernel."""
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
    params += [*att_w, fp["time_maa_k"], fp["time_maa_r"], *ffn_w]
    return kernels.block_layer(block, params, ap["time_faaaa"].shape[0], (ln1.eps, ln2.eps, ln_x.eps),
                               att.layer_id == 0, shift, wkv, shift_out, wkv_out)


def decode_blocks(blocks, x, shift, wkv, shift_out, wkv_out):
    """All of `blocks` for one token in one C call (`aviary.kernels.rwkv6_blocks`): `Block.forward`
    (aviary/model/rwkv.py) with this file's mixers, ~70 torch ops and ~17 products a layer otherwise.

    x [B, 1, C]; shift [B, L, 2, C] and wkv [B, L, H, N, N] the state's tensors; the new ones are written
    into shift_out and wkv_out (which may be shift and wkv). Returns x after the last block, or None,
    having done nothing, where the kernels cannot take these blocks (gradients, a weight type or device
    they do not handle): the caller then runs each `block` itself, the reference."""
    layers = kernels.block_layers(blocks, _layer, shift, wkv, shift_out, wkv_out)
    return None if layers is None else kernels.rwkv6_blocks(layers, x)


def decode_block(block: nn.Module, x, shift, wkv, shift_out, wkv_out):
    """One block of `decode_blocks`: x [B, 1, C]; shift [B, 2, C]; wkv [B, H, N, N]. Returns x, or None
    where the kernels cannot take it."""
    layer = _layer(block, shift, wkv, shift_out, wkv_out)
    return None if layer is None else kernels.rwkv6_blocks([layer], x)
