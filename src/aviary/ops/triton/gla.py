"""RWKV-5/6 gated linear attention with bonus as a Triton state-passing kernel (`aviary.ops.gla`'s "triton").

Per head, with S in R^{K x V} (the contract and layout of `aviary.ops.gla.gla_recurrent`):

    y_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T)
    S_t = diag(w_t) S_{t-1} + k_t v_t^T,   w_t = e^{logw_t}

Reverse mode, with dS = dL/dS_t (the future's gradient; dL/dS_T given) and s = dy_t . v_t:

    dr_t = (S_{t-1} + diag(u) k_t v_t^T) dy_t        du += r_t * k_t * s
    dk_t = r_t * u * s + dS v_t                      dv_t = (r_t . (u * k_t)) dy_t + dS^T k_t
    dlogw_t = w_t * rowsum(dS * S_{t-1})             dS_{t-1} = diag(w_t) dS + r_t dy_t^T

Every key-sized gradient is a sum over the value index, so programs that hold different value blocks write
partial sums that the Python side adds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aviary.ops.triton._launch import check_inputs, check_rank, check_shapes, f32, value_block, wants_grad


@triton.jit
def _gla_fwd(r_ptr, k_ptr, v_ptr, logw_ptr, u_ptr, s0_ptr, y_ptr, s_out_ptr, saved_ptr, T, n_chunks,
             H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             C: tl.constexpr, SAVE: tl.constexpr):
    b, h, iv = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2).to(tl.int64)
    ok = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    tile = ok[:, None] * V + ov[None, :]  # [BK, BV] offsets inside one [K, V] state
    mkv = mk[:, None] & mv[None, :]
    bh = b * H + h
    S = tl.load(s0_ptr + bh * K * V + tile, mask=mkv, other=0.0)
    u = tl.load(u_ptr + h * K + ok, mask=mk, other=0.0)
    for c in range(n_chunks):
        if SAVE:  # the state before chunk c, where the backward pass restarts its recomputation
            tl.store(saved_ptr + (bh * n_chunks + c) * K * V + tile, S, mask=mkv)
        for t in range(c * C, min(c * C + C, T)):
            xk = ((b * T + t) * H + h) * K + ok
            rt = tl.load(r_ptr + xk, mask=mk, other=0.0)
            kt = tl.load(k_ptr + xk, mask=mk, other=0.0)
            wt = tl.exp(tl.load(logw_ptr + xk, mask=mk, other=0.0))
            xv = ((b * T + t) * H + h) * V + ov
            vt = tl.load(v_ptr + xv, mask=mv, other=0.0)
            kv = kt[:, None] * vt[None, :]
            y = tl.sum(rt[:, None] * (S + u[:, None] * kv), axis=0)  # reads the state before the update
            tl.store(y_ptr + xv, y, mask=mv)
            S = wt[:, None] * S + kv
    tl.store(s_out_ptr + bh * K * V + tile, S, mask=mkv)


@triton.jit
def _gla_bwd(r_ptr, k_ptr, v_ptr, logw_ptr, u_ptr, saved_ptr, dy_ptr, ds_out_ptr,
             dr_ptr, dk_ptr, dv_ptr, dlogw_ptr, du_ptr, ds0_ptr, scratch_ptr, B, T, n_chunks,
             H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             C: tl.constexpr):
    b, h, iv = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2).to(tl.int64)
    n_v = tl.num_programs(2)
    ok = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    tile = ok[:, None] * V + ov[None, :]
    mkv = mk[:, None] & mv[None, :]
    bh = b * H + h
    # this program's scratch: the C states before each step of the chunk being reversed, [C, BK, BV]
    scratch = scratch_ptr + (bh * n_v + iv) * C * BK * BV + ok[:, None] * BV + tl.arange(0, BV)[None, :]
    partial = iv * B * T * H * K  # the key-sized gradients of value block iv, summed on the Python side
    u = tl.load(u_ptr + h * K + ok, mask=mk, other=0.0)
    dS = tl.load(ds_out_ptr + bh * K * V + tile, mask=mkv, other=0.0)
    du = tl.zeros([BK], dtype=tl.float32)
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        start = c * C
        end = min(start + C, T)
        S = tl.load(saved_ptr + (bh * n_chunks + c) * K * V + tile, mask=mkv, other=0.0)
        for t in range(start, end):  # recompute the chunk forward, keeping every state
            tl.store(scratch + (t - start) * BK * BV, S)
            xk = ((b * T + t) * H + h) * K + ok
            kt = tl.load(k_ptr + xk, mask=mk, other=0.0)
            wt = tl.exp(tl.load(logw_ptr + xk, mask=mk, other=0.0))
            vt = tl.load(v_ptr + ((b * T + t) * H + h) * V + ov, mask=mv, other=0.0)
            S = wt[:, None] * S + kt[:, None] * vt[None, :]
        tl.debug_barrier()  # the scratch written above is read below by other threads of this program
        for j in range(end - start):  # and walk it backwards
            t = end - 1 - j
            S = tl.load(scratch + (t - start) * BK * BV)  # S_{t-1}
            xk = ((b * T + t) * H + h) * K + ok
            rt = tl.load(r_ptr + xk, mask=mk, other=0.0)
            kt = tl.load(k_ptr + xk, mask=mk, other=0.0)
            wt = tl.exp(tl.load(logw_ptr + xk, mask=mk, other=0.0))
            xv = ((b * T + t) * H + h) * V + ov
            vt = tl.load(v_ptr + xv, mask=mv, other=0.0)
            dy = tl.load(dy_ptr + xv, mask=mv, other=0.0)
            s = tl.sum(dy * vt, axis=0)
            dr = tl.sum((S + u[:, None] * (kt[:, None] * vt[None, :])) * dy[None, :], axis=1)
            dk = rt * u * s + tl.sum(dS * vt[None, :], axis=1)
            dv = tl.sum(rt * u * kt, axis=0) * dy + tl.sum(dS * kt[:, None], axis=0)
            dlogw = wt * tl.sum(dS * S, axis=1)
            du += rt * kt * s
            tl.store(dr_ptr + partial + xk, dr, mask=mk)
            tl.store(dk_ptr + partial + xk, dk, mask=mk)
            tl.store(dlogw_ptr + partial + xk, dlogw, mask=mk)
            tl.store(dv_ptr + xv, dv, mask=mv)
            dS = wt[:, None] * dS + rt[:, None] * dy[None, :]
        tl.debug_barrier()  # all reads of this chunk's scratch are done before the next chunk overwrites it
    tl.store(ds0_ptr + bh * K * V + tile, dS, mask=mkv)
    tl.store(du_ptr + (iv * B + b) * H * K + h * K + ok, du, mask=mk)


class _GLA(torch.autograd.Function):
    """Inputs are contiguous float32 with logw of full shape [B, T, H, K]; the wrapper below sees to that."""

    @staticmethod
    def forward(ctx, r, k, v, logw, u, state, chunk_len, save):
        B, T, H, K = r.shape
        V = v.shape[-1]
        BV = value_block(V)
        n_chunks = triton.cdiv(T, chunk_len)
        y = torch.empty_like(v)
        s_out = torch.empty_like(state)
        saved = state.new_empty((B, H, n_chunks, K, V) if save else (1,))
        grid = (B, H, triton.cdiv(V, BV))
        _gla_fwd[grid](r, k, v, logw, u, state, y, s_out, saved, T, n_chunks, H=H, K=K, V=V,
                       BK=triton.next_power_of_2(K), BV=BV, C=chunk_len, SAVE=save)
        if save:
            ctx.save_for_backward(r, k, v, logw, u, saved)
            ctx.chunk_len = chunk_len
        return y, s_out

    @staticmethod
    def backward(ctx, dy, ds_out):
        r, k, v, logw, u, saved = ctx.saved_tensors
        B, T, H, K = r.shape
        V = v.shape[-1]
        C = ctx.chunk_len
        BK, BV = triton.next_power_of_2(K), value_block(V)
        n_v = triton.cdiv(V, BV)
        dr, dk, dlogw = (r.new_empty(n_v, B, T, H, K) for _ in range(3))
        du = u.new_empty(n_v, B, H, K)
        dv, ds0 = torch.empty_like(v), torch.empty_like(ds_out)
        scratch = r.new_empty(B * H * n_v * C * BK * BV)
        _gla_bwd[(B, H, n_v)](r, k, v, logw, u, saved, f32(dy), f32(ds_out), dr, dk, dv, dlogw, du, ds0, scratch,
                              B, T, saved.shape[2], H=H, K=K, V=V, BK=BK, BV=BV, C=C)
        return dr.sum(0), dk.sum(0), dv, dlogw.sum(0), du.sum((0, 1)), ds0, None, None


def gla_triton(r, k, v, logw, u, state, *, chunk_len: int):
    """`gla_recurrent`'s contract on a Triton kernel. Shapes: r, k, logw [B, T, H, K] (logw may be [1, 1, H, K]);
    v [B, T, H, V]; u [H, K]; state [B, H, K, V]. Computes in float32; returns y [B, T, H, V] in v's dtype and
    the state [B, H, K, V] in state's dtype. When a gradient is wanted the forward keeps T / chunk_len states per
    sequence and head; the backward adds chunk_len states of scratch per program (the default chunk_len is set
    in aviary.ops.triton)."""
    check_inputs("gla", _gla_fwd, chunk_len, r=r, k=k, v=v, logw=logw, u=u, state=state)
    check_rank("gla", r=(r, 4), v=(v, 4))
    B, T, H, K = r.shape
    V = v.shape[-1]
    check_shapes("gla", k=(k, (B, T, H, K)), v=(v, (B, T, H, V)), u=(u, (H, K)), state=(state, (B, H, K, V)))
    if logw.shape not in ((B, T, H, K), (1, 1, H, K)):
        raise ValueError(f"gla backend 'triton': logw has shape {tuple(logw.shape)}, expected {(B, T, H, K)} "
                         f"or {(1, 1, H, K)}")
    inputs = (f32(r), f32(k), f32(v), f32(logw.expand(B, T, H, K)), f32(u), f32(state))
    y, s = _GLA.apply(*inputs, chunk_len, wants_grad(inputs))
    return y.to(v.dtype), s.to(state.dtype)
