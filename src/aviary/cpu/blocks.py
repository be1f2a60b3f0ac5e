"""Whole one-token blocks in C, for every version: one generic runner, and each version's record of
where the C code's fields live in its `Block`.

A decode step's block (LN1, time-mix, LN2, channel-mix: ~30-100 torch ops and 7-17 products a layer) runs
as one C function per version (src/aviary/csrc/blocks.c), all the model's blocks in one call: a layer
streams ~47 MB of weights (L12-D768 fp32), which evicts Python's own data from the caches, so Python run
between two C calls is several times slower (docs/benchmarks.md, Inference item 7).

The contract between a version and its C block is data. The C side names its pointer fields, in order
(`_kernels.BLOCK_FIELDS[version]`); the version's model file declares a `BlockRecord` (`CPU_BLOCK`) that
says where each field lives in a Block ("att.x_r", "ln1.weight"; products by module, their int8 scale
filling `<field>_scale`), its LoRA pairs, its head count and constants. `decode_blocks` gathers every
layer's pointers by the record, checks them once per set of tensors (cached per block, keyed by address,
dtype and version counter, so a swapped tensor or an in-place load_state_dict is seen) and runs the C
blocks. It returns None, having done nothing, where they cannot run: a weight type or device without a
kernel, gradients, sizes, more than BLOCK_MAX_ROWS rows, the "torch" instruction set. The caller then
runs each torch `Block`, which stays the reference (tests/cpu/kernels/test_blocks.py compares).

The C code computes in float32, for a bfloat16 model too: its products round their inputs to bf16 where
the CPU multiplies in bf16 (as torch does), and the last block's output is rounded to bf16 once (torch's
bf16 path rounds after every op).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache

import torch
import torch.nn as nn

from aviary.cpu import isa
from aviary.cpu.isa import WTYPE, _kernels
from aviary.cpu.products import _plain, kernel_weight
from aviary.cpu.steps import STEP_MAX_HEAD
from aviary.cpu.threads import kernel_threads

__all__ = ["BLOCK_MAX_ROWS", "BlockRecord", "decode_block", "decode_blocks"]

# rows up to which the C blocks run; measured faster than the torch blocks at 1, 16 and 32 rows in float32
# and bfloat16 (docs/benchmarks.md); beyond, torch's blocked matmuls are untested against them
BLOCK_MAX_ROWS = 32
# inside the C blocks torch runs no parallel region, so smaller jobs than products.PARALLEL_MIN_BYTES are
# worth both threads (docs/benchmarks.md, item 7)
BLOCK_PARALLEL_MIN_BYTES = 1 << 16
BLOCK_PARALLEL_STEP_NUMEL = 1 << 14


def _heads_state(C: int, H: int) -> tuple:
    return (H, C // H, C // H)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one record per version
class BlockRecord:
    """Where a version's C block finds its fields in a `Block` (aviary/model/rwkv.py).

    params: C field -> parameter path in the block ("att.x_r", "att.ln_x.weight");
    products: C field -> module path of a product ("att.key"); its int8 row scale (or 0) fills
        `<field>_scale`; the module must offer `kernel_weight()` (aviary.cpu.Linear, quant.Int8Linear);
    lora_pairs: (down field, up field, k): LoRA matrices [C, k*r] and [k*r, C] (or [k, r, C]), read in
        the model's dtype; r is one of the block's four ranks (RWKV-6's mix LoRA has k = 5 heads of rank r);
    heads: the field whose first dimension is the head count; None: one head per channel (RWKV-4);
    ln_x: path of the time-mix GroupNorm (its eps), or None;
    constant: the version's constant for the C block (RWKV-7: the decay scale);
    v_first: the blocks thread RWKV-7's value residual from layer 0;
    state_row: (C, H) -> the shape of one batch row of one layer's wkv state."""

    version: int
    params: Mapping[str, str]
    products: Mapping[str, str]
    lora_pairs: tuple[tuple[str, str, int], ...] = ()
    heads: str | None = None
    ln_x: str | None = None
    constant: float = 0.0
    v_first: bool = False
    state_row: Callable[[int, int], tuple] = field(default=_heads_state)

    def ranks(self, p: dict, C: int):
        """(the four LoRA ranks, {LoRA field: numel}) from the parameters by field, or None if they do not fit."""
        ranks, sizes = [], {}
        for down, up, k in self.lora_pairs:
            d = p[down]
            width = d.shape[1] if d.dim() == 2 else 0
            if width <= 0 or width % k or p[up].numel() != width * C:
                return None
            ranks.append(width // k)
            sizes[down] = sizes[up] = C * width
        return (*ranks, *([0] * (4 - len(ranks)))), sizes


_PARAM, _PRODUCT, _SCALE = 0, 1, 2


@cache
def _gather_plan(record: BlockRecord) -> tuple:
    """For each C field up to x_in, in order: (kind, module path parts, parameter name)."""
    plan = []
    for name in _kernels.BLOCK_FIELDS[record.version]:
        if name == "x_in":
            break
        if name in record.products:
            plan.append((_PRODUCT, tuple(record.products[name].split(".")), ""))
        elif name.endswith("_scale") and name[:-6] in record.products:
            plan.append((_SCALE, (), ""))  # filled with its product
        else:
            *mods, last = record.params[name].split(".")
            plan.append((_PARAM, tuple(mods), last))
    return tuple(plan)


@cache
def _heads_index(record: BlockRecord) -> int:
    """The position of `record.heads` among the gathered tensors (the C field order)."""
    return _kernels.BLOCK_FIELDS[record.version].index(record.heads)


def _gather(record: BlockRecord, block: nn.Module) -> list | None:
    """The block's tensors in the C field order up to x_in, or None if a product has no kernel. Reads
    module._modules / _parameters directly: this runs for every layer of every step."""
    out = []
    for kind, mods, name in _gather_plan(record):
        if kind == _SCALE:
            continue
        m = block
        for part in mods:
            m = m._modules[part]
        if kind == _PRODUCT:
            weight = kernel_weight(m)
            if weight is None:
                return None
            out += weight
        else:
            out.append(m._parameters[name])
    return out


def _flat_C(t: torch.Tensor | None, numel: int, dtype: torch.dtype = torch.float32) -> bool:
    return (t is not None and t.dtype == dtype and t.device.type == "cpu" and _plain(t) and t.is_contiguous()
            and t.numel() == numel)


def _block_plan(params: dict, record: BlockRecord) -> tuple | None:
    """What the C block needs from a block's parameters, checked: ((C, F, LoRA ranks, product weight types,
    LoRA weight type), their pointers, float32 copies to keep alive), or None where it cannot run."""
    C, fk, dtype = params["ln1_w"].numel(), params["ffn_key"], params["ln1_w"].dtype
    F_ = fk.shape[0] if fk.dim() == 2 else 0
    lora = record.ranks(params, C)
    if dtype not in (torch.float32, torch.bfloat16) or dtype not in isa.BUILT or lora is None or F_ <= 0:
        return None
    ranks, loras = lora
    shapes = {"ffn_key": (F_, C), "ffn_value": (C, F_)}
    wtypes = []
    for name in record.products:
        w, scale, shape = params[name], params[name + "_scale"], shapes.get(name, (C, C))
        if w.dtype not in isa.BUILT or w.shape != shape or not w.is_contiguous() or not _plain(w) \
                or w.device.type != "cpu" or (scale is None) != (w.dtype != torch.int8) \
                or (scale is not None and not _flat_C(scale, shape[0])):
            return None
        wtypes.append(WTYPE[w.dtype])
    ptrs, keep = [], []
    for name, t in params.items():
        if name in record.products or name.endswith("_scale"):
            ptrs.append(0 if t is None else t.data_ptr())
        elif name in loras:  # read as they are, float32 or bfloat16
            if not _flat_C(t, loras[name], dtype):
                return None
            ptrs.append(t.data_ptr())
        else:  # vectors of C numbers, read as float32
            if not _flat_C(t, C, dtype):
                return None
            t = t if dtype == torch.float32 else t.float()
            keep.append(t)
            ptrs.append(t.data_ptr())
    return (C, F_, ranks, (*wtypes, WTYPE[dtype])), tuple(ptrs), keep


def _row_stride(t: torch.Tensor, shape: tuple, inner: tuple) -> int | None:
    """t's stride from one batch row to the next when t is a float32 CPU tensor of `shape` whose rows are
    each contiguous (`inner`: their contiguous strides), as in a slice of a batch- or layer-major state."""
    if t.shape != shape or t.dtype != torch.float32 or t.device.type != "cpu" or not _plain(t):
        return None
    stride = t.stride()
    return stride[0] if stride[1:] == inner else None


def _plan(record: BlockRecord, params: list, cache: dict):
    """_block_plan, remembered in `cache` under the parameters' addresses, dtypes and version counters
    (so an in-place update, as load_state_dict makes, is seen)."""
    key = tuple((0, None, 0) if t is None else (t.data_ptr(), t.dtype, t._version) for t in params)
    plan = cache.get(key, False)
    if plan is False:
        cache.clear()
        plan = cache[key] = _block_plan(dict(zip(_kernels.BLOCK_FIELDS[record.version], params, strict=False)),
                                        record)
    return plan


def _path(block: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        block = block._modules[part]
    return block


def _run(record: BlockRecord, blocks, x: torch.Tensor, v_first: torch.Tensor | None, shift, wkv, shift_out,
         wkv_out) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """blocks[i] with state slices shift[i], wkv[i] (and outs) for one token, in one C call; (x, v_first)."""
    if not isa.BUILT or isa.switched_off() or torch.is_grad_enabled() or not blocks:
        return None
    B, C, dtype = x.shape[0], x.shape[-1], x.dtype
    layer0 = blocks[0]._modules["att"].layer_id == 0
    if B > BLOCK_MAX_ROWS or x.shape != (B, 1, C) or not (x.is_cpu and _plain(x)) \
            or (record.v_first and (v_first is None) != layer0) \
            or not (v_first is None or (v_first.shape == x.shape and v_first.is_cpu and _plain(v_first))):
        return None
    xs = torch.empty(len(blocks) + 1, B, 1, C)  # each layer's input; the last: the output
    vf = None if not record.v_first else torch.empty(B, 1, C) if v_first is None else v_first.float().contiguous()
    step = B * C * 4
    items, plans = [], []  # plans: holds each plan's float32 copies until the call is done
    for i, block in enumerate(blocks):
        params = _gather(record, block)
        if params is None:
            return None
        plan = _plan(record, params, block.__dict__.setdefault("_decode_cache", {}))
        if plan is None or plan[0][0] != C or params[0].dtype != dtype:
            return None
        plans.append(plan)
        (_, F_, ranks, wtypes), ptrs, _ = plan
        H = C if record.heads is None else params[_heads_index(record)].shape[0]
        if C % H or C // H > STEP_MAX_HEAD:
            return None
        row = record.state_row(C, H)
        inner = tuple(math.prod(row[j + 1:]) for j in range(len(row)))  # the row's contiguous strides
        strides = (_row_stride(shift[i], (B, 2, C), (C, 1)), _row_stride(shift_out[i], (B, 2, C), (C, 1)),
                   _row_stride(wkv[i], (B, *row), inner), _row_stride(wkv_out[i], (B, *row), inner))
        if None in strides:
            return None
        here = (xs.data_ptr() + i * step, xs.data_ptr() + (i + 1) * step, shift[i].data_ptr(),
                shift_out[i].data_ptr(), wkv[i].data_ptr(), wkv_out[i].data_ptr())
        if record.v_first:
            here += (vf.data_ptr(),)
        bm = block._modules
        eps = (bm["ln1"].eps, bm["ln2"].eps, _path(block, record.ln_x).eps if record.ln_x else 0.0, record.constant)
        items.append((ptrs + here, (B, C, H, F_, *ranks), wtypes, strides, eps,
                      bm["att"].layer_id == 0))
    xs[0].copy_(x)
    _kernels.blocks(record.version, tuple(items), kernel_threads(), BLOCK_PARALLEL_MIN_BYTES,
                    BLOCK_PARALLEL_STEP_NUMEL)
    x_out = xs[-1]
    if dtype != torch.float32:  # back to the model's dtype; a v_first that came in is returned as it came
        x_out = x_out.to(dtype)
        vf = v_first if v_first is not None or vf is None else vf.to(dtype)
    return x_out, vf


class _Layers:
    """Index i of a [B, L, ...] state tensor -> its layer-i slice [:, i]."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.t[:, i]


def decode_blocks(record: BlockRecord, blocks, x: torch.Tensor, shift, wkv, shift_out, wkv_out):
    """All of `blocks` (a model's, from layer 0) for one token in one C call: `Block.forward` with the
    version's mixers.

    x [B, 1, C]; shift [B, L, 2, C] and wkv [B, L, *row] the state's tensors; the new ones are written into
    shift_out and wkv_out (which may be shift and wkv). Returns x after the last block (x's dtype), or None,
    having done nothing, where the C blocks cannot take these blocks: the caller then runs each block."""
    done = _run(record, blocks, x, None, _Layers(shift), _Layers(wkv), _Layers(shift_out), _Layers(wkv_out))
    return None if done is None else done[0]


def decode_block(record: BlockRecord, block: nn.Module, x, shift, wkv, v_first, shift_out, wkv_out):
    """One block of `decode_blocks` (for tests): x [B, 1, C]; shift [B, 2, C]; wkv [B, *row]; v_first
    [B, 1, C] for RWKV-7 past layer 0, else None. Returns (x, v_first or None), or None where the C block
    cannot take it."""
    return _run(record, [block], x, v_first, [shift], [wkv], [shift_out], [wkv_out])


def why_not(record: BlockRecord, blocks) -> str | None:
    """Why `decode_blocks` would not run these blocks (on their current weights), or None if it would."""
    if not isa.BUILT:
        return "the 'torch' instruction set" if _kernels is not None else "aviary._kernels is not built"
    if not blocks or blocks[0]._modules["ln1"].weight.device.type != "cpu":
        return "the model is not on the CPU"
    for block in blocks:
        params = _gather(record, block)
        if params is None:
            return "a product has no C kernel (a plain nn.Linear, a bias, or int8 set to torch's kernel)"
        if _plan(record, params, block.__dict__.setdefault("_decode_cache", {})) is None:  # the decode's own cache
            return "parameters the C blocks do not take (dtype, layout or sizes)"
    return None
