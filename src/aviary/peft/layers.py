"""The adapted products: a frozen weight W [out, in] under its official name, the adapter's tensors beside
it under RWKV-PEFT's names, and the merged weight each method stands for.

    LoRA    y = x Wᵀ + s (dropout(x) Aᵀ) Bᵀ        A [r, in] Kaiming-uniform, B [out, r] zeros, s = alpha / r
    PiSSA   the same with s = 1 and no dropout, from W's truncated SVD U S Vᵀ (rank r):
            A₀ = diag(√S) Vᵀ,  B₀ = U diag(√S),  and the frozen W becomes the residual W - B₀ A₀
    MiSS    bone: y = x Wᵀ + fold(x) D,  D [r, out] zeros, fold(x) = x padded to a multiple of r and summed
                  over its blocks of r channels, i.e. ΔW[:, b r + j] = D[j]ᵀ for every block b
            bat:  y = x (W + ΔW)ᵀ,  D [in/r, r, r] zeros, block (a, b) of ΔW is W_ab D_b + D_b
                  (W_ab: the r x r block in row a and column b of W)
    merged  LoRA / PiSSA: W + s B A;   MiSS: W + ΔW

Mirrors RWKV-PEFT `rwkvt/peft/rwkvLinear.py` (LoraLinear, BoneLinear, BatLinear) and its `merge/*.py`; MiSS
is arXiv 2409.15371 (first called Bone, then DiSHA; RWKV-PEFT names its tensor `disha`). The modules are no
`nn.Linear` and offer no `kernel_weight()`, so a decode step runs them in torch (aviary.cpu.blocks falls
back) and never skips an adapter; inference merges the adapter into W instead (`aviary.peft.merge`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary.cpu.threads import all_threads

__all__ = ["AdaptedLinear", "LoraLinear", "MissLinear", "bat_delta", "bone_delta", "lora_merged", "pissa_factors",
           "pissa_residual"]


# ---- the math, shared by the modules and by merging a file (aviary.peft.files) ------------------------------


def lora_merged(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """W + s B A, computed in float32 and returned in W's dtype."""
    return (weight.float() + scale * (lora_B.float() @ lora_A.float())).to(weight.dtype)


def bone_delta(disha: torch.Tensor, n_in: int) -> torch.Tensor:
    """MiSS bone: D [r, out] -> ΔW [out, in] with ΔW[:, b r + j] = D[j] (the last block cut at `in`)."""
    r = disha.shape[0]
    return disha.t().repeat(1, -(-n_in // r))[:, :n_in]


def bat_delta(weight: torch.Tensor, disha: torch.Tensor) -> torch.Tensor:
    """MiSS bat: W [out, in], D [in/r, r, r] -> ΔW [out, in], block (a, b) = W_ab D_b + D_b."""
    out, n_in = weight.shape
    r = disha.shape[-1]
    blocks = weight.reshape(out // r, r, n_in // r, r).transpose(1, 2)  # [out/r, in/r, r, r]: W_ab
    delta = blocks @ disha + disha  # D [in/r, r, r] broadcast over the block rows a
    return delta.transpose(1, 2).reshape(out, n_in)


def miss_merged(weight: torch.Tensor, disha: torch.Tensor) -> torch.Tensor:
    """W + ΔW for either MiSS mode (D [r, out]: bone; D [in/r, r, r]: bat), in float32, returned in W's dtype."""
    w = weight.float()
    delta = bone_delta(disha.float(), w.shape[1]) if disha.dim() == 2 else bat_delta(w, disha.float())
    return (w + delta).to(weight.dtype)


def pissa_factors(weight: torch.Tensor, rank: int, niter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀ [r, in], B₀ [out, r]) in float32 on the CPU from `torch.svd_lowrank` of W (a randomised SVD: it draws
    from torch's global CPU generator; `apply_peft` seeds it in a forked RNG, so the result is reproducible)."""
    U, S, V = torch.svd_lowrank(weight.detach().float().cpu(), q=rank, niter=niter)
    root = S.sqrt()
    return root[:, None] * V.t(), U * root[None, :]


def pissa_residual(weight: torch.Tensor, init_A: torch.Tensor, init_B: torch.Tensor) -> torch.Tensor:
    """The frozen weight of PiSSA: W - B₀ A₀, in float32, returned in W's dtype. Applying and merging both call
    this, so a merge rebuilds exactly the residual that was trained on. (RWKV-PEFT's merge rounds it to
    bfloat16 whatever the base's dtype; here it keeps the base's.)"""
    return (weight.float() - init_B.float().to(weight.device) @ init_A.float().to(weight.device)).to(weight.dtype)


# ---- the modules ------------------------------------------------------------------------------------------


class AdaptedLinear(nn.Module):
    """A bias-free product with a frozen `weight` [out, in] and an adapter. `merged_weight()` is the plain
    weight the adapter stands for; `adapter_names` its tensors' names (RWKV-PEFT's)."""

    adapter_names: tuple[str, ...] = ()

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def base(self, x: torch.Tensor) -> torch.Tensor:
        with all_threads():  # inside a decode step's one-thread region, as aviary.cpu.Linear
            return F.linear(x, self.weight.to(x.dtype))

    def merged_weight(self) -> torch.Tensor:
        raise NotImplementedError


class LoraLinear(AdaptedLinear):
    """LoRA (scale alpha / r, dropout) or PiSSA (scale 1, W the residual, `init_lora_A/B` kept as buffers
    that are not in the state dict: `aviary.peft.save_adapter` writes them beside the adapter)."""

    adapter_names = ("lora_A", "lora_B")

    def __init__(self, weight: torch.Tensor, rank: int, scale: float, dropout: float = 0.0):
        super().__init__(weight)
        kw = dict(dtype=weight.dtype, device=weight.device)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        self.scale = scale
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def init_lora(self, generator: torch.Generator) -> None:
        """A as nn.Linear initialises its weight (Kaiming-uniform, a = √5), drawn in float32 on the CPU so that
        every device and dtype gets the same numbers; B stays zero."""
        a = torch.empty(self.lora_A.shape)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.lora_A.copy_(a)

    def init_pissa(self, niter: int) -> None:
        """A, B = A₀, B₀ from W's SVD; W becomes W - B₀ A₀ (the caller seeds the RNG)."""
        r = self.lora_A.shape[0]
        if r > min(self.in_features, self.out_features):
            raise ValueError(f"PiSSA rank {r} exceeds the smaller side of a {self.out_features}x{self.in_features} "
                             "weight")
        init_A, init_B = (t.to(self.weight.device, self.weight.dtype) for t in pissa_factors(self.weight, r, niter))
        self.register_buffer("init_lora_A", init_A, persistent=False)
        self.register_buffer("init_lora_B", init_B, persistent=False)
        with torch.no_grad():
            self.lora_A.copy_(init_A)
            self.lora_B.copy_(init_B)
        # a new tensor, not an in-place update: W may share memory with the state dict the model was loaded from
        self.weight = nn.Parameter(pissa_residual(self.weight.detach(), init_A, init_B), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return self.base(x) + self.scale * F.linear(F.linear(self.lora_dropout(x), a), b)

    def merged_weight(self) -> torch.Tensor:
        return lora_merged(self.weight.detach(), self.lora_A.detach(), self.lora_B.detach(), self.scale)


class MissLinear(AdaptedLinear):
    """MiSS (bone or bat), its one tensor `disha` zero-initialised."""

    adapter_names = ("disha",)

    def __init__(self, weight: torch.Tensor, rank: int, mode: str):
        super().__init__(weight)
        out, n_in, r = self.out_features, self.in_features, rank
        if mode == "bat" and (n_in % r or out % r):
            raise ValueError(f"MiSS bat needs rank {r} to divide both sides of a {out}x{n_in} weight")
        if mode == "bone" and r > n_in:
            raise ValueError(f"MiSS rank {r} exceeds the {n_in} inputs of the weight")
        shape = (r, out) if mode == "bone" else (n_in // r, r, r)
        self.disha = nn.Parameter(torch.zeros(shape, dtype=weight.dtype, device=weight.device))
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.disha.to(x.dtype)
        if self.mode == "bat":
            w = self.weight.to(x.dtype)
            with all_threads():
                return F.linear(x, w + bat_delta(w, d))
        r = d.shape[0]
        xp = F.pad(x, (0, -self.in_features % r))  # [..., r * ceil(in / r)]
        folded = xp.reshape(*x.shape[:-1], -1, r).sum(-2)  # [..., r]
        return self.base(x) + folded @ d

    def merged_weight(self) -> torch.Tensor:
        return miss_merged(self.weight.detach(), self.disha.detach())
