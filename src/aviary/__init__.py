"""Aviary: RWKV-4, 5 (Eagle), 6 (Finch) and 7 (Goose) in one package.

    >>> import aviary
    >>> model = aviary.load("RWKV-x070-World-0.1B.pth")        # doctest: +SKIP
    >>> logits, state = model(tokens)                            # doctest: +SKIP

The names below are imported on first use (PEP 562), so `import aviary` does not import torch. The
`aviary` command relies on that: it sets OMP_WAIT_POLICY=PASSIVE, which OpenMP reads only when torch
loads it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "aviary.config",
    "infer_config": "aviary.config",
    "CheckpointError": "aviary.io",
    "load": "aviary.loading",
    "RWKV": "aviary.model",
    "RWKVState": "aviary.state",
    "StateError": "aviary.state",
    "WorldTokenizer": "aviary.tokenizer",
    "load_tokenizer": "aviary.tokenizer",
}

__all__ = ["RWKV", "CheckpointError", "ModelConfig", "RWKVState", "StateError", "WorldTokenizer", "infer_config",
           "load", "load_tokenizer"]  # = _EXPORTS (a test checks)

if TYPE_CHECKING:
    from aviary.config import ModelConfig, infer_config
    from aviary.io import CheckpointError
    from aviary.loading import load
    from aviary.model import RWKV
    from aviary.state import RWKVState, StateError
    from aviary.tokenizer import WorldTokenizer, load_tokenizer


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    try:  # a submodule, as `import aviary` used to import most of them: aviary.cpu, aviary.ops, ...
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
