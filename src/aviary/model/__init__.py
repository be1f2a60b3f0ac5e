"""RWKV models: the shared shell (`rwkv.py`) and one file per generation (`v4.py` ... `v7.py`)."""

from aviary.model.rwkv import RWKV

__all__ = ["RWKV"]
