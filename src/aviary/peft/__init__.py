"""Parameter-efficient fine-tuning of RWKV-4/5/6/7: LoRA, PiSSA, MiSS and state tuning, with RWKV-PEFT's files.

    lora    y = x Wᵀ + (alpha/r) (dropout(x) Aᵀ) Bᵀ      A [r, in] Kaiming-uniform, B [out, r] zeros
    pissa   the same without the scale, A and B from W's truncated SVD, W frozen as W - B₀ A₀
    miss    bone: y = x Wᵀ + fold_r(x) D, D [r, out] zeros;  bat: W + blockwise (W_ab D_b + D_b)
    state   each time-mix's starting WKV state `blocks.N.att.time_state` [H, V, K] (RWKV-5/6/7), zeros

(equations and shapes in `aviary.peft.layers`). The adapted products are the time-mix receptance, key, value
and output and the channel-mix key and value by default (RWKV-PEFT's); `parts` trains more in full.

    model = aviary.load(base)                       # float32 or bfloat16
    apply_peft(model, PeftConfig("lora", rank=32, alpha=32), seed=0)
    ... train the parameters that require a gradient ...
    save_adapter(model, None, "adapter.safetensors")  # RWKV-PEFT's key names
    merged = merged_state_dict(model)               # official format, loadable anywhere
    model = aviary.load(base, adapter="adapter.safetensors")   # merged at load: full decode speed

docs/finetuning.md has the methods, the file formats and `aviary merge`. `PeftConfig` imports no torch; the
rest is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from aviary.peft.config import DEFAULT_TARGETS, METHODS, PeftConfig

_EXPORTS = {
    "apply_peft": "aviary.peft.tuning",
    "adapter_state_dict": "aviary.peft.tuning",
    "load_adapter_state_dict": "aviary.peft.tuning",
    "merged_state_dict": "aviary.peft.tuning",
    "peft_config": "aviary.peft.tuning",
    "trainable_parameters": "aviary.peft.tuning",
    "Adapter": "aviary.peft.files",
    "AdapterError": "aviary.peft.files",
    "merge": "aviary.peft.files",
    "read_adapter": "aviary.peft.files",
    "save_adapter": "aviary.peft.files",
}

__all__ = ["DEFAULT_TARGETS", "METHODS", "Adapter", "AdapterError", "PeftConfig", "adapter_state_dict", "apply_peft",
           "load_adapter_state_dict", "merge", "merged_state_dict", "peft_config", "read_adapter", "save_adapter",
           "trainable_parameters"]

if TYPE_CHECKING:
    from aviary.peft.files import Adapter, AdapterError, merge, read_adapter, save_adapter
    from aviary.peft.tuning import (
        adapter_state_dict,
        apply_peft,
        load_adapter_state_dict,
        merged_state_dict,
        peft_config,
        trainable_parameters,
    )


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
