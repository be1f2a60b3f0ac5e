"""The tiny random models the evaluation tests score with."""

from __future__ import annotations

from aviary.model import RWKV
from aviary.testing import random_config, random_state_dict


def tiny_model(version: int = 7, seed: int = 3) -> RWKV:
    """A random RWKV of `version`: 2 layers, width 64, heads of 32, 300 ids (bytes and a few more)."""
    config = random_config(version, n_layer=2, n_embd=64, head_size=32, vocab_size=300)
    net = RWKV(config)
    net.load_state_dict(random_state_dict(config, seed=seed), strict=True)
    return net.eval()
