"""The shipped default model (src/aviary/models, trained by `aviary train configs/aviary-v7-tiny.yaml`):
small enough to ship, loads, and has learned English (far better than chance on a sentence it never saw)."""

from __future__ import annotations

import math

import pytest
import torch

import aviary
from aviary.models import default_model_path


def test_default_model_is_the_trained_tiny_v7():
    path = default_model_path()
    assert path.name == "aviary-v7-tiny.safetensors" and path.stat().st_size < 40e6
    assert (path.parent / "MODEL_CARD.md").is_file()
    model = aviary.load(path)
    cfg = model.config
    assert (cfg.version, cfg.n_layer, cfg.n_embd, cfg.vocab_size) == (7, 6, 128, 65536)


def test_default_model_has_learned_english():
    tok = pytest.importorskip("aviary.tokenizer").WorldTokenizer()
    model = aviary.load(default_model_path())
    ids = tok.encode("The people of the United States have a great deal to be thankful for in this year.")
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[1:])).item()
    assert nll < 0.6 * math.log(65536), nll  # chance is 11.09 nats/token


def test_its_training_config_builds_exactly_its_shapes():
    """`aviary train configs/aviary-v7-tiny.yaml` would build a model of the shipped model's sizes (the config
    pins the gate rank the shipped model has, which RWKV-LM's current default for C=128 no longer gives)."""
    from pathlib import Path

    from aviary.train.config import load_config, rank_fields
    from aviary.train.init import model_config

    m = load_config(Path(__file__).resolve().parents[2] / "configs" / "aviary-v7-tiny.yaml").model
    built = model_config(m.version, m.n_layer, m.n_embd, m.vocab_size, m.head_size, m.dim_ffn,
                         **{name: getattr(m, name) for name in rank_fields(m.version)})
    assert built == aviary.load(default_model_path()).config
