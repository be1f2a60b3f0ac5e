"""Training RWKV-4/5/6/7: from scratch with the official recipe, or continuing from a checkpoint.

    from aviary.train import TrainConfig, train
    cfg = TrainConfig(); cfg.data.train = "data/train"; train(cfg)

Nothing here is imported by `import aviary`; see docs/training.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# imported on first use, so that `aviary.train.config` (the CLI's parser) does not pull in torch
_WHERE = {"ConfigError": "config", "TrainConfig": "config", "load_config": "config", "BinIdx": "data",
          "DataError": "data", "prepare": "data", "TrainResult": "loop", "train": "loop"}

__all__ = ["BinIdx", "ConfigError", "DataError", "TrainConfig", "TrainResult", "load_config", "prepare", "train"]

if TYPE_CHECKING:
    from aviary.train.config import ConfigError, TrainConfig, load_config
    from aviary.train.data import BinIdx, DataError, prepare
    from aviary.train.loop import TrainResult, train


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'aviary.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"aviary.train.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
