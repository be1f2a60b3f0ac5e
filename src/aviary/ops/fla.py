"""The `fla` backend: flash-linear-attention's Triton kernels behind Aviary's op contracts.

    gla_fla         == gla.gla_recurrent          (RWKV-5/6)  by fla.ops.rwkv6.chunk_rwkv6
    delta_rule_fla  == delta.delta_rule_recurrent (RWKV-7)    by fla.ops.rwkv7.chunk_rwkv7

Same arguments in the same order, same shapes, `(y, final_state)` back, gradients for every input and the
initial state (fla's backward computes dh0). RWKV-4's WKV has no fla kernel, so `wkv4` has no "fla" backend.

fla is optional (`pip install aviary[gpu]`: fla-core and Triton) and imported inside the functions, never by
`import aviary`. Its kernels need a CUDA device: they query the GPU driver even under Triton's interpreter, so
on a CPU tensor these functions refuse with a ValueError before importing anything.

The conversions between the two contracts (checked on a CPU by tests/ops/test_fla_backend.py against a stand-in
that implements fla's documented contract with the reference loop):

- layout: fla takes [B, T, H, K], as Aviary does: no transposition. (Older fla releases had a `head_first`
  argument, defaulting there to True, [B, H, T, K]; on an fla that still has it, head_first=False is passed.)
- state: fla's initial_state and final_state are [N, H, K, V] with the key index as rows and the decay along
  it, i.e. `h_t = diag(exp(w_t)) h_{t-1} + k_t v_t^T`, Aviary's orientation (aviary.state): no transposition.
- scale: chunk_rwkv6's `scale` defaults to K^-0.5 (attention's), RWKV has none: scale=1.0 is passed to both.
- decay: both take the log decay `w` (log w_t < 0). chunk_rwkv6 wants it per token [B, T, H, K]; RWKV-5's
  constant decay arrives as [1, 1, H, K] and is expanded (RWKV-5 is RWKV-6 with a constant decay).
- RWKV-7: chunk_rwkv7(r, w, k, v, a, b) is fla's DPLR recurrence `S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T
  S_{t-1}) + k_t v_t^T`, `o_t = S_t^T r_t`: delta_rule_recurrent's, argument for argument (only the order
  differs: Aviary's is (r, logw, k, v, a, b), fla's (r, w, k, v, a, b), the same).
- dtype: the inputs are passed as they come (Aviary's ops get float32); fla's matrix products inside a chunk
  use TF32 on float32 inputs, so results are not float32-exact (the GPU tests in tests/ops allow 1e-2 of the
  reference's RMS).
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch

__all__ = ["INSTALL", "delta_rule_fla", "gla_fla"]

INSTALL = "pip install aviary[gpu]"


def _require_cuda(op: str, *tensors: torch.Tensor) -> None:
    """fla's kernels run on CUDA only; say so (and what to use instead) before fla is imported."""
    for t in tensors:
        if t.device.type != "cuda":
            raise ValueError(f"{op}: the 'fla' backend runs on CUDA tensors only, got a tensor on {t.device} "
                             f"(fla's Triton kernels need a GPU; install them with `{INSTALL}`); use backend="
                             "'chunked' on a CPU")


def _fla_function(module: str, name: str):
    try:
        return getattr(importlib.import_module(f"fla.ops.{module}"), name)
    except ImportError as e:
        raise ImportError(f"the 'fla' backend needs flash-linear-attention's kernels: `{INSTALL}` "
                          f"(could not import fla.ops.{module}.{name}: {e})") from None


@functools.cache
def _layout_kwargs(fn) -> dict:
    """head_first=False on an fla old enough to have the argument."""
    try:
        return {"head_first": False} if "head_first" in inspect.signature(fn).parameters else {}
    except (TypeError, ValueError):  # a callable without a readable signature: the current fla, no argument
        return {}


def gla_fla(r, k, v, logw, u, state):
    """gla_recurrent by fla's chunk_rwkv6. r, k, logw [B, T, H, K] (logw may be [1, 1, H, K]); v [B, T, H, V];
    u [H, K]; state [B, H, K, V] -> (y [B, T, H, V], state [B, H, K, V])."""
    _require_cuda("gla", r, k, v, logw, u, state)
    chunk_rwkv6 = _fla_function("rwkv6", "chunk_rwkv6")
    B, T, H, K = r.shape
    w = logw.expand(B, T, H, K).contiguous()  # RWKV-5's constant decay, per token
    y, final = chunk_rwkv6(r.contiguous(), k.contiguous(), v.contiguous(), w, u.contiguous(), scale=1.0,
                           initial_state=state.contiguous(), output_final_state=True, **_layout_kwargs(chunk_rwkv6))
    return y, final


def delta_rule_fla(r, logw, k, v, a, b, state):
    """delta_rule_recurrent by fla's chunk_rwkv7. r, logw, k, a, b [B, T, H, K]; v [B, T, H, V];
    state [B, H, K, V] -> (y [B, T, H, V], state [B, H, K, V])."""
    _require_cuda("delta_rule", r, logw, k, v, a, b, state)
    chunk_rwkv7 = _fla_function("rwkv7", "chunk_rwkv7")
    y, final = chunk_rwkv7(*(x.contiguous() for x in (r, logw, k, v, a, b)), scale=1.0,
                           initial_state=state.contiguous(), output_final_state=True, **_layout_kwargs(chunk_rwkv7))
    return y, final
