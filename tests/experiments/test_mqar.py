"""MQAR: the generator's invariants and a smoke training run that learns above chance."""

import pytest
import torch

from aviary.experiments.mqar import IGNORE, PRESETS, mqar_batch, run


@pytest.mark.parametrize("seq_len,n_pairs,vocab", [(64, 4, 8192), (128, 8, 8192), (32, 8, 256), (256, 16, 8192)])
def test_generator_invariants(seq_len, n_pairs, vocab):
    x, y = mqar_batch(50, seq_len, n_pairs, vocab, generator=torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (50, seq_len) and x.dtype == y.dtype == torch.int64
    half = vocab // 2
    for xb, yb in zip(x, y, strict=True):
        keys, values = xb[0:2 * n_pairs:2], xb[1:2 * n_pairs:2]
        assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < vocab)).all()
        assert len(set(keys.tolist())) == n_pairs
        pairs = dict(zip(keys.tolist(), values.tolist(), strict=True))
        scored = (yb != IGNORE).nonzero().flatten()
        assert len(scored) == n_pairs
        assert (scored >= 2 * n_pairs).all()                      # queries only after the context
        assert sorted(xb[scored].tolist()) == sorted(pairs)       # each key queried once
        for p in scored.tolist():
            assert yb[p].item() == pairs[xb[p].item()]            # label = the value paired with the key
        # outside the context, the only non-filler tokens are the queries and their values
        rest = torch.ones(seq_len, dtype=torch.bool)
        rest[:2 * n_pairs] = False
        rest[scored] = False
        rest[scored + 1] = False                                   # the query key is at most T-2
        assert (xb[rest] == 0).all()


def test_generator_power_law_and_determinism():
    a = mqar_batch(20, 128, 8, generator=torch.Generator().manual_seed(3))
    b = mqar_batch(20, 128, 8, generator=torch.Generator().manual_seed(3))
    c = mqar_batch(20, 128, 8, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True)) and not torch.equal(a[0], c[0])
    # the power law puts most queries near the context: the first half of the query region holds more
    _, y = mqar_batch(400, 128, 8, generator=torch.Generator().manual_seed(5))
    pos = (y != IGNORE).nonzero()[:, 1]
    assert (pos < 16 + 56).float().mean() > 0.6


def test_generator_rejects_bad_shapes():
    with pytest.raises(ValueError):
        mqar_batch(1, 63, 4)
    with pytest.raises(ValueError):
        mqar_batch(1, 64, 17)


def test_smoke_preset_learns_above_chance():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = PRESETS["smoke"]
        acc = run(p["versions"][0], p["d_models"][0], p["seq_lens"][0], p["lrs"][0], p["steps"], **p["kwargs"])
    finally:
        torch.set_num_threads(threads)
    chance = 1 / (p["kwargs"]["vocab"] // 2)
    assert acc > 10 * chance, acc
