"""Text generation: sampling settings, the batched prefill/decode engine, and the prefix-state cache.

The names below are imported on first use (PEP 562, as in `aviary`), so that the command line can read
the sampling settings (`aviary.generation.params`) for `--help` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "Engine": "aviary.generation.engine",
    "GenerationError": "aviary.generation.engine",
    "SequenceOutput": "aviary.generation.engine",
    "generate": "aviary.generation.engine",
    "stream": "aviary.generation.engine",
    "SamplingParams": "aviary.generation.params",
    "StateCache": "aviary.generation.cache",
}

__all__ = ["Engine", "GenerationError", "SamplingParams", "SequenceOutput", "StateCache", "generate", "stream"]

if TYPE_CHECKING:
    from aviary.generation.cache import StateCache
    from aviary.generation.engine import Engine, GenerationError, SequenceOutput, generate, stream
    from aviary.generation.params import SamplingParams


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
