"""The fp16 layer rescale of RWKV-4/5/6 (the pip package's `RESCALE_LAYER`).

In float16 the residual stream of a deep v4-v6 model overflows. The trick: x is halved after every `every`
blocks, and the output matrices of block i (att.output, ffn.value) are divided by 2**(i // every) to match,
which leaves the logits unchanged up to LayerNorm eps. `RWKV.forward` halves x by `model.rescale_every`.
RWKV-7 does not need it (the reference runs it in fp16 without) and refuses it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from aviary.model.common import VersionSpec

__all__ = ["DEFAULT_EVERY", "apply_rescale", "default_rescale"]

DEFAULT_EVERY = 6  # the pip package's default for fp16


def default_rescale(spec: VersionSpec, dtype: torch.dtype) -> int:
    """The rescale interval a model of this version gets in `dtype` when none is asked for: 6 in float16
    where the version supports it, else 0 (off; in fp32/bf16 it would only add LayerNorm-eps noise)."""
    return DEFAULT_EVERY if dtype == torch.float16 and spec.supports_rescale else 0


@torch.no_grad()
def apply_rescale(model: nn.Module, every: int = DEFAULT_EVERY) -> None:
    """Rescale `model` (an aviary RWKV) in place for fp16: see the module docstring."""
    if not model.spec.supports_rescale:
        raise ValueError(f"RWKV-{model.config.version} has no layer-rescale trick")
    if model.rescale_every:
        raise ValueError("rescale already applied")
    if every <= 0:
        raise ValueError(f"rescale interval must be positive, got {every}")
    if not isinstance(model.blocks[0].att.output, nn.Linear):
        raise ValueError("rescale a model before quantising it (the int8 weights are fixed)")
    for i, block in enumerate(model.blocks):
        scale = 2 ** (i // every)
        block.att.output.weight.div_(scale)
        block.ffn.value.weight.div_(scale)
    model.rescale_every = every
