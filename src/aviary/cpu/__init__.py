"""Aviary's CPU backend: C kernels for a decode step, kept apart from the models' math.

    isa        which instruction set the C kernels run (avx512, avx2, generic, or torch = none), chosen
               once at import (AVIARY_CPU_ISA forces one) and switchable with `use_isa`
    products   `Linear` (a drop-in nn.Linear), `linear`, `matmul`: decode-sized matrix products
    steps      one-token WKV state updates (RWKV-5/6 gla, RWKV-7 delta rule)
    blocks     every block of a one-token step in one C call, by each version's `BlockRecord`
    threads    the thread policy of a decode step (small ops on one thread, products on all)
    path       `DecodePath`: what a model's decode step runs on (`model.decode_path`); `can_split_threads`

The C code is in src/aviary/csrc/ (one file per concern; see its kernels.h). Every fast path has its
torch reference beside it in aviary.model / aviary.ops, and tests/cpu/kernels/ compares them on every
instruction set the machine can execute.
"""

from aviary.cpu import blocks, isa, products, steps, threads
from aviary.cpu.isa import (
    ENV_VAR,
    ISAS,
    MAX_ROWS,
    available,
    backend_info,
    bf16_rounds_x,
    build_error,
    cpu_isa,
    reference_only,
    runnable_isas,
    use_isa,
)
from aviary.cpu.path import DecodePath, can_split_threads, decode_path
from aviary.cpu.products import Linear, kernel_weight, linear, matmul

__all__ = ["ENV_VAR", "ISAS", "MAX_ROWS", "DecodePath", "Linear", "available", "backend_info", "bf16_rounds_x",
           "blocks", "build_error", "can_split_threads", "cpu_isa", "decode_path", "isa", "kernel_weight", "linear",
           "matmul", "products", "reference_only", "runnable_isas", "steps", "threads", "use_isa"]
