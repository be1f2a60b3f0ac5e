"""RWKV-4's WKV as a Triton kernel (`aviary.ops.wkv4`'s "triton" backend), in the numerically stable form.

Per channel, the contract and the state (aa, bb, pp) of `aviary.ops.wkv4.wkv4_recurrent`, step for step:

    p = max(pp, u + k_t),      e1 = e^{pp - p},   e2 = e^{u + k_t - p}
    y_t = (e1 aa + e2 v_t) / (e1 bb + e2)                           # reads the state before the update
    q = max(w + pp, k_t),      f1 = e^{w + pp - q}, f2 = e^{k_t - q}
    aa, bb, pp <- f1 aa + f2 v_t,  f1 bb + f2,  q

The backward pass is the exact reverse mode of these lines (a max passes its gradient to the larger argument,
half to each on a tie, as torch.maximum does), so the gradients of the state's three components match autograd
through the reference, pp included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aviary.ops.triton._launch import check_inputs, check_rank, check_shapes, f32, wants_grad


@triton.jit
def _max_grad_to_first(x, y, g):
    """The share of g = dL/d max(x, y) that goes to x (torch.maximum's rule)."""
    return tl.where(x > y, g, tl.where(x == y, 0.5 * g, 0.0))


@triton.jit
def _wkv4_fwd(w_ptr, u_ptr, k_ptr, v_ptr, s0_ptr, y_ptr, s_out_ptr, saved_ptr, T, n_chunks,
              CH: tl.constexpr, BC: tl.constexpr, C: tl.constexpr, SAVE: tl.constexpr):
    b, ic = tl.program_id(0).to(tl.int64), tl.program_id(1)
    oc = ic * BC + tl.arange(0, BC)
    m = oc < CH
    w = tl.load(w_ptr + oc, mask=m, other=0.0)
    u = tl.load(u_ptr + oc, mask=m, other=0.0)
    aa = tl.load(s0_ptr + (b * 3 + 0) * CH + oc, mask=m, other=0.0)
    bb = tl.load(s0_ptr + (b * 3 + 1) * CH + oc, mask=m, other=0.0)
    pp = tl.load(s0_ptr + (b * 3 + 2) * CH + oc, mask=m, other=0.0)
    for c in range(n_chunks):
        if SAVE:  # the state before chunk c, where the backward pass restarts its recomputation
            base = saved_ptr + ((b * n_chunks + c) * 3) * CH + oc
            tl.store(base, aa, mask=m)
            tl.store(base + CH, bb, mask=m)
            tl.store(base + 2 * CH, pp, mask=m)
        for t in range(c * C, min(c * C + C, T)):
            x = (b * T + t) * CH + oc
            kt = tl.load(k_ptr + x, mask=m, other=0.0)
            vt = tl.load(v_ptr + x, mask=m, other=0.0)
            ww = u + kt
            p = tl.maximum(pp, ww)
            e1, e2 = tl.exp(pp - p), tl.exp(ww - p)
            tl.store(y_ptr + x, (e1 * aa + e2 * vt) / (e1 * bb + e2), mask=m)
            ww = w + pp
            q = tl.maximum(ww, kt)
            f1, f2 = tl.exp(ww - q), tl.exp(kt - q)
            aa, bb, pp = f1 * aa + f2 * vt, f1 * bb + f2, q
    tl.store(s_out_ptr + (b * 3 + 0) * CH + oc, aa, mask=m)
    tl.store(s_out_ptr + (b * 3 + 1) * CH + oc, bb, mask=m)
    tl.store(s_out_ptr + (b * 3 + 2) * CH + oc, pp, mask=m)


@triton.jit
def _wkv4_bwd(w_ptr, u_ptr, k_ptr, v_ptr, saved_ptr, dy_ptr, ds_out_ptr, dw_ptr, du_ptr, dk_ptr, dv_ptr, ds0_ptr,
              scratch_ptr, T, n_chunks, CH: tl.constexpr, BC: tl.constexpr, C: tl.constexpr):
    b, ic = tl.program_id(0).to(tl.int64), tl.program_id(1)
    oc = ic * BC + tl.arange(0, BC)
    m = oc < CH
    # this program's scratch: (aa, bb, pp) before each step of the chunk being reversed, [C, 3, BC]
    scratch = scratch_ptr + (b * tl.num_programs(1) + ic) * C * 3 * BC + tl.arange(0, BC)
    w = tl.load(w_ptr + oc, mask=m, other=0.0)
    u = tl.load(u_ptr + oc, mask=m, other=0.0)
    daa = tl.load(ds_out_ptr + (b * 3 + 0) * CH + oc, mask=m, other=0.0)  # gradients of the state after step t
    dbb = tl.load(ds_out_ptr + (b * 3 + 1) * CH + oc, mask=m, other=0.0)
    dpp = tl.load(ds_out_ptr + (b * 3 + 2) * CH + oc, mask=m, other=0.0)
    dw = tl.zeros([BC], dtype=tl.float32)
    du = tl.zeros([BC], dtype=tl.float32)
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        start = c * C
        end = min(start + C, T)
        base = saved_ptr + ((b * n_chunks + c) * 3) * CH + oc
        aa = tl.load(base, mask=m, other=0.0)
        bb = tl.load(base + CH, mask=m, other=0.0)
        pp = tl.load(base + 2 * CH, mask=m, other=0.0)
        for t in range(start, end):  # recompute the chunk forward, keeping every state
            slot = scratch + (t - start) * 3 * BC
            tl.store(slot, aa)
            tl.store(slot + BC, bb)
            tl.store(slot + 2 * BC, pp)
            x = (b * T + t) * CH + oc
            kt = tl.load(k_ptr + x, mask=m, other=0.0)
            vt = tl.load(v_ptr + x, mask=m, other=0.0)
            ww = w + pp
            q = tl.maximum(ww, kt)
            f1, f2 = tl.exp(ww - q), tl.exp(kt - q)
            aa, bb, pp = f1 * aa + f2 * vt, f1 * bb + f2, q
        tl.debug_barrier()  # the scratch written above is read below by other threads of this program
        for j in range(end - start):  # and walk it backwards
            t = end - 1 - j
            slot = scratch + (t - start) * 3 * BC
            aa = tl.load(slot)
            bb = tl.load(slot + BC)
            pp = tl.load(slot + 2 * BC)
            x = (b * T + t) * CH + oc
            kt = tl.load(k_ptr + x, mask=m, other=0.0)
            vt = tl.load(v_ptr + x, mask=m, other=0.0)
            dy = tl.load(dy_ptr + x, mask=m, other=0.0)
            # the update: aa' = f1 aa + f2 v, bb' = f1 bb + f2, pp' = q = max(w + pp, k)
            ww = w + pp
            q = tl.maximum(ww, kt)
            f1, f2 = tl.exp(ww - q), tl.exp(kt - q)
            df1 = (daa * aa + dbb * bb) * f1  # dL/d(exponent of f1)
            df2 = (daa * vt + dbb) * f2
            dq = dpp - df1 - df2
            dq_ww = _max_grad_to_first(ww, kt, dq)
            dww = df1 + dq_ww
            dk = df2 + dq - dq_ww
            dv = f2 * daa
            dw += dww
            daa, dbb, dpp = f1 * daa, f1 * dbb, dww
            # the output: y = num / den, num = e1 aa + e2 v, den = e1 bb + e2, p = max(pp, u + k)
            wu = u + kt
            p = tl.maximum(pp, wu)
            e1, e2 = tl.exp(pp - p), tl.exp(wu - p)
            den = e1 * bb + e2
            dnum = dy / den
            dden = -dnum * (e1 * aa + e2 * vt) / den
            de1 = (dnum * aa + dden * bb) * e1
            de2 = (dnum * vt + dden) * e2
            dp = -de1 - de2
            dp_pp = _max_grad_to_first(pp, wu, dp)
            dwu = de2 + dp - dp_pp
            daa += dnum * e1
            dbb += dden * e1
            dpp += de1 + dp_pp
            dv += dnum * e2
            dk += dwu
            du += dwu
            tl.store(dk_ptr + x, dk, mask=m)
            tl.store(dv_ptr + x, dv, mask=m)
        tl.debug_barrier()  # all reads of this chunk's scratch are done before the next chunk overwrites it
    tl.store(ds0_ptr + (b * 3 + 0) * CH + oc, daa, mask=m)
    tl.store(ds0_ptr + (b * 3 + 1) * CH + oc, dbb, mask=m)
    tl.store(ds0_ptr + (b * 3 + 2) * CH + oc, dpp, mask=m)
    tl.store(dw_ptr + b * CH + oc, dw, mask=m)  # per batch row, summed on the Python side
    tl.store(du_ptr + b * CH + oc, du, mask=m)


def _channel_block(channels: int) -> int:
    """Channels per program: 128 (with 4 warps, one channel per thread), fewer for a small model."""
    return min(triton.next_power_of_2(channels), 128)


class _WKV4(torch.autograd.Function):
    """Inputs are contiguous float32; the wrapper below sees to that."""

    @staticmethod
    def forward(ctx, w, u, k, v, state, chunk_len, save):
        B, T, CH = k.shape
        BC = _channel_block(CH)
        n_chunks = triton.cdiv(T, chunk_len)
        y = torch.empty_like(k)
        s_out = torch.empty_like(state)
        saved = state.new_empty((B, n_chunks, 3, CH) if save else (1,))
        _wkv4_fwd[(B, triton.cdiv(CH, BC))](w, u, k, v, state, y, s_out, saved, T, n_chunks, CH=CH, BC=BC,
                                            C=chunk_len, SAVE=save)
        if save:
            ctx.save_for_backward(w, u, k, v, saved)
            ctx.chunk_len = chunk_len
        return y, s_out

    @staticmethod
    def backward(ctx, dy, ds_out):
        w, u, k, v, saved = ctx.saved_tensors
        B, T, CH = k.shape
        C = ctx.chunk_len
        BC = _channel_block(CH)
        n_c = triton.cdiv(CH, BC)
        dw, du = k.new_empty(B, CH), k.new_empty(B, CH)
        dk, dv, ds0 = torch.empty_like(k), torch.empty_like(v), torch.empty_like(ds_out)
        scratch = k.new_empty(B * n_c * C * 3 * BC)
        _wkv4_bwd[(B, n_c)](w, u, k, v, saved, f32(dy), f32(ds_out), dw, du, dk, dv, ds0, scratch, T,
                            saved.shape[1], CH=CH, BC=BC, C=C)
        return dw.sum(0), du.sum(0), dk, dv, ds0, None, None


def wkv4_triton(w, u, k, v, state, *, chunk_len: int):
    """`wkv4_recurrent`'s contract on a Triton kernel. Shapes: w, u [C]; k, v [B, T, C]; state [B, 3, C].
    Computes in float32; returns y [B, T, C] in k's dtype and the state [B, 3, C] in state's dtype. When a
    gradient is wanted the forward keeps T / chunk_len states; the backward recomputes the rest from them.
    The default chunk_len is set in aviary.ops.triton."""
    check_inputs("wkv4", _wkv4_fwd, chunk_len, w=w, u=u, k=k, v=v, state=state)
    check_rank("wkv4", k=(k, 3))
    B, T, CH = k.shape
    check_shapes("wkv4", w=(w, (CH,)), u=(u, (CH,)), v=(v, (B, T, CH)), state=(state, (B, 3, CH)))
    inputs = tuple(f32(x) for x in (w, u, k, v, state))
    y, s = _WKV4.apply(*inputs, chunk_len, wants_grad(inputs))
    return y.to(k.dtype), s.to(state.dtype)
