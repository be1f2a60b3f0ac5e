"""RWKV-4 WKV: per-channel exponential-decay attention with a normaliser.

For each channel independently, with log-decay w < 0 and bonus u:

    wkv_t = (sum_{j<t} e^{(t-1-j) w + k_j} v_j + e^{u + k_t} v_t)
          / (sum_{j<t} e^{(t-1-j) w + k_j}     + e^{u + k_t})

State (aa, bb, pp), shape [B, 3, C]: numerator and denominator of the sum over j < t+1, both scaled
by e^{-pp}, so no exponential ever overflows. The empty state is (0, 0, -1e30).
Mirrors `att_one` / `att_seq` of the rwkv pip package and `RWKV_in_150_lines.py`.

Shapes: k, v [B, T, C] float32; w, u [C] float32; state [B, 3, C] float32.
"""

from __future__ import annotations

import torch

from aviary.ops._dispatch import pick
from aviary.ops.triton import wkv4_triton

EMPTY_PP = -1e30


def empty_state(batch: int, channels: int, device: torch.device | str = "cpu") -> torch.Tensor:
    state = torch.zeros(batch, 3, channels, device=device, dtype=torch.float32)
    state[:, 2] = EMPTY_PP
    return state


def wkv4_recurrent(w, u, k, v, state):
    """Reference: one token at a time, exactly the numerically stable recurrence of the pip package."""
    aa, bb, pp = state.unbind(1)  # each [B, C]
    ys = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]
        ww = u + kt
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        ys.append((e1 * aa + e2 * vt) / (e1 * bb + e2))  # output reads the state before the update
        ww = w + pp
        p = torch.maximum(ww, kt)
        e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
        aa, bb, pp = e1 * aa + e2 * vt, e1 * bb + e2, p
    return torch.stack(ys, dim=1), torch.stack([aa, bb, pp], dim=1)


def wkv4_chunked(w, u, k, v, state, chunk_len: int = 64):
    """Parallel over each chunk of `chunk_len` tokens: all pair weights at once, in log space.

    Inside a chunk, position t attends to earlier positions j with log-weight (t-1-j) w + k_j, to
    itself with u + k_t, and to the carried state with pp + t w. Subtracting the row maximum before
    exponentiating keeps every term <= 1, as the recurrence does.
    """
    B, T, C = k.shape
    aa, bb, pp = state.unbind(1)  # [B, C]
    ys = []
    for s in range(0, T, chunk_len):
        kc, vc = k[:, s:s + chunk_len], v[:, s:s + chunk_len]  # [B, L, C]
        L = kc.shape[1]
        pos = torch.arange(L, device=k.device, dtype=k.dtype)
        gap = (pos[:, None] - 1 - pos[None, :])  # [L(t), L(j)] = t-1-j
        logits = gap[None, :, :, None] * w + kc[:, None, :, :]  # [B, t, j, C]
        eye = torch.eye(L, dtype=torch.bool, device=k.device)[None, :, :, None]
        lower = torch.ones(L, L, dtype=torch.bool, device=k.device).tril(-1)[None, :, :, None]
        logits = torch.where(eye, (u + kc)[:, :, None, :], logits)  # diagonal: bonus u + k_t
        logits = torch.where(lower | eye, logits, torch.full_like(logits, float("-inf")))
        from_state = pp[:, None, :] + pos[None, :, None] * w  # [B, t, C]
        m = torch.maximum(logits.amax(dim=2), from_state)  # [B, t, C]
        e = torch.exp(logits - m[:, :, None, :])  # [B, t, j, C]
        es = torch.exp(from_state - m)  # [B, t, C]
        num = torch.einsum("btjc,bjc->btc", e, vc) + es * aa[:, None]
        den = e.sum(dim=2) + es * bb[:, None]
        ys.append(num / den)
        # carry: weight of j at the chunk end is (L-1-j) w + k_j; the old state decays by L w
        q = (L - 1 - pos)[None, :, None] * w + kc  # [B, j, C]
        s_old = pp + L * w  # [B, C]
        p_new = torch.maximum(q.amax(dim=1), s_old)
        eq, eo = torch.exp(q - p_new[:, None]), torch.exp(s_old - p_new)
        aa = eo * aa + (eq * vc).sum(dim=1)
        bb = eo * bb + eq.sum(dim=1)
        pp = p_new
    return torch.cat(ys, dim=1), torch.stack([aa, bb, pp], dim=1)


BACKENDS = {"recurrent": wkv4_recurrent, "chunked": wkv4_chunked, "triton": wkv4_triton}


def wkv4(w, u, k, v, state, *, backend: str = "chunked"):
    """RWKV-4 WKV over a sequence. Returns (y [B, T, C], state [B, 3, C])."""
    return pick("wkv4", BACKENDS, backend)(w, u, k, v, state)
