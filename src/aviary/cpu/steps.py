"""One-token WKV steps in C: the state update of a decode step with the state read once and written once
(the torch forms in aviary/ops read and write it several times, which dominates a batch-16 step).
`aviary.ops` sends float32 one-token steps here when `steps_available`; its torch steps stay the
reference. These run where the fused blocks (`aviary.cpu.blocks`) do not: more rows than BLOCK_MAX_ROWS,
a product without a kernel, a rescaled model.
"""

from __future__ import annotations

import torch

from aviary.cpu import isa
from aviary.cpu.isa import _kernels
from aviary.cpu.products import _plain
from aviary.cpu.threads import kernel_threads

__all__ = ["delta_rule_step", "gla_step", "rwkv7_tail", "steps_available"]


STEP_MAX_HEAD = 1024  # the C steps keep one [K] and one [V] row on the stack
PARALLEL_STEP_NUMEL = 1 << 16  # state numbers below which one thread is faster (one L12-D768 layer: 49,152)


def steps_available(state: torch.Tensor, *xs: torch.Tensor) -> bool:
    """Whether the C WKV step can run this one-token update: float32 CPU tensors that need no gradient."""
    if not isa.BUILT or isa.switched_off() or max(state.shape[-2:]) > STEP_MAX_HEAD:
        return False
    grad = torch.is_grad_enabled()
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and _plain(t) and not (grad and t.requires_grad)
               for t in (state, *xs))


def _rows(t: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """[B or 1, 1, H or 1, D] -> contiguous [B, H, D] (broadcast dimensions expanded)."""
    return t.expand(B, 1, H, t.shape[-1]).reshape(B, H, t.shape[-1]).contiguous()


def _state_out(S: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Where a C step writes the state after S: `out` when it is a contiguous float32 CPU tensor shaped like
    S (it may be S itself: each (batch, head) block is read before it is written), else a new tensor
    (`out` a strided slice of a batch-major state, say: the caller then copies)."""
    if out is None or out.shape != S.shape or out.dtype != torch.float32 or not out.is_contiguous() \
            or out.device.type != "cpu" or not _plain(out):
        return torch.empty_like(S)
    return out


def _step(kind: int, r, k, v, logw, ua, b, state, out):
    B, H, K, V = state.shape
    S = state.contiguous()
    S_out = _state_out(S, out)
    y = torch.empty(B, 1, H, V, dtype=torch.float32)
    r, k, v, logw = _rows(r, B, H), _rows(k, B, H), _rows(v, B, H), _rows(logw, B, H)
    ua = ua.contiguous() if kind == 0 else _rows(ua, B, H)
    b = _rows(b, B, H) if b is not None else r
    threads = kernel_threads() if S.numel() >= PARALLEL_STEP_NUMEL else 1
    _kernels.wkv_step(kind, r.data_ptr(), k.data_ptr(), v.data_ptr(), logw.data_ptr(), ua.data_ptr(), b.data_ptr(),
                      S.data_ptr(), S_out.data_ptr(), y.data_ptr(), B * H, H, K, V, threads)
    return y, S_out


def gla_step(r, k, v, logw, u, state, out=None):
    """`aviary.ops.gla.gla_step` (RWKV-5/6, one token) in C: r, k, logw [B, 1, H, K] (logw may broadcast
    over B), v [B, 1, H, V], u [H, K], state [B, H, K, V] -> (y [B, 1, H, V], new state). The new state
    is written into `out` and returned as it when `out` is a contiguous float32 CPU tensor shaped like
    state (it may be state itself); otherwise it is a new tensor. Check `steps_available` first."""
    return _step(0, r, k, v, logw, u, None, state, out)


def delta_rule_step(r, logw, k, v, a, b, state, out=None):
    """`aviary.ops.delta.delta_rule_step` (RWKV-7, one token) in C; same arguments and results."""
    return _step(1, r, k, v, logw, a, b, state, out)


def rwkv7_tail(r, k, v, w_lora, a_lora, v_lora, v_first, g, state, *, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b,
               eps: float, decay_scale: float, out=None):
    """RWKV-7's one-token time-mix from its products to its output projection, in one C call.

    The reference is `aviary.model.v7.TimeMix.forward` with T = 1 (the same formulas, in torch). Per-row
    inputs r, k, v, g, w_lora, a_lora, v_lora, v_first are [B, 1, C] (v_lora and v_first None on layer 0);
    the parameters are the module's (w0, a0, v0, k_k, k_a [C]; r_k [H, N]; ln_w, ln_b [C]); state
    [B, H, N, N]. Returns (y * g [B, 1, C], new state), the state written into `out` when it fits (as
    for `gla_step`). Check `steps_available` on every tensor first."""
    B, H, N, _ = state.shape
    C = H * N
    S = state.contiguous()
    out = _state_out(S, out)
    rows = [t.reshape(B, C).contiguous() for t in (r, k, v, w_lora, a_lora, g)]
    extra = [t.reshape(B, C).contiguous() for t in (v_lora, v_first)] if v_lora is not None else []
    params = [t.reshape(-1).contiguous() for t in (w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b)]
    y = torch.empty(B, 1, C, dtype=torch.float32)
    ptr = [t.data_ptr() for t in rows]
    lora_v, first = (extra[0].data_ptr(), extra[1].data_ptr()) if extra else (0, 0)
    threads = kernel_threads() if S.numel() >= PARALLEL_STEP_NUMEL else 1
    _kernels.v7_tail(*ptr[:5], lora_v, first, ptr[5], *(t.data_ptr() for t in params), S.data_ptr(), out.data_ptr(),
                     y.data_ptr(), B, H, N, eps, decay_scale, threads)
    return y, out


