"""Training RWKV-4/5/6/7: from scratch with the official recipe, or continuing from a checkpoint.

    from aviary.train import TrainConfig, train
    cfg = TrainConfig(); cfg.data.train = "data/train"; train(cfg)

Nothing here is imported by `import aviary`; see docs/training.md.
"""

from aviary.train.config import ConfigError, TrainConfig, load_config
from aviary.train.data import BinIdx, DataError, prepare
from aviary.train.loop import TrainResult, train

__all__ = ["BinIdx", "ConfigError", "DataError", "TrainConfig", "TrainResult", "load_config", "prepare", "train"]
