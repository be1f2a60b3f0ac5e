"""Aviary: RWKV-4, 5 (Eagle), 6 (Finch) and 7 (Goose) in one package.

    >>> import aviary
    >>> model = aviary.load("RWKV-x070-World-0.1B.pth")        # doctest: +SKIP
    >>> logits, state = model(tokens)                            # doctest: +SKIP
"""

from aviary.config import ModelConfig, infer_config
from aviary.io import CheckpointError
from aviary.loading import load
from aviary.model import RWKV
from aviary.state import RWKVState, StateError
from aviary.tokenizer import WorldTokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = ["RWKV", "CheckpointError", "ModelConfig", "RWKVState", "StateError", "WorldTokenizer", "infer_config",
           "load", "load_tokenizer"]
