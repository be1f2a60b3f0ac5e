"""RWKV-5/6 WKV: gated linear attention with a bonus on the current token.

Per head, with a matrix state S in R^{K x V} (key index rows, value index columns):

    y_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T)      # reads the state before the update
    S_t = diag(w_t) S_{t-1} + k_t v_t^T             # the decay acts along the key index

w_t = exp(logw_t) in (0, 1) is constant over time in RWKV-5 and data-dependent in RWKV-6.
Same contract as fla's `fused_recurrent_rwkv6` / `chunk_rwkv6` with log decay.

Shapes: r, k, logw [B, T, H, K]; v [B, T, H, V]; u [H, K]; state [B, H, K, V]; all float32.
`logw` may also be [1, 1, H, K] (a constant decay) and is broadcast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aviary.cpu import steps
from aviary.cpu.threads import state_update_threads
from aviary.ops._dispatch import pick
from aviary.ops.fla import gla_fla
from aviary.ops.triton import gla_triton


def gla_recurrent(r, k, v, logw, u, state):
    """Reference: one token at a time."""
    B, T, H, K = r.shape
    w = torch.exp(logw).expand(B, T, H, K)
    S = state
    ys = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, K, V]
        ys.append(torch.einsum("bhk,bhkv->bhv", r[:, t], S + u[None, :, :, None] * kv))
        S = w[:, t, :, :, None] * S + kv
    return torch.stack(ys, dim=1), S


def gla_step(r, k, v, logw, u, state):
    """One token (T = 1), the decode fast path: the loop above with batched products and fused
    multiply-adds (the outer product k v^T is formed once and the state read and written once)."""
    B, _, H, K = r.shape
    V = v.shape[-1]
    S = state.reshape(B * H, K, V)
    kv = torch.bmm(k.reshape(B * H, K, 1), v.reshape(B * H, 1, V))  # [BH, K, V]
    bonus = u[None, :, :, None].expand(B, H, K, 1).reshape(B * H, K, 1)  # a view when B == 1
    y = torch.bmm(r.reshape(B * H, 1, K), torch.addcmul(S, bonus, kv))  # [BH, 1, V]
    w = torch.exp(logw).expand(B, 1, H, K).reshape(B * H, K, 1)
    S = torch.addcmul(kv, w, S)  # w S + k v^T
    return y.view(B, 1, H, V), S.view(B, H, K, V)


def gla_chunked(r, k, v, logw, u, state, chunk_len: int = 8):
    """Parallel within chunks of `chunk_len` tokens, sequential across chunks.

    With in-chunk cumulative log decay c_t = sum_{m<=t} logw_m (c_{t-1} its exclusive form):
        y_t   = (r_t e^{c_{t-1}}) S_0 + sum_{j<t} [sum_k r_tk k_jk e^{c_{t-1,k} - c_{jk}}] v_j + (r_t . u k_t) v_t
        S_end = e^{c_last} S_0 + sum_j (k_j e^{c_last - c_j}) v_j^T
    Pair exponents are formed as differences (always <= 0 where used) rather than as products of
    e^{c} and e^{-c}, which overflow when the data-dependent decay of RWKV-6 is strong.
    chunk_len 8: the pair tensors grow with it; 8 was 1.4-1.5x faster than 16 on a CPU, fwd+bwd, for every
    shape measured (docs/benchmarks.md, "Chunk length of the chunked ops").
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    logw = logw.expand(B, T, H, K)
    L = chunk_len
    pad = (-T) % L
    if pad:  # padded steps have k = 0 and decay 1: they change neither outputs nor the state
        r, k, logw = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (r, k, logw))
        v = F.pad(v, (0, 0, 0, 0, 0, pad))
    n = (T + pad) // L

    def chunks(x):  # [B, n*L, H, D] -> [B, H, n, L, D]
        return x.reshape(B, n, L, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    r, k, v, logw = chunks(r), chunks(k), chunks(v), chunks(logw)
    c = logw.cumsum(dim=3)  # inclusive, [B, H, n, L, K]
    c_prev = c - logw  # exclusive
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)  # j < t
    gap = c_prev[:, :, :, :, None, :] - c[:, :, :, None, :, :]  # [B, H, n, t, j, K]
    gap = torch.where(strict[:, :, None], gap, torch.full_like(gap, float("-inf")))
    scores = torch.einsum("bhntk,bhnjk,bhntjk->bhntj", r, k, torch.exp(gap))
    bonus = (r * u[None, :, None, None, :] * k).sum(-1, keepdim=True)  # [B, H, n, L, 1]
    y = scores @ v + bonus * v  # [B, H, n, L, V]
    decay_to_end = torch.exp(c[:, :, :, -1:, :] - c)  # [B, H, n, L, K]
    k_end = k * decay_to_end
    w_chunk = torch.exp(c[:, :, :, -1, :])  # [B, H, n, K]
    S = state
    ys = []
    # per-chunk views by unbind, not x[:, :, i]: the backward of each indexing op fills a zero tensor of the whole
    # input, which made fwd+bwd grow as T^2 (docs/evaluation.md, "Speed and memory"); unbind's backward stacks once
    r_from_state = r * torch.exp(c_prev)
    for y_i, rs_i, w_i, k_i, v_i in zip(y.unbind(2), r_from_state.unbind(2), w_chunk.unbind(2), k_end.unbind(2),
                                        v.unbind(2), strict=True):
        ys.append(y_i + rs_i @ S)
        S = w_i[..., None] * S + k_i.transpose(-1, -2) @ v_i
    y = torch.stack(ys, dim=2).permute(0, 2, 3, 1, 4).reshape(B, n * L, H, V)
    return y[:, :T], S


BACKENDS = {"recurrent": gla_recurrent, "chunked": gla_chunked, "fla": gla_fla, "triton": gla_triton}


def gla(r, k, v, logw, u, state, *, backend: str = "chunked", out=None):
    """Gated linear attention with bonus. Returns (y [B, T, H, V], state [B, H, K, V]). One token takes
    the fused `gla_step` whatever the backend (tests compare it with the reference loop), or its C
    version (`aviary.cpu.steps`) where that runs, which writes the new state into `out` when given."""
    if r.shape[1] == 1:
        if steps.steps_available(state, r, k, v, logw, u):
            return steps.gla_step(r, k, v, logw, u, state, out=out)
        with state_update_threads(state.numel()):
            return gla_step(r, k, v, logw, u, state)
    return pick("gla", BACKENDS, backend)(r, k, v, logw, u, state)
