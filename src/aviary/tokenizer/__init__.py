"""Tokenizers: the RWKV World tokenizer (RWKV-5/6/7) and the GPT-NeoX 20B tokenizer (RWKV-4 Pile models)."""

from aviary.tokenizer.base import StreamDecoder, Tokenizer
from aviary.tokenizer.world import WorldTokenizer

__all__ = ["StreamDecoder", "Tokenizer", "WorldTokenizer"]
