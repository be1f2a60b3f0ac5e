"""Aviary's own Triton kernels: the "triton" backend of `wkv4`, `gla` and `delta_rule`.

Each kernel is a state-passing recurrence: one program per (batch, head, value block) keeps its [K, BV] tile of
the state in registers and loops over time (RWKV-4: one program per (batch, channel block)). The forward pass
saves the state at the start of every chunk of `chunk_len` tokens (only when a gradient is wanted); the backward
pass walks the chunks in reverse, recomputes the states inside one chunk from its saved start, and runs the
recurrence's reverse mode, producing the gradients of every input and of the initial state (what exact
long-document training and state tuning need). All arithmetic is float32; other input dtypes are converted.

The kernels are plain `@triton.jit` functions: nothing is compiled at import, Triton's JIT compiles them on first
use. They run on CUDA tensors, or on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1` in the
environment when the kernel modules are first imported; simplest: before triton is), which is how the tests
check them against the recurrent references without a GPU.

This file imports nothing heavy: the op modules list its functions in their BACKENDS tables, and each imports
its kernel module (and with it Triton) on its first call. So `import aviary` never loads Triton, and a CPU-only
install without it works; asking for the backend there is a clear ImportError.
"""

from __future__ import annotations

import importlib

__all__ = ["INSTALL", "delta_rule_triton", "gla_triton", "wkv4_triton"]

INSTALL = "pip install aviary[gpu]"


def _kernels(module: str):
    """aviary.ops.triton.<module>, which imports Triton: loaded on first use, with a clear error without it."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the 'triton' backend needs Triton (and a CUDA GPU, or Triton's interpreter on a CPU): "
                          f"`{INSTALL}` ({e})") from None
    return importlib.import_module(f"aviary.ops.triton.{module}")


# chunk_len below: tokens between the states the forward keeps for the backward (memory: T / chunk_len states per
# sequence and head, plus chunk_len states of scratch per program in the backward). Not tuned on a GPU yet.


def wkv4_triton(w, u, k, v, state, chunk_len: int = 64):
    """RWKV-4 WKV, `wkv4_recurrent`'s contract (aviary.ops.triton.wkv4)."""
    return _kernels("wkv4").wkv4_triton(w, u, k, v, state, chunk_len=chunk_len)


def gla_triton(r, k, v, logw, u, state, chunk_len: int = 32):
    """RWKV-5/6 gated linear attention with bonus, `gla_recurrent`'s contract (aviary.ops.triton.gla)."""
    return _kernels("gla").gla_triton(r, k, v, logw, u, state, chunk_len=chunk_len)


def delta_rule_triton(r, logw, k, v, a, b, state, chunk_len: int = 32):
    """RWKV-7's delta rule, `delta_rule_recurrent`'s contract (aviary.ops.triton.delta)."""
    return _kernels("delta").delta_rule_triton(r, logw, k, v, a, b, state, chunk_len=chunk_len)
