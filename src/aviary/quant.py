"""int8 weight-only quantisation of the large matrices: per-output-channel symmetric int8.

For a Linear weight W [out, in], each output row o gets one scale and an int8 row:

    s_o = max_i |W_oi| / 127        q_oi = round(W_oi / s_o) in [-127, 127]        W ~ diag(s) q
    y = x W^T ~ (x q^T) * s         (the scale factors out of the dot product, so it is applied to y)

Applied to every `nn.Linear` of the time-mix and channel-mix (receptance, key, value, gate, output) and,
by default, to the head: 90-98 % of the bytes a decode step reads. The embedding (a row gather), the
LayerNorms, the small LoRA matrices (`time_maa_w1`, `w1`, ...) and all per-channel vectors stay in the
model's dtype; the recurrent state stays float32.

The pip package's int8 (`fp32i8`, reference doc 10.2) is asymmetric uint8 with a min and a range for
every row *and* every column; symmetric per-row int8 is simpler, needs one scale per row, and is what
CPU kernels implement. Its logit error against fp32 is measured in `benchmarks/bench_inference.py` and
reported in docs/benchmarks.md. Quantise after loading: a quantised model's state dict holds
`weight_int8` and `scale` tensors and is not an official checkpoint.

Three forms of the same product, as for the ops (`Int8Linear.kernel` picks; tests compare them):
    `int8_linear_reference`  dequantise the weight to the activation dtype, then F.linear; used for
                             more rows than the kernel takes (prefill), where a matmul wins
    `cpu.linear`             Aviary's C kernel (`aviary/csrc/`, AVX-512 / AVX2 / portable, own threads): int8
                             widened to float32 in registers, float32 activations, weights streamed
                             once at memory speed; the default for up to isa.MAX_ROWS[int8] rows
    `int8_linear_kernel`     torch's `aten._weight_int8pack_mm` (bf16 activations and scales, fp32
                             accumulation); the fallback where the C kernel was not built. It widens
                             every weight to bf16 and is compute-bound at one row, far below memory
                             speed (docs/benchmarks.md, Design measurements item 9).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary.cpu import can_split_threads, isa, products
from aviary.cpu.threads import all_threads

__all__ = ["Int8Linear", "int8_linear_kernel", "int8_linear_reference", "quantize", "quantize_int8"]

SCHEMES = ("int8",)
KERNEL_MAX_ROWS = 16  # torch's int8pack kernel's time grows with the rows; above this, dequantise and use a matmul
# Aviary's C kernel: up to isa.MAX_ROWS[torch.int8] rows (64 with AVX-512)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] (any float dtype) -> (q [out, in] int8, scale [out] float32), W ~ q * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0  # [out]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] -> x (q * scale)^T [..., out], in x's dtype."""
    return F.linear(x, q.to(x.dtype) * scale.to(x.dtype)[:, None])


def default_kernel() -> str | None:
    """The fastest int8 kernel here: Aviary's C kernel (`aviary.cpu`), else torch's int8pack, else None."""
    if isa.available(torch.int8):
        return "aviary"
    return "int8pack" if hasattr(torch.ops.aten, "_weight_int8pack_mm") else None


def int8_linear_kernel(x: torch.Tensor, q: torch.Tensor, scale_bf16: torch.Tensor) -> torch.Tensor:
    """x [M, in] -> [M, out] in x's dtype, through `aten._weight_int8pack_mm` in bfloat16.

    x is rounded to bfloat16 on the way in (its fp32 path is a slow generic loop); the kernel
    accumulates in fp32 and rounds the output to bfloat16."""
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scale_bf16.to(torch.bfloat16)).to(x.dtype)


class Int8Linear(nn.Module):
    """A bias-free Linear whose weight is stored as int8 rows and float32 row scales."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16).contiguous(), persistent=False)
        self.kernel = default_kernel()  # for decode-sized inputs; None: always the reference

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias; RWKV's linears have none")
        return cls(*quantize_int8(linear.weight))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight [out, in] float32 (for inspection; forward never builds it for decode)."""
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        """float_out: as in `aviary.cpu.Linear` (Aviary's kernel returns float32; the other paths x's dtype)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows, cpu = x2.shape[0], x2.device.type == "cpu"
        if cpu and self.kernel == "aviary" and rows <= isa.MAX_ROWS[torch.int8] and isa.available(torch.int8):
            y = products._run(x2, self.weight_int8, self.scale, float_out=float_out)  # contiguous CPU int8/fp32
        else:
            with all_threads():
                if cpu and rows <= KERNEL_MAX_ROWS and self.kernel == "int8pack":
                    y = int8_linear_kernel(x2, self.weight_int8, self.scale_bf16)
                else:
                    y = int8_linear_reference(x2, self.weight_int8, self.scale)
        return y.view(*lead, self.out_features)

    def kernel_weight(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(int8 weight, row scale) when Aviary's C kernel runs this product (`aviary.cpu.kernel_weight`)."""
        q, scale = self._buffers["weight_int8"], self._buffers["scale"]  # not getattr: runs every decode step
        return (q, scale) if self.kernel == "aviary" and isa.available(torch.int8) and q.is_cpu else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


def quantize(model: nn.Module, scheme: str = "int8", *, head: bool = True) -> nn.Module:
    """Replace the model's block linears (and the head, unless head=False) with `Int8Linear`, in place
    (`model.quantize(...)` calls this).

    Only `nn.Linear` modules inside `model.blocks` (and `model.head`) are touched; LoRA matrices are
    plain parameters and stay as they are. The model's decode thread split is decided again
    (`aviary.cpu.can_split_threads`). Returns the model."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation scheme {scheme!r}; choose one of {SCHEMES}")
    targets = [(parent, name, child) for parent in model.blocks.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    if head and isinstance(model.head, nn.Linear):
        targets.append((model, "head", model.head))
    if not targets:
        raise ValueError("nothing to quantise: the model has no float Linear layers left (already quantised?)")
    with torch.no_grad():
        for parent, name, child in targets:
            setattr(parent, name, Int8Linear.from_linear(child).to(child.weight.device))
    model.split_decode_threads = can_split_threads(model)
    return model
