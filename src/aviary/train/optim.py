"""Optimizer groups, learning-rate schedule and L2Wrap as in RWKV-LM (reference sections 8.2-8.4).

Groups: weight decay only on 2-D `.weight` matrices (emb, head, projections); never on LayerNorm/GroupNorm,
mixes, decays or LoRA factors. Learning-rate multipliers: the decay vectors learn faster (v7 `att.w0` 2x;
v4-v6 `time_decay` 2x and v4 `time_first` 3x). The rule is the version's (`VersionSpec.param_group`, in
`model/vN.py`). Each group carries `lr_scale`; `set_lr` multiplies it in.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from aviary.model import VERSIONS

__all__ = ["L2Wrap", "lr_at", "make_optimizer", "param_groups", "set_lr"]


def param_groups(model: nn.Module, weight_decay: float, version: int | None = None) -> list[dict]:
    """AdamW parameter groups with `lr_scale` and `weight_decay`, each with a `names` list (sorted)."""
    rule = VERSIONS[version or model.config.version].param_group
    buckets: dict[tuple[float, bool], list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault(rule(name, p, weight_decay), []).append((name, p))
    groups = []
    for (scale, decay), items in sorted(buckets.items()):
        groups.append({"params": [p for _, p in items], "names": [n for n, _ in items], "lr_scale": scale,
                       "weight_decay": weight_decay if decay else 0.0})
    return groups


def make_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], eps: float,
                   weight_decay: float) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    for g in groups:
        g.pop("names")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_at(step: int, total_steps: int, lr_init: float, lr_final: float, warmup_steps: int,
          schedule: str = "cosine") -> float:
    """Learning rate of optimizer step `step` (0-based), RWKV-LM `trainer.py` in steps instead of tokens:
    cosine  lr_init * ((0.5 + f/2) + (0.5 - f/2) cos(pi * progress)),  f = lr_final / lr_init
    exponential  lr_init * exp(ln(f) * progress)  (linear when either end is 0)
    with progress = (step - warmup) / (total - warmup) in [0, 1], and warmup lr *= 0.01 + 0.99 step/warmup."""
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    f = lr_final / lr_init
    if schedule == "cosine":
        lr = lr_init * ((0.5 + f / 2) + (0.5 - f / 2) * math.cos(math.pi * progress))
    elif schedule == "exponential":
        lr = lr_init + (lr_final - lr_init) * progress if lr_final == 0 else lr_init * math.exp(math.log(f) * progress)
    elif schedule == "constant":
        lr = lr_init
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    if step < warmup_steps:
        lr *= 0.01 + 0.99 * step / warmup_steps
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


class L2Wrap(torch.autograd.Function):
    """Returns `loss` unchanged; in the backward pass adds factor * weight * max_logit at each position's
    argmax logit (the gradient of factor * sum(weight * max_logit^2) / 2), pushing logits toward 0.

    weight: the loss's weight of each position [B, T] (0 where the loss mask is off, and the loss's
    normalisation), or None for RWKV-LM's 1 / (B*T) on every position.

    Deviation from RWKV-LM's Python `L2Wrap`: the added gradient is multiplied by the incoming
    grad_output, as the train_temp CUDA kernel does, so it stays right when the loss is scaled
    (gradient accumulation, loss scaling)."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, logits: torch.Tensor, factor: float = 1e-4,
                weight: torch.Tensor | None = None):
        ctx.save_for_backward(logits, weight)
        ctx.factor = factor
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, weight = ctx.saved_tensors
        maxx, ids = torch.max(logits, -1, keepdim=True)
        if weight is None:
            scale = maxx * (ctx.factor / (logits.numel() // logits.shape[-1]))  # / (B*T)
        else:
            scale = maxx * ctx.factor * weight.reshape(maxx.shape).to(maxx.dtype)
        gy = torch.zeros_like(logits)  # the only [B, T, V] tensor of the backward: logits are large
        gy.scatter_(-1, ids, scale * grad_output)
        return grad_output, gy, None, None
