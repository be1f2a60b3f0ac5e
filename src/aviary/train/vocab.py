"""Compact vocabulary: train only the emb/head rows of the token ids that occur in the training data.

With the 65536-id World vocabulary and a small model, the head and the softmax over it are most of the
compute, yet an English corpus uses about half of the ids. Here the K ids seen in the training data keep
their own rows and every other id shares one extra row s. That is exact, not an approximation: the
full-vocabulary model whose unseen ids all have head row s gives each of them the logit s.x, so their
total probability is (V - K) e^{s.x}, which is what the compact softmax computes with log(V - K) added to
row s's logit. `expand` writes that full model (emb and head rows copied out to all V ids).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["CompactVocab"]


class CompactVocab:
    def __init__(self, used: np.ndarray, vocab_size: int):
        """used: sorted unique ids (< vocab_size) that get their own rows."""
        self.used = np.asarray(used, dtype=np.int64)
        self.vocab_size = vocab_size
        self.K = len(self.used)
        self.n_shared = vocab_size - self.K
        if self.n_shared < 1:
            raise ValueError("every id occurs in the data; a compact vocabulary would not save anything")
        lut = np.full(vocab_size, self.K, dtype=np.int64)
        lut[self.used] = np.arange(self.K)
        self.lut = torch.from_numpy(lut)
        self.bias = torch.zeros(self.K + 1)
        self.bias[self.K] = math.log(self.n_shared)  # row K stands for n_shared ids with equal logits

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, vocab_size: int) -> CompactVocab:
        counts = np.bincount(np.asarray(tokens), minlength=vocab_size)
        return cls(np.flatnonzero(counts), vocab_size)

    @property
    def size(self) -> int:
        """Rows of the compact emb/head."""
        return self.K + 1

    def map(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full ids -> compact ids (unseen ids -> K)."""
        return self.lut.to(tokens.device)[tokens]

    def logits(self, compact_logits: torch.Tensor) -> torch.Tensor:
        """Compact logits [..., K+1] whose softmax is the full model's, with all unseen ids lumped in K."""
        return compact_logits + self.bias.to(compact_logits.device)

    def expand(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Compact state dict -> the equivalent full-vocabulary one (official names and shapes)."""
        out = dict(sd)
        idx = self.lut  # full id -> compact row
        for name in ("emb.weight", "head.weight"):
            out[name] = sd[name][idx].contiguous()
        return out
