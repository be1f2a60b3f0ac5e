"""Decode-time matrix products: Aviary's C kernels (`_kernels.c`) behind a drop-in `nn.Linear`.

A decode step multiplies one row of activations (or the batch's few rows) by every weight matrix of
the model, so its speed is how fast the weights stream from memory. torch's CPU kernels leave a lot of
that on the table for one row: per 73 products of an RWKV-7 L12-D768 step, measured back to back,
interleaved, 2 threads (docs/benchmarks.md):

    weights   rows   Aviary's kernel   best torch kernel (oneDNN packed / _weight_int8pack_mm)
    float32    1        23.7 ms            29.2 ms
    bfloat16   1        13.7 ms            22.2 ms
    int8       1         8.3 ms            14.3 ms
    float32   16        50.3 ms            58.8 ms

`Linear` is an `nn.Linear` (same parameter, same state dict, same autograd) whose forward takes the C
kernel when it can (CPU, float32 or bfloat16 weight, at most `MAX_ROWS[dtype]` rows, no gradient
needed) and `F.linear`, the reference, otherwise. bfloat16 stops at 2 rows: past that torch's bf16
matmul (which uses the CPU's bf16 dot-product instructions) wins. int8 weights reach the same kernel
from `aviary.quant.Int8Linear` (up to its KERNEL_MAX_ROWS rows).

`reference_only()` turns the kernels off, for tests and benchmarks that compare.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary._threads import all_threads

try:  # built by setup.py; optional (no compiler, or not x86): everything falls back to torch
    from aviary import _kernels
except ImportError:  # pragma: no cover - depends on the build
    _kernels = None

__all__ = ["Linear", "available", "linear", "reference_only"]

_WTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
MAX_ROWS = {torch.float32: 16, torch.bfloat16: 2}  # beyond: torch's matmul (faster there)
PARALLEL_MIN_BYTES = 4 << 20  # weight bytes x rows below which one thread is faster (waking a worker ~50 us)
_local = threading.local()


def available(dtype: torch.dtype) -> bool:
    """Whether this install has a fast kernel for `dtype` weights on this CPU (and it is not switched off)."""
    if _kernels is None or getattr(_local, "off", False) or dtype not in _WTYPE:
        return False
    if dtype == torch.int8:
        return _kernels.ISA in ("avx512", "avx2")
    return _kernels.ISA == "avx512"


@contextmanager
def reference_only():
    """Inside: every product takes the reference path (F.linear / dequantise), in this thread."""
    before = getattr(_local, "off", False)
    _local.off = True
    try:
        yield
    finally:
        _local.off = before


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] -> x W^T [M, out] in x's dtype (times `scale` [out] per output, for int8 W), by the C kernel.

    weight: contiguous [out, in] float32, bfloat16 or int8 on the CPU; scale: contiguous float32 [out]
    (required for int8, else None). Computes in float32. Check `available(weight.dtype)` first."""
    if _kernels is None:
        raise RuntimeError("aviary._kernels is not built (reinstall Aviary with a C compiler)")
    if weight.dtype not in _WTYPE:
        raise ValueError(f"linear: weights must be float32, bfloat16 or int8, got {weight.dtype}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear: shapes x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit")
    if (weight.dtype == torch.int8) != (scale is not None):
        raise ValueError("linear: int8 weights need a scale, float weights take none")
    if scale is not None and (scale.dtype != torch.float32 or scale.shape != (weight.shape[0],)
                              or not scale.is_contiguous() or scale.device.type != "cpu"):
        raise ValueError("linear: scale must be a contiguous float32 [out] CPU tensor")
    if x.device.type != "cpu" or weight.device.type != "cpu" or not weight.is_contiguous():
        raise ValueError("linear: x and a contiguous weight must be CPU tensors")
    return _run(x, weight, scale)


def _run(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """`linear` without the argument checks (for callers that have made them)."""
    x32 = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    M, (out, n_in) = x32.shape[0], weight.shape
    y = torch.empty(M, out, dtype=torch.float32)
    big = weight.numel() * weight.element_size() * M >= PARALLEL_MIN_BYTES
    _kernels.linear(weight.data_ptr(), 0 if scale is None else scale.data_ptr(), x32.data_ptr(), y.data_ptr(),
                    n_in, out, M, torch.get_num_threads() if big else 1, _WTYPE[weight.dtype])
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _plain(t: torch.Tensor) -> bool:
    """A tensor whose data_ptr() is its whole storage: not a subclass such as FSDP2's sharded DTensor."""
    return type(t) is torch.Tensor or (type(t) is nn.Parameter and type(t.data) is torch.Tensor)


class Linear(nn.Linear):
    """`nn.Linear` (bias-free in RWKV) that runs decode-sized inputs through Aviary's C kernel.

    Same parameters, state dict and gradients as `nn.Linear`: an input that needs a gradient, a GPU, a
    bias, or more than `MAX_ROWS[dtype]` rows takes `F.linear`. The product runs on all of torch's
    threads even inside a decode step's one-thread region (`aviary._threads`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.device.type == "cpu" and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                and self.bias is None and available(w.dtype) and _plain(w) and w.is_contiguous()):
            n_in = x.shape[-1]
            rows = x.numel() // n_in if n_in else 0
            if 0 < rows <= MAX_ROWS.get(w.dtype, 0):
                with all_threads():
                    return _run(x.reshape(rows, n_in), w, None).view(*x.shape[:-1], w.shape[0])
        with all_threads():
            return F.linear(x, w, self.bias)
