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

from aviary.ops._dispatch import pick


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


BACKENDS = {"recurrent": delta_rule_recurrent, "chunked": delta_rule_recurrent}


def delta_rule(r, logw, k, v, a, b, state, *, backend: str = "chunked"):
    """Generalised delta rule. Returns (y [B, T, H, V], state [B, H, K, V]).

    The "chunked" backend is still the token loop (the projections around it are batched over time);
    a chunked WY form is future work, and it will be tested against `delta_rule_recurrent`.
    """
    return pick("delta_rule", BACKENDS, backend)(r, logw, k, v, a, b, state)
