"""Tiny random models and a few optimizer steps, shared by the tests of aviary.peft."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aviary.loading import model_from_state_dict
from aviary.peft import PeftConfig, apply_peft
from aviary.testing import random_config, random_state_dict

VOCAB = 300

# (id, version, config): every method on every version it supports; LoRA with alpha != rank, MiSS bone with
# a rank that does not divide the width (padding)
METHODS = [("lora", PeftConfig("lora", rank=4, alpha=12.0)),
           ("pissa", PeftConfig("pissa", rank=4)),
           ("miss-bone", PeftConfig("miss", rank=24)),
           ("miss-bat", PeftConfig("miss", rank=16, miss_mode="bat")),
           ("state", PeftConfig("state"))]
CASES = [(f"v{v}-{name}", v, cfg) for v in (4, 5, 6, 7) for name, cfg in METHODS if not (v == 4 and name == "state")]


def tiny(version: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """An official-format random state dict: L2, D64, head size 32, vocabulary 300."""
    return random_state_dict(random_config(version, n_layer=2, n_embd=64, head_size=32, vocab_size=VOCAB), seed=seed)


def fresh(sd: dict[str, torch.Tensor]):
    """A model of copies of `sd` (model_from_state_dict shares the tensors, and training changes parameters)."""
    return model_from_state_dict({k: v.clone() for k, v in sd.items()})


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def train(model, steps: int = 3, lr: float = 1e-2, seed: int = 0):
    """A few Adam steps on random tokens: the adapters move away from their initial values."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        x = tokens(seed=seed + i)
        logits, _ = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def adapted(sd, config: PeftConfig, *, steps: int = 3, seed: int = 0):
    """A model of `sd` with `config`'s method applied and trained a few steps."""
    return train(apply_peft(fresh(sd), config, seed=seed), steps=steps)


def logits(model, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens(seed=99) if x is None else x)[0]
