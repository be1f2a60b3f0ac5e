"""What a model's one-token step runs on (`DecodePath`, `model.decode_path`), and whether it may split its
threads (`can_split_threads`).

`aviary info`, `aviary generate --stats` and the benchmarks print the path, so a number can always be traced
to the code that produced it. It is worked out when asked, from the model as it is then (loaded, moved,
quantised, with the process's instruction set).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from aviary.cpu import isa
from aviary.cpu.blocks import why_not
from aviary.cpu.products import Linear, kernel_weight

__all__ = ["DecodePath", "can_split_threads", "decode_path"]


@dataclass(frozen=True)
class DecodePath:
    """device: where the weights are; isa: the C kernels' instruction set ("torch": none); bf16_dot: bf16
    products use a bf16 dot-product instruction; blocks: "c" when every block of a step runs in one C call,
    else "torch"; why: the reason the C blocks do not run (None when they do); products: the big matrix
    products that have a C kernel, and how many there are; weights: their dtypes; threads: the threads a
    step's products use."""

    device: str
    isa: str
    bf16_dot: bool
    blocks: str
    why: str | None
    products: tuple[int, int]
    weights: tuple[str, ...]
    threads: int

    def __str__(self) -> str:
        if self.device != "cpu":
            return f"{self.device}: torch's kernels"
        fast, total = self.products
        isa_name = self.isa + (" (bf16 dot product)" if self.bf16_dot and "bfloat16" in self.weights else "")
        blocks = "one C call for all blocks" if self.blocks == "c" else f"torch blocks ({self.why})"
        return (f"cpu {isa_name}, {blocks}, {fast}/{total} products in C ({', '.join(self.weights)}), "
                f"{self.threads} threads")

    def as_dict(self) -> dict:
        return asdict(self)


def _products(model: nn.Module) -> list[nn.Module]:
    from aviary.quant import Int8Linear

    return [m for m in model.modules() if isinstance(m, nn.Linear | Int8Linear)]


def decode_path(model) -> DecodePath:
    """What `model`'s one-token step runs on now (see DecodePath)."""
    from aviary.quant import Int8Linear

    device = model.device.type
    products = _products(model)
    fast = sum(kernel_weight(m) is not None for m in products) if device == "cpu" and isa.BUILT else 0
    dtypes = sorted({str(m.weight_int8.dtype if isinstance(m, Int8Linear) else m.weight.dtype).removeprefix("torch.")
                     for m in products})
    why = why_not(model.spec.cpu_block, model.blocks)
    if why is None and getattr(model, "rescale_every", 0):
        why = "the fp16 layer rescale is applied"
    return DecodePath(device=device, isa=isa.cpu_isa(), bf16_dot=isa.bf16_rounds_x(), blocks="c" if why is None
                      else "torch", why=why, products=(fast, len(products)), weights=tuple(dtypes),
                      threads=torch.get_num_threads())


def can_split_threads(model: nn.Module) -> bool:
    """Whether `model`'s one-token steps may run small ops on one thread and the big products on all
    (`aviary.cpu.threads`, `model.split_decode_threads`): only while every big product is a layer that steps
    the thread count back up (`Linear`, `aviary.quant.Int8Linear`, which is no nn.Linear). A plain nn.Linear
    swapped in by a user would otherwise run on one thread; after such a swap, set
    `model.split_decode_threads = can_split_threads(model)` (`aviary.quant.quantize` does)."""
    return all(isinstance(m, Linear) or not isinstance(m, nn.Linear) for m in (*model.blocks.modules(), model.head))
