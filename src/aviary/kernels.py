"""Aviary's C decode kernels (`_kernels.c`): matrix products behind a drop-in `nn.Linear`, and WKV steps.

A decode step multiplies one row of activations (or the batch's few rows) by every weight matrix of
the model, so its speed is how fast the weights stream from memory. torch's CPU kernels leave a lot of
that on the table for one row: per 73 products of an RWKV-7 L12-D768 step, measured back to back,
interleaved, 2 threads (docs/benchmarks.md):

    weights   rows   Aviary's kernel   best torch kernel (oneDNN packed / _weight_int8pack_mm)
    float32    1        23.7 ms            29.2 ms
    bfloat16   1        13.7 ms            22.2 ms
    int8       1         8.3 ms            14.3 ms
    float32   16        50.3 ms            58.8 ms     (35.5 ms since the blocked batch kernel; F.linear 95 ms)

`Linear` is an `nn.Linear` (same parameter, same state dict, same autograd) whose forward takes the C
kernel when it can (CPU, float32 or bfloat16 weight, at most `MAX_ROWS[dtype]` rows, no gradient
needed) and `F.linear`, the reference, otherwise. On a CPU with AVX512_BF16 the bfloat16 kernel uses
the bf16 dot-product instruction (x rounded to bf16 first, as in torch's bf16 matmul) and runs up to 16
rows; without it, it widens the weights to float32 and stops at 2 rows, past which torch's bf16 matmul
wins. int8 weights reach the same kernel from `aviary.quant.Int8Linear` (up to `MAX_ROWS[torch.int8]` rows).

`matmul` does the same for the small LoRA matrices, which are stored [in, out]. `gla_step` and
`delta_rule_step` are the one-token WKV updates of RWKV-5/6 and RWKV-7 with the state read and written
once; `aviary.ops` sends float32 decode steps to them and keeps its torch steps as the reference.
`rwkv7_tail` is RWKV-7's whole one-token time-mix between its products and its output projection (~40
torch ops per layer) in one call. `rwkv4_blocks` ... `rwkv7_blocks` go further: every block of a
one-token step (LayerNorms, both mixers, all products; ~30-100 torch ops per layer otherwise) in one
call. `aviary.model.v4` ... `v7` keep the torch forms as the reference.

Inside a decode step (`aviary._threads.small_ops_on_one_thread`) the products and steps run on the
module's own worker threads, which stay awake for a fraction of a millisecond after each call, so the
~75 products of a step do not each pay to wake a sleeping OpenMP thread (see the "threads" section of
`_kernels.c`). Elsewhere they run on the calling thread only (`_threads.kernel_threads`).

`reference_only()` turns the kernels off, for tests and benchmarks that compare.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary._threads import all_threads, kernel_threads

try:  # built by setup.py; optional (no compiler): everything falls back to torch
    from aviary import _kernels
    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the build
    _kernels, _IMPORT_ERROR = None, e

__all__ = ["BlockLayer", "ISAS", "Linear", "available", "bf16_rounds_x", "block_layer", "block_layers",
           "build_error", "cpu_isa", "delta_rule_step", "gla_step", "kernel_weight", "linear", "matmul",
           "product_weights", "reference_only", "runnable_isas", "rwkv4_blocks", "rwkv5_blocks", "rwkv6_blocks",
           "rwkv7_blocks", "rwkv7_tail", "steps_available", "use_isa"]

_WTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
# The instruction sets, fastest first. "torch" is no C kernels at all: every product is torch's.
ISAS = ("avx512", "avx2", "generic", "torch")
ENV_VAR = "AVIARY_CPU_ISA"
# rows up to which the C kernel beats torch's matmul, per instruction set (docs/benchmarks.md, Inference item
# 9; products of an RWKV-7 L12-D768 step against F.linear on AVX-512: float32 2.3x at 24 rows, 1.66x at 64,
# 1.30x at 128; bf16 with the dot-product kernel 1.28x at 32, 0.95x at 64, and without it (widening to
# float32) slower than torch's AVX512_BF16 matmul past 2 rows; int8 whole steps 0.32-0.41x at 32-64 rows
# against dequantise-and-matmul). int8 reaches it through aviary.quant.Int8Linear. Where the CPU has no
# AVX-512, torch's bf16 and int8 products have no fast instructions either, and the widening kernels keep 16.
_MAX_ROWS = {
    "avx512": {torch.float32: 64, torch.bfloat16: 2, torch.int8: 64},
    "avx512+bf16": {torch.float32: 64, torch.bfloat16: 32, torch.int8: 64},
    "avx2": {torch.float32: 64, torch.bfloat16: 16, torch.int8: 16},
    "generic": {torch.float32: 64, torch.bfloat16: 16, torch.int8: 16},
}
MAX_ROWS: dict = {}  # for the instruction set in use (updated in place by use_isa)
# `matmul` (the small [in, out] LoRA weights): above 8 rows torch's bfloat16 product is faster
MATMUL_MAX_ROWS = {torch.float32: 16, torch.bfloat16: 8}
PARALLEL_MIN_BYTES = 1 << 20  # weight bytes x rows below which one thread is used (docs/benchmarks.md, item 6)
_local = threading.local()
_BUILT: frozenset = frozenset()  # weight dtypes with a kernel in the instruction set in use
_BF16_DOT = False


def runnable_isas() -> tuple[str, ...]:
    """The instruction sets this build and CPU can run, fastest first, ending with "torch" (no C kernels)."""
    return (*(_kernels.RUNNABLE if _kernels is not None else ()), "torch")


def cpu_isa() -> str:
    """The instruction set Aviary's CPU kernels use now: "avx512", "avx2", "generic" or "torch" (none)."""
    return _kernels.isa()[0] if _BUILT else "torch"


def use_isa(name: str | None = None) -> str:
    """Run Aviary's CPU kernels with `name`'s code from now on, in the whole process; returns the previous
    name. None: the best the CPU runs. "torch" turns the C kernels off (every product is torch's).

    The same choice as the environment variable AVIARY_CPU_ISA, which is read once, at import. A name
    this CPU or build cannot run is a ValueError that lists the ones it can."""
    global _BUILT, _BF16_DOT
    runnable = runnable_isas()
    name = runnable[0] if name is None else name
    if name not in ISAS:
        raise ValueError(f"unknown CPU instruction set {name!r}; choose one of {', '.join(ISAS)}")
    if name not in runnable:
        raise ValueError(f"this {'CPU' if _kernels is not None else 'install'} cannot run the {name!r} kernels"
                         f"{'' if _kernels is not None else ' (aviary._kernels is not built: ' + build_error() + ')'}"
                         f"; it runs: {', '.join(runnable)}")
    before = cpu_isa()
    if name == "torch":
        _BUILT, _BF16_DOT = frozenset(), False
        MAX_ROWS.clear()
        MAX_ROWS.update({dt: 0 for dt in _WTYPE})
        return before
    _kernels.use_isa(name)
    _BF16_DOT = bool(_kernels.isa()[1])
    _BUILT = frozenset(_WTYPE)
    MAX_ROWS.clear()
    MAX_ROWS.update(_MAX_ROWS[name + ("+bf16" if _BF16_DOT else "")])
    return before


def build_error() -> str:
    """Why aviary._kernels is missing (the import error, and the build's own record where there is one),
    or "" when it is there."""
    if _kernels is not None:
        return ""
    from pathlib import Path
    note = Path(__file__).with_name("_kernels.build-error.txt")
    return f"{_IMPORT_ERROR}" + (f"\n{note.read_text()}" if note.is_file() else
                                  "\n(no build record: reinstall with `pip install -v .` to see the compiler's output)")


def _choose_at_import() -> None:
    import os
    import warnings
    wanted = os.environ.get(ENV_VAR, "").strip().lower() or None
    try:
        use_isa(wanted)
    except ValueError as e:
        if wanted not in ISAS:  # a typo: say so at once
            raise ValueError(f"{ENV_VAR}={wanted!r}: {e}") from None
        warnings.warn(f"{ENV_VAR}={wanted!r}: {e}; using {runnable_isas()[0]!r}", RuntimeWarning, stacklevel=2)
        use_isa(None)


_choose_at_import()


def bf16_rounds_x() -> bool:
    """Whether this CPU's bfloat16 products use its bf16 dot-product instruction (AVX512_BF16), which
    rounds x to bfloat16 first, as torch's bf16 matmul does; without it x stays float32."""
    return _BF16_DOT


def available(dtype: torch.dtype) -> bool:
    """Whether this install has a fast kernel for `dtype` weights on this CPU (and it is not switched off)."""
    return dtype in _BUILT and not getattr(_local, "off", False)


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
    if not _BUILT:
        raise RuntimeError("Aviary's C kernels are off (the 'torch' instruction set)" if _kernels is not None
                           else f"aviary._kernels is not built: {build_error()}")
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
                    n_in, out, M, kernel_threads() if big else 1, _WTYPE[weight.dtype], input_major, batch)
    return y if x.dtype == torch.float32 or float_out else y.to(x.dtype)


def _decode_sized(x: torch.Tensor, w: torch.Tensor, rows: int, max_rows: dict = MAX_ROWS) -> bool:
    """Whether x times w can take the C kernel: CPU, no gradient wanted, plain contiguous float weights
    this CPU has a kernel for, and at most max_rows[dtype] rows."""
    return (0 < rows <= max_rows.get(w.dtype, 0) and x.is_cpu and w.dtype in _BUILT
            and not getattr(_local, "off", False)
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
    with all_threads():
        return x @ w


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
        with all_threads():
            return F.linear(x, w, self.bias)

    def kernel_weight(self) -> tuple[torch.Tensor, None] | None:
        """(weight, None) when the C kernels can run this product (see `kernel_weight`), else None."""
        w = self._parameters["weight"]  # not getattr: runs every decode step
        ok = w.dtype in _BUILT and self._parameters["bias"] is None and w.is_cpu and _plain(w) and w.is_contiguous()
        return (w, None) if ok else None


# ---- one-token WKV steps ----------------------------------------------------------------------------

STEP_MAX_HEAD = 1024  # the C step keeps one [V] row on the stack
PARALLEL_STEP_NUMEL = 1 << 16  # state numbers below which one thread is faster (one L12-D768 layer: 49,152)


def steps_available(state: torch.Tensor, *xs: torch.Tensor) -> bool:
    """Whether the C WKV step can run this one-token update: float32 CPU tensors that need no gradient."""
    if not _BUILT or getattr(_local, "off", False) or state.shape[-1] > STEP_MAX_HEAD:
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


# ---- whole one-token blocks (RWKV-4 to 7) ----------------------------------------------------------------

def kernel_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], int8 row scale or None) when `module`'s product can run in the C kernels (a
    bias-free `Linear` with a weight type this CPU has a kernel for, or an `aviary.quant.Int8Linear`
    set to Aviary's kernel); None for anything else (a plain nn.Linear, a bias, a GPU...)."""
    get = getattr(module, "kernel_weight", None)
    return None if get is None else get()


# rows up to which the C blocks run; measured faster than the torch blocks at 1, 16 and 32 rows in float32
# and bfloat16 (docs/benchmarks.md); beyond, torch's blocked matmuls are untested against them
BLOCK_MAX_ROWS = 32
# inside the C blocks torch runs no parallel region, so smaller jobs than PARALLEL_MIN_BYTES / _STEP_NUMEL
# are worth both threads (docs/benchmarks.md, item 7)
BLOCK_PARALLEL_MIN_BYTES = 1 << 16
BLOCK_PARALLEL_STEP_NUMEL = 1 << 14


class _BlockSpec(NamedTuple):
    """What one version's C block takes: its fields (`_kernels.BLOCK_FIELDS[version]`), the products in the
    order of its weight-type tuple, and, from the parameters, its four LoRA ranks and the LoRA
    matrices' sizes (None when they do not fit)."""

    fields: tuple
    products: tuple
    ranks: object  # (params, C) -> ((r0, r1, r2, r3), {name: numel}) or None
    v_first: bool  # whether the blocks thread RWKV-7's v_first (the last field)
    state: object = lambda C, H: (H, C // H, C // H)  # (C, n_head) -> the shape of one row of wkv state


def _v7_ranks(p: dict, C: int):
    ranks = tuple(p[n].shape[1] if p[n].dim() == 2 else 0 for n in ("w1", "a1", "v1", "g1"))
    if min(ranks) <= 0:
        return None
    return ranks, {f"{n}{i}": C * r for n, r in zip("wavg", ranks, strict=True) for i in (1, 2)}


def _v6_ranks(p: dict, C: int):
    w1, d1 = p["maa_w1"], p["decay_w1"]
    D5, Dd = (w1.shape[1] if w1.dim() == 2 else 0), (d1.shape[1] if d1.dim() == 2 else 0)
    if D5 <= 0 or D5 % 5 or Dd <= 0:
        return None
    return (D5 // 5, Dd, 0, 0), {"maa_w1": C * D5, "maa_w2": D5 * C, "decay_w1": C * Dd, "decay_w2": Dd * C}


def _no_loras(p: dict, C: int):
    return (0, 0, 0, 0), {}


_V56_PRODUCTS = ("receptance", "key", "value", "gate", "output", "ffn_key", "ffn_receptance", "ffn_value")
_SPECS = {} if _kernels is None else {
    7: _BlockSpec(_kernels.BLOCK_FIELDS[7], ("receptance", "key", "value", "output", "ffn_key", "ffn_value"),
                  _v7_ranks, True),
    6: _BlockSpec(_kernels.BLOCK_FIELDS[6], _V56_PRODUCTS, _v6_ranks, False),
    5: _BlockSpec(_kernels.BLOCK_FIELDS[5], _V56_PRODUCTS, _no_loras, False),
    4: _BlockSpec(_kernels.BLOCK_FIELDS[4], ("receptance", "key", "value", "output", "ffn_key", "ffn_receptance",
                                             "ffn_value"), _no_loras, False, lambda C, H: (3, C)),
}


def _flat(t: torch.Tensor | None, numel: int, dtype: torch.dtype = torch.float32) -> bool:
    return (t is not None and t.dtype == dtype and t.device.type == "cpu" and _plain(t) and t.is_contiguous()
            and t.numel() == numel)


def _block_plan(params: dict, spec: _BlockSpec) -> tuple | None:
    """What the C block needs from a block's parameters, checked: ((C, F, LoRA ranks, product weight types,
    LoRA weight type), their pointers, float32 copies to keep alive), or None where it cannot run."""
    C, fk, dtype = params["ln1_w"].numel(), params["ffn_key"], params["ln1_w"].dtype
    F_ = fk.shape[0] if fk.dim() == 2 else 0
    lora = spec.ranks(params, C)
    if dtype not in (torch.float32, torch.bfloat16) or dtype not in _BUILT or lora is None or F_ <= 0:
        return None
    ranks, loras = lora
    shapes = {"ffn_key": (F_, C), "ffn_value": (C, F_)}
    wtypes = []
    for name in spec.products:
        w, scale, shape = params[name], params[name + "_scale"], shapes.get(name, (C, C))
        if w.dtype not in _BUILT or w.shape != shape or not w.is_contiguous() or not _plain(w) \
                or w.device.type != "cpu" or (scale is None) != (w.dtype != torch.int8) \
                or (scale is not None and not _flat(scale, shape[0])):
            return None
        wtypes.append(_WTYPE[w.dtype])
    ptrs, keep = [], []
    for name, t in params.items():
        if name in spec.products or name.endswith("_scale"):
            ptrs.append(0 if t is None else t.data_ptr())
        elif name in loras:  # read as they are, float32 or bfloat16
            if not _flat(t, loras[name], dtype):
                return None
            ptrs.append(t.data_ptr())
        else:  # vectors of C numbers, read as float32
            if not _flat(t, C, dtype):
                return None
            t = t if dtype == torch.float32 else t.float()
            keep.append(t)
            ptrs.append(t.data_ptr())
    return (C, F_, ranks, (*wtypes, _WTYPE[dtype])), tuple(ptrs), keep


def _row_stride(t: torch.Tensor, shape: tuple, inner: tuple) -> int | None:
    """t's stride from one batch row to the next when t is a float32 CPU tensor of `shape` whose rows are
    each contiguous (`inner`: their contiguous strides), as in a slice of a batch- or layer-major state."""
    if t.shape != shape or t.dtype != torch.float32 or t.device.type != "cpu" or not _plain(t):
        return None
    stride = t.stride()
    return stride[0] if stride[1:] == inner else None


class BlockLayer(NamedTuple):
    """One block for `rwkv6_blocks` / `rwkv7_blocks`: its tensors (`params`, in the order of the version's
    `_kernels.V*_BLOCK_FIELDS` up to x_in: the parameters as the module holds them, all float32 or all
    bfloat16, and each big product's (weight, int8 scale or None) from `kernel_weight`), a dict the caller
    keeps per block (`cache`), its head count and LayerNorm eps (ln1, ln2, ln_x), whether it is layer 0
    (RWKV-7: it writes v_first, and v0, v1, v2 are unused), and this step's state slices: shift [B, 2, C]
    and wkv [B, H, N, N] in, and where the new ones go (float32; strided over the batch or not; an out
    may be its in)."""

    params: list
    cache: dict
    n_head: int
    eps: tuple
    layer0: bool
    shift: torch.Tensor
    wkv: torch.Tensor
    shift_out: torch.Tensor
    wkv_out: torch.Tensor


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


def block_layer(block: nn.Module, params: list, n_head: int, eps: tuple, layer0: bool, shift, wkv, shift_out,
                wkv_out) -> BlockLayer:
    """A `BlockLayer` for `block`, with the plan cache kept on the block."""
    return BlockLayer(params, block.__dict__.setdefault("_decode_cache", {}), n_head, eps, layer0, shift, wkv,
                      shift_out, wkv_out)


def block_layers(blocks, layer, shift, wkv, shift_out, wkv_out) -> list[BlockLayer] | None:
    """`layer(block, shift[:, i], wkv[:, i], shift_out[:, i], wkv_out[:, i])` for every block i (the state
    tensors [B, L, ...]), or None if one of them cannot run in C."""
    layers = [layer(block, shift[:, i], wkv[:, i], shift_out[:, i], wkv_out[:, i]) for i, block in enumerate(blocks)]
    return None if None in layers else layers


def _plan(params: list, cache: dict, spec: _BlockSpec):
    """_block_plan, remembered in `cache` under the parameters' addresses, dtypes and version counters
    (so an in-place update, as load_state_dict makes, is seen)."""
    key = tuple((0, None, 0) if t is None else (t.data_ptr(), t.dtype, t._version) for t in params)
    plan = cache.get(key, False)
    if plan is False:
        cache.clear()
        plan = cache[key] = _block_plan(dict(zip(spec.fields, params, strict=False)), spec)  # params: up to x_in
    return plan


def _blocks(version: int, layers: list[BlockLayer], x: torch.Tensor, v_first: torch.Tensor | None,
            constant: float) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    spec = _SPECS.get(version)
    if spec is None or not _BUILT or getattr(_local, "off", False) or torch.is_grad_enabled() or not layers:
        return None
    B, C, dtype = x.shape[0], x.shape[-1], x.dtype
    uses_v_first = spec.v_first
    if B > BLOCK_MAX_ROWS or x.shape != (B, 1, C) or not (x.is_cpu and _plain(x)) \
            or (uses_v_first and (v_first is None) != layers[0].layer0) \
            or not (v_first is None or (v_first.shape == x.shape and v_first.is_cpu and _plain(v_first))):
        return None
    xs = torch.empty(len(layers) + 1, B, 1, C)  # each layer's input; the last: the output
    vf = None if not uses_v_first else torch.empty(B, 1, C) if v_first is None else v_first.float().contiguous()
    step = B * C * 4
    items, plans = [], []  # plans: holds each plan's float32 copies until the call is done
    for i, layer in enumerate(layers):
        plan = _plan(layer.params, layer.cache, spec)
        if plan is None or plan[0][0] != C or layer.params[0].dtype != dtype:
            return None
        plans.append(plan)
        (_, F_, ranks, wtypes), ptrs, _ = plan
        H = layer.n_head
        if C % H or C // H > STEP_MAX_HEAD:
            return None
        row = spec.state(C, H)
        inner = tuple(math.prod(row[j + 1:]) for j in range(len(row)))  # the row's contiguous strides
        strides = (_row_stride(layer.shift, (B, 2, C), (C, 1)), _row_stride(layer.shift_out, (B, 2, C), (C, 1)),
                   _row_stride(layer.wkv, (B, *row), inner), _row_stride(layer.wkv_out, (B, *row), inner))
        if None in strides:
            return None
        here = (xs.data_ptr() + i * step, xs.data_ptr() + (i + 1) * step, layer.shift.data_ptr(),
                layer.shift_out.data_ptr(), layer.wkv.data_ptr(), layer.wkv_out.data_ptr())
        if uses_v_first:
            here += (vf.data_ptr(),)
        items.append((ptrs + here, (B, C, H, F_, *ranks), wtypes, strides, (*layer.eps, constant), layer.layer0))
    xs[0].copy_(x)
    _kernels.blocks(version, tuple(items), kernel_threads(), BLOCK_PARALLEL_MIN_BYTES, BLOCK_PARALLEL_STEP_NUMEL)
    x_out = xs[-1]
    if dtype != torch.float32:  # back to the model's dtype; a v_first that came in is returned as it came
        x_out = x_out.to(dtype)
        vf = v_first if v_first is not None or vf is None else vf.to(dtype)
    return x_out, vf


_FUSED_DOC = """

    The reference is `aviary.model.rwkv.Block` with the version's mixers, in torch. The C code computes
    the same formulas in float32, for a bfloat16 model too (its products round their inputs to bf16 where
    the CPU multiplies in bf16, as torch does, and the last block's output is rounded to bf16; torch's
    bf16 path rounds after every op). x [B, 1, C]. Each layer's new shift and wkv are written into its
    outs. Returns None, having done nothing, when something does not fit: a weight type or device
    without a kernel, gradients, sizes, dtypes, more than BLOCK_MAX_ROWS rows.

    One call for all layers matters: a layer streams ~47 MB of weights (L12-D768 fp32), which evicts
    Python's own data from the caches, and ~30 us of Python between two C calls then took ~200 us."""


def rwkv7_blocks(layers: list[BlockLayer], x: torch.Tensor, v_first: torch.Tensor | None, *,
                 decay_scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """RWKV-7's one-token blocks (LN1, time-mix, LN2, channel-mix), one after another, in one C call.
    v_first [B, 1, C], or None when the first layer is layer 0; returns (x after the last block, v_first)
    in x's dtype."""
    return _blocks(7, layers, x, v_first, decay_scale)


def rwkv6_blocks(layers: list[BlockLayer], x: torch.Tensor) -> torch.Tensor | None:
    """RWKV-6's one-token blocks (LN1, time-mix, LN2, channel-mix), one after another, in one C call;
    returns x after the last block in x's dtype."""
    done = _blocks(6, layers, x, None, 0.0)
    return None if done is None else done[0]


def rwkv4_blocks(layers: list[BlockLayer], x: torch.Tensor) -> torch.Tensor | None:
    """RWKV-4's one-token blocks (LN1, time-mix, LN2, channel-mix), one after another, in one C call;
    each layer's state rows are (aa, bb, pp) [B, 3, C] and its n_head is C. Returns x after the last block
    in x's dtype."""
    done = _blocks(4, layers, x, None, 0.0)
    return None if done is None else done[0]


def rwkv5_blocks(layers: list[BlockLayer], x: torch.Tensor) -> torch.Tensor | None:
    """RWKV-5's one-token blocks (LN1, time-mix, LN2, channel-mix), one after another, in one C call;
    returns x after the last block in x's dtype."""
    done = _blocks(5, layers, x, None, 0.0)
    return None if done is None else done[0]


rwkv7_blocks.__doc__ += _FUSED_DOC
rwkv6_blocks.__doc__ += _FUSED_DOC
rwkv5_blocks.__doc__ += _FUSED_DOC
rwkv4_blocks.__doc__ += _FUSED_DOC
