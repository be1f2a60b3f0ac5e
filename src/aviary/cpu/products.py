"""Matrix products of a decode step in C: `Linear` (a drop-in `nn.Linear`), `linear` and `matmul`.

A decode step multiplies one row of activations (or the batch's few rows) by every weight matrix of
the model, so its speed is how fast the weights stream from memory. torch's CPU kernels leave a lot of
that on the table for one row, and `F.linear` more than torch's best (pre-packed oneDNN,
`_weight_int8pack_mm`) for a batch: docs/benchmarks.md, Inference item 1 and "The machine's limits,
corrected".

`Linear` is an `nn.Linear` (same parameter, same state dict, same autograd) whose forward takes the C
kernel when it can (CPU, float32 or bfloat16 weight, at most `MAX_ROWS[dtype]` rows for the instruction
set in use, no gradient needed) and `F.linear`, the reference, otherwise. int8 weights reach the same
kernel from `aviary.quant.Int8Linear`. `matmul` does the same for the small LoRA matrices, stored
[in, out]. The products run on the kernels' own worker threads inside a decode step
(`aviary.cpu.threads`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary.cpu import isa
from aviary.cpu.isa import MAX_ROWS, WTYPE, _kernels, build_error
from aviary.cpu.threads import all_threads, kernel_threads

__all__ = ["Linear", "kernel_weight", "linear", "matmul", "product_weights"]

# `matmul` (the small [in, out] LoRA weights): above 8 rows torch's bfloat16 product is faster
MATMUL_MAX_ROWS = {torch.float32: 16, torch.bfloat16: 8}
PARALLEL_MIN_BYTES = 1 << 20  # weight bytes x rows below which one thread is used (docs/benchmarks.md, item 6)


def _torch_bf16_matmul_is_fast() -> bool:
    """Whether torch's CPU bfloat16 matmul has bf16 instructions under it (oneDNN on AVX-512). Without them
    (AVX2 CPUs, and ONEDNN_MAX_CPU_ISA=AVX2) a bf16 product is slower than widening the weight to float32
    first (docs/benchmarks.md, Design measurements item 6), so bf16 products past the C kernels' rows are
    widened to float32 there."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch without the check
        return True


TORCH_BF16_FAST = _torch_bf16_matmul_is_fast()


def _torch_product(x: torch.Tensor, w: torch.Tensor, op) -> torch.Tensor:
    """op(x, w) with torch (the reference path), on all threads. bfloat16 weights on a CPU whose torch has
    no bf16 matmul instructions are widened to float32 for the product, which is rounded back to x's dtype
    (bfloat16 x: also closer to the exact product; float32 x: a bf16 model's prefill in float32
    activations, RWKV._run)."""
    with all_threads():
        if w.dtype == torch.bfloat16 and x.dtype in (torch.bfloat16, torch.float32) and not TORCH_BF16_FAST \
                and w.is_cpu:
            return op(x.float(), w.float()).to(x.dtype)
        return op(x, w)


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] -> x W^T [M, out] in x's dtype (times `scale` [out] per output, for int8 W), by the C kernel.

    weight: contiguous [out, in] float32, bfloat16 or int8 on the CPU; scale: contiguous float32 [out]
    (required for int8, else None). Computes in float32. Check `available(weight.dtype)` first."""
    if not isa.BUILT:
        raise RuntimeError("Aviary's C kernels are off (the 'torch' instruction set)" if _kernels is not None
                           else f"aviary._kernels is not built: {build_error()}")
    if weight.dtype not in WTYPE:
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


def _run(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, input_major: bool = False,
         batch: int = 1, float_out: bool = False) -> torch.Tensor:
    """`linear` without the argument checks (for callers that have made them). x [batch * M, in]; weight
    [batch, out, in] ([batch, in, out] if input_major) -> [batch * M, out], in x's dtype, or float32 (the
    kernel's sums as they are) if float_out."""
    x32 = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    if input_major:
        n_in, out = weight.shape[-2:]
    else:
        out, n_in = weight.shape[-2:]
    rows = x32.shape[0]
    M = rows // batch
    y = x32.new_empty(rows, out)
    big = weight.nbytes * M >= PARALLEL_MIN_BYTES * batch
    _kernels.linear(weight.data_ptr(), 0 if scale is None else scale.data_ptr(), x32.data_ptr(), y.data_ptr(),
                    n_in, out, M, kernel_threads() if big else 1, WTYPE[weight.dtype], input_major, batch)
    return y if x.dtype == torch.float32 or float_out else y.to(x.dtype)


def _decode_sized(x: torch.Tensor, w: torch.Tensor, rows: int, max_rows: dict = MAX_ROWS) -> bool:
    """Whether x times w can take the C kernel: CPU, no gradient wanted, plain contiguous float weights
    this CPU has a kernel for, and at most max_rows[dtype] rows."""
    return (0 < rows <= max_rows.get(w.dtype, 0) and x.is_cpu and w.dtype in isa.BUILT
            and not isa.switched_off()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and _plain(w) and w.is_contiguous())


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`x @ w` for a weight stored [in, out] (RWKV's LoRA matrices), by the C kernel for decode-sized inputs.

    w [in, out] with x [..., in] -> [..., out]; or a stack w [F, in, out] with x [F, M, in] -> [F, M, out].
    Anything the kernel does not take (gradients, GPU, more than MATMUL_MAX_ROWS rows; see `Linear`) is
    `torch.matmul`."""
    n_in = w.shape[-2]
    if x.shape[-1] != n_in or w.dim() not in (2, 3) or (w.dim() == 3 and (x.dim() != 3 or x.shape[0] != w.shape[0])):
        return x @ w  # torch's error (or broadcasting) for anything else
    batch = w.shape[0] if w.dim() == 3 else 1
    rows = x.numel() // (n_in * batch) if n_in else 0
    if _decode_sized(x, w, rows, MATMUL_MAX_ROWS):
        y = _run(x.reshape(batch * rows, n_in), w, None, input_major=True, batch=batch)
        return y.view(*x.shape[:-1], w.shape[-1])
    return _torch_product(x, w, torch.matmul)


def _plain(t: torch.Tensor) -> bool:
    """A tensor whose data_ptr() is its whole storage: not a subclass such as FSDP2's sharded DTensor."""
    return type(t) is torch.Tensor or (type(t) is nn.Parameter and type(t.data) is torch.Tensor)


class Linear(nn.Linear):
    """`nn.Linear` (bias-free in RWKV) that runs decode-sized inputs through Aviary's C kernel.

    Same parameters, state dict and gradients as `nn.Linear`: an input that needs a gradient, a GPU, a
    bias, or more than `MAX_ROWS[dtype]` rows takes `F.linear`. The product runs on all of torch's
    threads even inside a decode step's one-thread region (`aviary._threads`).

    float_out=True lets the C kernel return its float32 sums instead of rounding them to x's dtype (the
    model's head asks for it: its logits are float32 anyway); `F.linear` still returns x's dtype."""

    def forward(self, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        w, n_in = self.weight, x.shape[-1]
        rows = x.numel() // n_in if n_in else 0
        if self.bias is None and _decode_sized(x, w, rows):
            return _run(x.reshape(rows, n_in), w, None, float_out=float_out).view(*x.shape[:-1], w.shape[0])
        if self.bias is not None:
            with all_threads():
                return F.linear(x, w, self.bias)
        return _torch_product(x, w, F.linear)

    def kernel_weight(self) -> tuple[torch.Tensor, None] | None:
        """(weight, None) when the C kernels can run this product (see `kernel_weight`), else None."""
        w = self._parameters["weight"]  # not getattr: runs every decode step
        ok = w.dtype in isa.BUILT and self._parameters["bias"] is None and w.is_cpu and _plain(w) and w.is_contiguous()
        return (w, None) if ok else None




def kernel_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], int8 row scale or None) when `module`'s product can run in the C kernels (a
    bias-free `Linear` with a weight type this CPU has a kernel for, or an `aviary.quant.Int8Linear`
    set to Aviary's kernel); None for anything else (a plain nn.Linear, a bias, a GPU...)."""
    get = getattr(module, "kernel_weight", None)
    return None if get is None else get()


def product_weights(modules) -> list | None:
    """[weight, scale, weight, scale, ...] from `kernel_weight` of each module in turn (the products' fields
    of a block), or None if one of them has no kernel."""
    out = []
    for module in modules:
        weight = kernel_weight(module)
        if weight is None:
            return None
        out += weight
    return out

