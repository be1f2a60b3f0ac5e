"""aviary.experiments.long_context: one training function for both model kinds, the Transformer's scorers, and
the smoke preset end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from aviary.experiments.baselines import Transformer
from aviary.experiments.long_context import (
    PRESETS,
    SHARED,
    TrainSettings,
    expand_vocab,
    main,
    one_pass_losses,
    sliding_window_losses,
    train_lm,
)
from aviary.model import RWKV
from aviary.train.init import init_model, model_config
from aviary.train.vocab import CompactVocab

torch.set_num_threads(1)


def _periodic_tokens(n: int = 4000, vocab: int = 50) -> np.ndarray:
    """A stream a model learns in a few steps: a fixed random sequence of 20 ids repeated."""
    period = np.random.default_rng(0).integers(1, vocab, 20)
    return np.tile(period, n // 20 + 1)[:n].astype(np.int64)


@pytest.mark.parametrize("kind", ["rwkv", "transformer"])
def test_one_training_function_trains_both_kinds(kind):
    settings = TrainSettings(ctx_len=32, batch=4, steps=30, lr_init=3e-3, lr_final=3e-4, warmup_steps=3,
                             precision="fp32")
    if kind == "rwkv":
        model = init_model(RWKV(model_config(7, 1, 32, vocab_size=64, head_size=16)), seed=0)
    else:
        model = Transformer(64, 32, 1, 2, max_len=32, pos="rope", seed=0)
    log = train_lm(model, _periodic_tokens(), settings)
    assert len(log["losses"]) == 30 and log["tokens"] == 30 * 4 * 32
    assert np.mean(log["losses"][-5:]) < 0.7 * np.mean(log["losses"][:5])


@pytest.fixture(scope="module")
def transformer():
    return Transformer(97, 32, 2, 2, max_len=16, pos="rope", seed=1).eval()


def test_one_pass_losses_are_a_forward_log_softmax(transformer):
    ids = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = torch.log_softmax(transformer(ids[None, :-1])[0], -1)                   # [49, V]
    expected = -logp.gather(-1, ids[1:, None])[:, 0].double()
    torch.testing.assert_close(one_pass_losses(transformer, ids), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [16, 17, 40, 73])
def test_sliding_window_scores_each_position_once_with_enough_context(transformer, n):
    """Against a direct evaluation of each target from the window the scorer's rule gives it: the newest
    window start (a multiple of the stride) whose window still holds the target with >= window - stride ids
    before it, or 0 for the first window's targets."""
    window, stride = 16, 8
    ids = torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n))
    got = sliding_window_losses(transformer, ids, window, stride, batch=3)
    assert got.shape == (n - 1,)
    for t in range(1, n):  # target index in ids
        start = 0 if t < window else (t - (window - stride)) // stride * stride
        assert t - start >= min(t, window - stride)
        expected = one_pass_losses(transformer, ids[start:t + 1])[-1]
        torch.testing.assert_close(got[t - 1], expected, rtol=0, atol=1e-5)


def test_sliding_window_covering_the_document_is_one_pass(transformer):
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sliding_window_losses(transformer, ids, 64), one_pass_losses(transformer, ids),
                               rtol=0, atol=1e-6)


def test_expanded_transformer_scores_like_the_compact_one(transformer):
    """expand_vocab gives the full-vocabulary model: the log-probability of a seen id is the compact one with
    the lumped row's log(#unseen) bias."""
    used = np.arange(0, 96, 2)  # 48 seen ids of 200; the other 152 share row 48
    vocab = CompactVocab(used, 200)
    compact = Transformer(vocab.size, 32, 1, 2, max_len=16, pos="rope", seed=2).eval()
    full = expand_vocab(compact, vocab)
    ids = torch.as_tensor(used[[3, 7, 1, 9, 0, 4]])
    with torch.no_grad():
        logp = torch.log_softmax(vocab.logits(compact(vocab.map(ids)[None, :-1])[0]), -1)
    expected = -logp.gather(-1, vocab.map(ids)[1:, None])[:, 0].double()
    torch.testing.assert_close(one_pass_losses(full, ids), expected, rtol=0, atol=1e-5)


@pytest.mark.skipif(not (SHARED / "train.jsonl.xz").exists(), reason="needs ../shared/data/corpus")
def test_smoke_preset_writes_csv_and_png(tmp_path):
    assert PRESETS["smoke"].train.tokens < 5000 and PRESETS["smoke"].max_tokens <= 1024  # seconds, not minutes
    from itertools import islice

    from aviary.textio import read_documents

    train = tmp_path / "train.jsonl"  # the corpus's first documents: tokenizing all of it takes seconds
    docs = islice(read_documents(SHARED / "train.jsonl.xz"), 3)
    train.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    main(["--preset", "smoke", "--out", str(tmp_path / "lc"), "--train-file", str(train),
          "--data-prefix", str(tmp_path / "corpus-train")])
    with open(tmp_path / "lc.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"rwkv", "transformer-onepass", "transformer-window", "default-model"}
    assert all(float(r["loss"]) > 0 for r in rows)
    assert (tmp_path / "lc.png").stat().st_size > 10_000
