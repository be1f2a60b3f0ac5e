"""What the three kernels' Python sides share: input checks and the layout they hand to a kernel."""

from __future__ import annotations

import torch
import triton


def check_inputs(op: str, kernel, chunk_len: int, **tensors: torch.Tensor) -> None:
    """Floating-point tensors on one device that `kernel` can run on (CUDA, or any device under Triton's
    interpreter), and a positive chunk length."""
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"{op} backend 'triton': inputs are on several devices: "
                         + ", ".join(f"{name} on {t.device}" for name, t in tensors.items()))
    device = devices.pop()
    interpreted = not isinstance(kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1 gives an interpreter
    if device.type != "cuda" and not interpreted:
        raise ValueError(f"{op} backend 'triton': tensors are on {device}, Triton kernels need a CUDA device "
                         "(tests run them on the CPU under Triton's interpreter: TRITON_INTERPRET=1 set before "
                         "triton is imported)")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{op} backend 'triton': {name} must be a floating-point tensor, got {t.dtype}")
    if not isinstance(chunk_len, int) or chunk_len < 1:
        raise ValueError(f"{op} backend 'triton': chunk_len must be a positive integer, got {chunk_len!r}")


def check_rank(op: str, **expected: tuple[torch.Tensor, int]) -> None:
    for name, (t, dims) in expected.items():
        if t.dim() != dims:
            raise ValueError(f"{op} backend 'triton': {name} must have {dims} dimensions, got shape {tuple(t.shape)}")


def check_shapes(op: str, **expected: tuple[torch.Tensor, tuple[int, ...]]) -> None:
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{op} backend 'triton': {name} has shape {tuple(t.shape)}, expected {shape}")


def f32(t: torch.Tensor) -> torch.Tensor:
    """The layout every kernel reads: contiguous float32 (a no-op for such a tensor; differentiable)."""
    return t.float().contiguous()


def wants_grad(inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether the forward pass must keep what the backward needs. Decided outside the autograd.Function: inside
    its forward grad mode is always off and `ctx.needs_input_grad` ignores an enclosing `torch.no_grad()`."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def value_block(v_dim: int) -> int:
    """Columns of the state one program holds: [K, BV] float32 tiles of up to 64 x 32, sized to stay in registers
    (not yet measured on a GPU); V = 64 splits in two blocks, which doubles the programs for small batches."""
    return min(triton.next_power_of_2(v_dim), 32)
