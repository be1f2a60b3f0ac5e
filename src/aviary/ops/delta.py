"""RWKV-7 WKV: the generalised delta rule.

Per head, with a matrix state S in R^{K x V} (key index rows, value index columns):

    S_t = diag(w_t) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    y_t = S_t^T r_t                                  # reads the state after the update

RWKV-7 calls it with a = -kk and b = kk * iclr (kk the per-head unit-norm key), which makes
diag(w) - kk (iclr kk)^T a decay followed by a partial "delete" of the old value stored under kk.
The official kernels and the rwkv pip package keep S transposed ([V, K]); this is the same
recurrence with both sides transposed.

Shapes: r, k, a, b, logw [B, T, H, K]; v [B, T, H, V]; state [B, H, K, V]; all float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aviary.cpu import steps
from aviary.cpu.threads import state_update_threads
from aviary.ops._dispatch import pick
from aviary.ops.fla import delta_rule_fla
from aviary.ops.triton import delta_rule_triton


def delta_rule_recurrent(r, logw, k, v, a, b, state):
    """Reference: one token at a time."""
    w = torch.exp(logw)
    S = state
    ys = []
    for t in range(r.shape[1]):
        aS = torch.einsum("bhk,bhkv->bhv", a[:, t], S)  # [B, H, V]
        S = (w[:, t, :, :, None] * S + b[:, t, :, :, None] * aS[:, :, None, :]
             + k[:, t, :, :, None] * v[:, t, :, None, :])
        ys.append(torch.einsum("bhk,bhkv->bhv", r[:, t], S))
    return torch.stack(ys, dim=1), S


def delta_rule_step(r, logw, k, v, a, b, state):
    """One token (T = 1), the decode fast path: the recurrence above as three batched matrix products.
    The two rank-one updates b (a^T S) and k v^T go in as one rank-two product added onto the decayed
    state (`baddbmm`), so the [K, V] state is read and written twice instead of five times."""
    B, _, H, K = r.shape
    V = v.shape[-1]

    def rows(x):  # [B, 1, H, D] -> [B*H, 1, D]
        return x.reshape(B * H, 1, x.shape[-1])

    S = state.reshape(B * H, K, V)
    aS = torch.bmm(rows(a), S)  # [BH, 1, V]
    left = torch.cat([rows(b), rows(k)], dim=1).transpose(1, 2)  # [BH, K, 2]
    right = torch.cat([aS, rows(v)], dim=1)  # [BH, 2, V]
    S = torch.baddbmm(S * torch.exp(logw).reshape(B * H, K, 1), left, right)
    y = torch.bmm(rows(r), S)  # [BH, 1, V]
    return y.view(B, 1, H, V), S.view(B, H, K, V)


# The chunked form factors decay products as e^{c_t} * e^{-c_j}; that is exact arithmetic but needs
# chunk_len * |log decay| well inside fp32's exponent range. RWKV-7's decay is clamped to log w > -0.61.
MAX_CHUNK_LOG_DECAY = 40.0


def delta_rule_chunked(r, logw, k, v, a, b, state, chunk_len: int = 32):
    """Parallel within chunks of `chunk_len` tokens (a WY-style solve), sequential across chunks
    (`_delta_rule_chunks`). A sequence shorter than a chunk is one chunk of its own length, and the tail after
    the last whole chunk is a chunk of its own, so no call pays for padding (a 35-token prompt used to cost 64
    positions: docs/benchmarks.md, "Batched prefill")."""
    T = r.shape[1]
    L = max(1, min(chunk_len, T))
    tail = T % L
    if not tail:
        return _delta_rule_chunks(r, logw, k, v, a, b, state, L)
    head = T - tail
    y_head, state = _delta_rule_chunks(*(x[:, :head] for x in (r, logw, k, v, a, b)), state, L)
    y_tail, state = _delta_rule_chunks(*(x[:, head:] for x in (r, logw, k, v, a, b)), state, tail)
    return torch.cat([y_head, y_tail], dim=1), state


def _delta_rule_chunks(r, logw, k, v, a, b, state, chunk_len: int):
    """The chunked form for any T (padded to a multiple of `chunk_len`, which the caller avoids).

    Inside a chunk, with c_t = sum_{m<=t} logw_m and u_t = S_{t-1}^T a_t (the part of the old state
    that the "delete" term reads), unrolling the recurrence gives
        S_t = e^{c_t} S_0 + sum_{j<=t} e^{c_t - c_j} (b_j u_j^T + k_j v_j^T)
        u_t = S_0^T (a_t e^{c_{t-1}}) + sum_{j<t} (a_t e^{c_{t-1}-c_j} . b_j) u_j + (a_t e^{c_{t-1}-c_j} . k_j) v_j
    so U = [u_t] solves a unit lower-triangular system (I - M_ab) U = A~ S_0 + M_ak V, and outputs and the
    chunk-end state follow with matrix products. Everything that does not involve S_0 is computed for all
    chunks at once; only the [K, V] state is carried from chunk to chunk.
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    L = chunk_len
    strongest = float(logw.detach().min()) if logw.numel() else 0.0
    if strongest * L < -MAX_CHUNK_LOG_DECAY:
        raise ValueError(f"delta_rule chunked: log decay {strongest:.3g} too strong for chunk_len={L}; "
                         "use a shorter chunk or the recurrent backend")
    pad = (-T) % L
    if pad:  # padded steps: k = a = b = 0 and decay 1, so they change nothing
        r, k, a, b, logw = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (r, k, a, b, logw))
        v = F.pad(v, (0, 0, 0, 0, 0, pad))
    n = (T + pad) // L

    def chunks(x):  # [B, n*L, H, D] -> [B, H, n, L, D]
        return x.reshape(B, n, L, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    r, logw, k, v, a, b = (chunks(x) for x in (r, logw, k, v, a, b))
    c = logw.cumsum(dim=3)  # inclusive cumulative log decay, [B, H, n, L, K]
    a_dec = a * torch.exp(c - logw)  # a_t e^{c_{t-1}}
    r_dec = r * torch.exp(c)  # r_t e^{c_t}
    b_inv, k_inv = b * torch.exp(-c), k * torch.exp(-c)
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    incl = torch.ones(L, L, dtype=torch.bool, device=r.device).tril()
    m_ab = (a_dec @ b_inv.transpose(-1, -2)) * strict  # [B, H, n, L, L]
    m_ak = (a_dec @ k_inv.transpose(-1, -2)) * strict
    p_rb = (r_dec @ b_inv.transpose(-1, -2)) * incl
    p_rk = (r_dec @ k_inv.transpose(-1, -2)) * incl
    eye = torch.eye(L, dtype=r.dtype, device=r.device)
    solve = torch.linalg.solve_triangular(eye - m_ab, torch.cat([a_dec, m_ak @ v], dim=-1), upper=False,
                                          unitriangular=True)
    w_s, z = solve[..., :K], solve[..., K:]  # U = w_s @ S_0 + z
    y_local = p_rk @ v  # [B, H, n, L, V]
    to_end = torch.exp(c[:, :, :, -1:, :] - c)  # e^{c_L - c_j}
    b_end, k_end = (b * to_end).transpose(-1, -2), (k * to_end).transpose(-1, -2)  # [B, H, n, K, L]
    decay_chunk = torch.exp(c[:, :, :, -1, :])[..., None]  # [B, H, n, K, 1]
    S = state
    ys = []
    # per-chunk views by unbind, not x[:, :, i]: the backward of each indexing op fills a zero tensor of the whole
    # input, which made fwd+bwd grow as T^2 (docs/evaluation.md, "Speed and memory"); unbind's backward stacks once
    per_chunk = (x.unbind(2) for x in (w_s, z, r_dec, p_rb, y_local, decay_chunk, b_end, k_end, v))
    for w_i, z_i, r_i, p_i, y_i, d_i, b_i, k_i, v_i in zip(*per_chunk, strict=True):
        u = w_i @ S + z_i  # [B, H, L, V]
        ys.append(r_i @ S + p_i @ u + y_i)
        S = d_i * S + b_i @ u + k_i @ v_i
    y = torch.stack(ys, dim=2).permute(0, 2, 3, 1, 4).reshape(B, n * L, H, V)
    return y[:, :T], S


BACKENDS = {"recurrent": delta_rule_recurrent, "chunked": delta_rule_chunked, "fla": delta_rule_fla,
            "triton": delta_rule_triton}


def delta_rule(r, logw, k, v, a, b, state, *, backend: str = "chunked", out=None):
    """Generalised delta rule. Returns (y [B, T, H, V], state [B, H, K, V]). One token takes the fused
    `delta_rule_step` whatever the backend (tests compare it with the reference loop), or its C version
    (`aviary.cpu.steps`) where that runs, which writes the new state into `out` when given."""
    if r.shape[1] == 1:
        if steps.steps_available(state, r, logw, k, v, a, b):
            return steps.delta_rule_step(r, logw, k, v, a, b, state, out=out)
        with state_update_threads(state.numel()):
            return delta_rule_step(r, logw, k, v, a, b, state)
    return pick("delta_rule", BACKENDS, backend)(r, logw, k, v, a, b, state)
