"""RWKV-7's generalised delta rule as a Triton state-passing kernel (`aviary.ops.delta`'s "triton" backend).

Per head, with S in R^{K x V} (the contract and layout of `aviary.ops.delta.delta_rule_recurrent`):

    p_t = S_{t-1}^T a_t                                   # what the "delete" term reads, [V]
    S_t = diag(w_t) S_{t-1} + b_t p_t^T + k_t v_t^T,       w_t = e^{logw_t}
    y_t = S_t^T r_t                                       # reads the state after the update

Reverse mode, with G = dL/dS_t + r_t dy_t^T (the future's gradient plus this step's read):

    dr_t = S_t dy_t        dk_t = G v_t        dv_t = G^T k_t        db_t = G p_t
    dp = G^T b_t           da_t = S_{t-1} dp   dlogw_t = w_t * rowsum(G * S_{t-1})
    dL/dS_{t-1} = diag(w_t) G + a_t dp^T

The key-sized gradients are sums over the value index: programs that hold different value blocks write partial
sums that the Python side adds. Unlike the official CUDA kernel, the backward does not rebuild earlier states by
dividing by w (which needs the decay clamped away from 0): it recomputes them forward from saved chunk starts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aviary.ops.triton._launch import check_inputs, check_rank, check_shapes, f32, value_block, wants_grad


@triton.jit
def _delta_fwd(r_ptr, logw_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, y_ptr, s_out_ptr, saved_ptr, T, n_chunks,
               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               C: tl.constexpr, SAVE: tl.constexpr):
    bb, h, iv = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2).to(tl.int64)
    ok = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    tile = ok[:, None] * V + ov[None, :]  # [BK, BV] offsets inside one [K, V] state
    mkv = mk[:, None] & mv[None, :]
    bh = bb * H + h
    S = tl.load(s0_ptr + bh * K * V + tile, mask=mkv, other=0.0)
    for c in range(n_chunks):
        if SAVE:  # the state before chunk c, where the backward pass restarts its recomputation
            tl.store(saved_ptr + (bh * n_chunks + c) * K * V + tile, S, mask=mkv)
        for t in range(c * C, min(c * C + C, T)):
            xk = ((bb * T + t) * H + h) * K + ok
            at = tl.load(a_ptr + xk, mask=mk, other=0.0)
            bt = tl.load(b_ptr + xk, mask=mk, other=0.0)
            kt = tl.load(k_ptr + xk, mask=mk, other=0.0)
            wt = tl.exp(tl.load(logw_ptr + xk, mask=mk, other=0.0))
            xv = ((bb * T + t) * H + h) * V + ov
            vt = tl.load(v_ptr + xv, mask=mv, other=0.0)
            p = tl.sum(at[:, None] * S, axis=0)
            S = wt[:, None] * S + bt[:, None] * p[None, :] + kt[:, None] * vt[None, :]
            rt = tl.load(r_ptr + xk, mask=mk, other=0.0)
            tl.store(y_ptr + xv, tl.sum(rt[:, None] * S, axis=0), mask=mv)
    tl.store(s_out_ptr + bh * K * V + tile, S, mask=mkv)


@triton.jit
def _delta_bwd(r_ptr, logw_ptr, k_ptr, v_ptr, a_ptr, b_ptr, saved_ptr, dy_ptr, ds_out_ptr,
               dr_ptr, dlogw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr, ds0_ptr, scratch_ptr, B, T, n_chunks,
               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               C: tl.constexpr):
    bb, h, iv = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2).to(tl.int64)
    n_v = tl.num_programs(2)
    ok = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    tile = ok[:, None] * V + ov[None, :]
    mkv = mk[:, None] & mv[None, :]
    bh = bb * H + h
    # this program's scratch: the states before each step of the chunk being reversed, [C, BK, BV]
    scratch = scratch_ptr + (bh * n_v + iv) * C * BK * BV + ok[:, None] * BV + tl.arange(0, BV)[None, :]
    partial = iv * B * T * H * K  # the key-sized gradients of value block iv, summed on the Python side
    dS = tl.load(ds_out_ptr + bh * K * V + tile, mask=mkv, other=0.0)
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        start = c * C
        end = min(start + C, T)
        S = tl.load(saved_ptr + (bh * n_chunks + c) * K * V + tile, mask=mkv, other=0.0)
        for t in range(start, end):  # recompute the chunk forward, keeping every state
            tl.store(scratch + (t - start) * BK * BV, S)
            xk = ((bb * T + t) * H + h) * K + ok
            at = tl.load(a_ptr + xk, mask=mk, other=0.0)
            bt = tl.load(b_ptr + xk, mask=mk, other=0.0)
            kt = tl.load(k_ptr + xk, mask=mk, other=0.0)
            wt = tl.exp(tl.load(logw_ptr + xk, mask=mk, other=0.0))
            vt = tl.load(v_ptr + ((bb * T + t) * H + h) * V + ov, mask=mv, other=0.0)
            p = tl.sum(at[:, None] * S, axis=0)
            S = wt[:, None] * S + bt[:, None] * p[None, :] + kt[:, None] * vt[None, :]
        tl.debug_barrier()  # the scratch written above is read below by other threads of this program
        for j in range(end - start):  # and walk it backwards
            t = end - 1 - j
            S = tl.load(scratch + (t - start) * BK * BV)  # S_{t-1}
            xk = ((bb * T + t) * H + h) * K + ok
            rt = tl.load(r_ptr + xk, mask=mk, other=0.0)
            at = tl.load(a_ptr + xk, mask=mk, other=0.0)
            bt = tl.load(b_ptr + xk, mask=mk, other=0.0)
            kt = tl.load(k_ptr + xk, mask=mk, other=0.0)
            wt = tl.exp(tl.load(logw_ptr + xk, mask=mk, other=0.0))
            xv = ((bb * T + t) * H + h) * V + ov
            vt = tl.load(v_ptr + xv, mask=mv, other=0.0)
            dy = tl.load(dy_ptr + xv, mask=mv, other=0.0)
            p = tl.sum(at[:, None] * S, axis=0)
            S_t = wt[:, None] * S + bt[:, None] * p[None, :] + kt[:, None] * vt[None, :]
            G = dS + rt[:, None] * dy[None, :]
            dp = tl.sum(bt[:, None] * G, axis=0)
            tl.store(dr_ptr + partial + xk, tl.sum(S_t * dy[None, :], axis=1), mask=mk)
            tl.store(dk_ptr + partial + xk, tl.sum(G * vt[None, :], axis=1), mask=mk)
            tl.store(db_ptr + partial + xk, tl.sum(G * p[None, :], axis=1), mask=mk)
            tl.store(da_ptr + partial + xk, tl.sum(S * dp[None, :], axis=1), mask=mk)
            tl.store(dlogw_ptr + partial + xk, wt * tl.sum(G * S, axis=1), mask=mk)
            tl.store(dv_ptr + xv, tl.sum(G * kt[:, None], axis=0), mask=mv)
            dS = wt[:, None] * G + at[:, None] * dp[None, :]
        tl.debug_barrier()  # all reads of this chunk's scratch are done before the next chunk overwrites it
    tl.store(ds0_ptr + bh * K * V + tile, dS, mask=mkv)


class _DeltaRule(torch.autograd.Function):
    """Inputs are contiguous float32; the wrapper below sees to that."""

    @staticmethod
    def forward(ctx, r, logw, k, v, a, b, state, chunk_len, save):
        B, T, H, K = r.shape
        V = v.shape[-1]
        BV = value_block(V)
        n_chunks = triton.cdiv(T, chunk_len)
        y = torch.empty_like(v)
        s_out = torch.empty_like(state)
        saved = state.new_empty((B, H, n_chunks, K, V) if save else (1,))
        _delta_fwd[(B, H, triton.cdiv(V, BV))](r, logw, k, v, a, b, state, y, s_out, saved, T, n_chunks, H=H, K=K,
                                               V=V, BK=triton.next_power_of_2(K), BV=BV, C=chunk_len, SAVE=save)
        if save:
            ctx.save_for_backward(r, logw, k, v, a, b, saved)
            ctx.chunk_len = chunk_len
        return y, s_out

    @staticmethod
    def backward(ctx, dy, ds_out):
        r, logw, k, v, a, b, saved = ctx.saved_tensors
        B, T, H, K = r.shape
        V = v.shape[-1]
        C = ctx.chunk_len
        BK, BV = triton.next_power_of_2(K), value_block(V)
        n_v = triton.cdiv(V, BV)
        dr, dlogw, dk, da, db = (r.new_empty(n_v, B, T, H, K) for _ in range(5))
        dv, ds0 = torch.empty_like(v), torch.empty_like(ds_out)
        scratch = r.new_empty(B * H * n_v * C * BK * BV)
        _delta_bwd[(B, H, n_v)](r, logw, k, v, a, b, saved, f32(dy), f32(ds_out), dr, dlogw, dk, dv, da, db, ds0,
                                scratch, B, T, saved.shape[2], H=H, K=K, V=V, BK=BK, BV=BV, C=C)
        return dr.sum(0), dlogw.sum(0), dk.sum(0), dv, da.sum(0), db.sum(0), ds0, None, None


def delta_rule_triton(r, logw, k, v, a, b, state, *, chunk_len: int):
    """`delta_rule_recurrent`'s contract on a Triton kernel. Shapes: r, logw, k, a, b [B, T, H, K]; v [B, T, H, V];
    state [B, H, K, V]. Computes in float32; returns y [B, T, H, V] in v's dtype and the state [B, H, K, V] in
    state's dtype. Any decay works (no clamp needed). When a gradient is wanted the forward keeps T / chunk_len
    states per sequence and head; the backward recomputes the states inside each chunk from them, with chunk_len
    states of scratch per program (the default chunk_len is set in aviary.ops.triton)."""
    check_inputs("delta_rule", _delta_fwd, chunk_len, r=r, logw=logw, k=k, v=v, a=a, b=b, state=state)
    check_rank("delta_rule", r=(r, 4), v=(v, 4))
    B, T, H, K = r.shape
    V = v.shape[-1]
    check_shapes("delta_rule", logw=(logw, (B, T, H, K)), k=(k, (B, T, H, K)), v=(v, (B, T, H, V)),
                 a=(a, (B, T, H, K)), b=(b, (B, T, H, K)), state=(state, (B, H, K, V)))
    inputs = tuple(f32(x) for x in (r, logw, k, v, a, b, state))
    y, s = _DeltaRule.apply(*inputs, chunk_len, wants_grad(inputs))
    return y.to(v.dtype), s.to(state.dtype)
