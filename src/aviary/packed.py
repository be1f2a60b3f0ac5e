"""Inference-only linears whose weight is pre-packed for oneDNN, the CPU matmul library inside torch.

`F.linear(x, W)` on a plain [out, in] weight reads W through a generic path. For one row of x (decode)
that path reaches about 13 GB/s on the test machine, where the same product on a weight reordered once
into oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, the layout torch.compile's
CPU freezing pass uses) reaches 22-23 GB/s, the machine's memory bandwidth; it is as fast or faster for
2 to 512 rows too (benchmarks/bench_inference.py, docs/benchmarks.md). A decode step is a chain of such
one-row products, so this is most of its time.

The packed weight replaces the float weight (no second copy). The layer has no backward: packing is
for inference, and `PackedLinear` refuses an input that needs a gradient rather than giving wrong
gradients. Its state dict still holds a plain `weight` (unpacked on save), so a packed model saves and
loads like an unpacked one.

Reference beside it: `F.linear` on `layer.weight` (the unpacked weight); tests/test_packed.py compares.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from aviary._threads import all_threads

__all__ = ["PackedLinear", "pack_model", "packing_available"]


def packing_available(device: torch.device | str = "cpu") -> bool:
    """True where torch has oneDNN's packed linear: CPU builds with mkldnn (x86 and most ARM builds)."""
    return (torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


class PackedLinear(nn.Module):
    """A bias-free Linear for CPU inference, its weight held in oneDNN's packed layout."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        if weight.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"PackedLinear takes float32 or bfloat16 weights, got {weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = _pack(weight)  # an opaque mkldnn tensor: not a parameter or buffer, so .to() leaves it

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        if linear.bias is not None:
            raise ValueError("PackedLinear has no bias; RWKV's linears have none")
        return cls(linear.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as a plain [out, in] tensor (a copy, unpacked)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("this model's linears are packed for inference and have no backward; "
                               "load it with aviary.load(..., pack=False) to train or take gradients")
        if x.dtype != self.dtype or x.device.type != "cpu":
            raise RuntimeError(f"PackedLinear holds {self.dtype} CPU weights, got a {x.dtype} input on "
                               f"{x.device}; pack after moving and casting the model")
        with all_threads():
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        w = state_dict[key]
        if tuple(w.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {key}: checkpoint {tuple(w.shape)}, "
                              f"model {(self.out_features, self.in_features)}")
            return
        self.packed = _pack(w.to(self.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, packed"


def pack_model(model: nn.Module) -> int:
    """Replace every float `nn.Linear` in `model.blocks` and `model.head` with a `PackedLinear`, in place,
    and stop the remaining parameters from requiring gradients (the model is now for inference).
    Returns how many were packed (0 where packing is unavailable, e.g. on a GPU, or nothing is left to pack,
    e.g. after int8 quantisation)."""
    device = model.head.weight.device if hasattr(model.head, "weight") else torch.device("cpu")
    if not packing_available(device):
        return 0
    targets = [(parent, name, child) for parent in model.blocks.modules()
               for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and child.weight.dtype in (torch.float32, torch.bfloat16)]
    if isinstance(model.head, nn.Linear) and model.head.weight.dtype in (torch.float32, torch.bfloat16):
        targets.append((model, "head", model.head))
    with torch.no_grad():
        for parent, name, child in targets:
            setattr(parent, name, PackedLinear.from_linear(child))
    model.requires_grad_(False)
    return len(targets)
