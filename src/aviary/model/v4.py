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

import torch
import torch.nn as nn

from aviary import kernels
from aviary.config import ModelConfig
from aviary.kernels import Linear
from aviary.ops import wkv4
from aviary.ops.wkv4 import empty_state

SUPPORTS_RESCALE = True


def wkv_shape(config: ModelConfig) -> tuple[int, ...]:
    return (3, config.n_embd)  # (num aa, den bb, max exponent pp) per channel


def empty_wkv(config: ModelConfig, batch_size: int, device) -> torch.Tensor:
    return empty_state(batch_size, config.n_embd, device)


def lerp(x: torch.Tensor, sx: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """RWKV-4/5 token mix: x*mix + sx*(1-mix)."""
    return x * mix + sx * (1 - mix)


class TimeMix(nn.Module):
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


def _layer(block: nn.Module, shift, wkv, shift_out, wkv_out) -> kernels.BlockLayer | None:
    """`block` as the C blocks take it (`aviary.kernels.BlockLayer`, fields in the order of
    `_kernels.V4_BLOCK_FIELDS`), or None if a product has no kernel."""
    # module._parameters / _modules rather than attribute access: this runs for every layer of every step
    bm = block._modules
    att, ffn = bm["att"], bm["ffn"]
    ap, am, fp, fm = att._parameters, att._modules, ffn._parameters, ffn._modules
    ln1, ln2 = bm["ln1"], bm["ln2"]
    p1, p2 = ln1._parameters, ln2._parameters
    params = [p1["weight"], p1["bias"], p2["weight"], p2["bias"], ap["time_mix_k"], ap["time_mix_v"], ap["time_mix_r"],
              ap["time_decay"], ap["time_first"]]
    att_w = kernels.product_weights((am["receptance"], am["key"], am["value"], am["output"]))
    ffn_w = kernels.product_weights((fm["key"], fm["receptance"], fm["value"]))
    if att_w is None or ffn_w is None:
        return None
    params += [*att_w, fp["time_mix_k"], fp["time_mix_r"], *ffn_w]
    C = ap["time_decay"].shape[0]
    return kernels.block_layer(block, params, C, (ln1.eps, ln2.eps, 0.0), att.layer_id == 0, shift, wkv, shift_out,
                               wkv_out)


def decode_blocks(blocks, x, shift, wkv, shift_out, wkv_out):
    """All of `blocks` for one token in one C call (`aviary.kernels.rwkv4_blocks`): `Block.forward`
    (aviary/model/rwkv.py) with this file's mixers, ~30 torch ops and 7 products a layer otherwise.

    x [B, 1, C]; shift [B, L, 2, C] and wkv [B, L, 3, C] the state's tensors; the new ones are written
    into shift_out and wkv_out (which may be shift and wkv). Returns x after the last block, or None,
    having done nothing, where the kernels cannot take these blocks (gradients, a weight type or device
    they do not handle): the caller then runs each `block` itself, the reference."""
    layers = kernels.block_layers(blocks, _layer, shift, wkv, shift_out, wkv_out)
    return None if layers is None else kernels.rwkv4_blocks(layers, x)


def decode_block(block: nn.Module, x, shift, wkv, shift_out, wkv_out):
    """One block of `decode_blocks`: x [B, 1, C]; shift [B, 2, C]; wkv [B, 3, C]. Returns x, or None where
    the kernels cannot take it."""
    layer = _layer(block, shift, wkv, shift_out, wkv_out)
    return None if layer is None else kernels.rwkv4_blocks([layer], x)
