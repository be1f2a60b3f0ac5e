"""MQAR: the generator's invariants, the models' scored-position loss, and a smoke training run that learns above
chance."""

import json

import pytest
import torch
import torch.nn.functional as F

from aviary.experiments.mqar import (
    IGNORE,
    MODELS,
    PRESETS,
    MQARResult,
    RWKVMixer,
    best_by_cell,
    build_model,
    main,
    mqar_batch,
    plot,
    run,
    scored_loss,
    write_table,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    p = PRESETS["smoke"]
    r = run(p["models"][0], p["d_models"][0], p["seq_lens"][0], p["lrs"][0], p["steps"], **p["kwargs"])
    chance = 1 / (p["kwargs"]["vocab"] // 2)
    assert r.accuracy > 10 * chance, r
    assert r.curve and r.curve[-1] == (r.steps, r.accuracy)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_a_step_on_scored_positions(name):
    model = build_model(name, 32, 64, 16, seed=1)
    x, y = mqar_batch(4, 16, 2, vocab=64, generator=torch.Generator().manual_seed(0))
    loss = scored_loss(model, x, y)
    # the loss at the scored rows alone equals the full-logit cross-entropy with the other rows ignored
    model.eval()
    with torch.no_grad():
        full = F.cross_entropy(model(x).reshape(-1, 64), y.reshape(-1), ignore_index=IGNORE)
        torch.testing.assert_close(scored_loss(model, x, y), full)
    model.train()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.grad is not None)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_rwkv_mixer_is_the_aviary_model(version):
    """With its MLP, the MQAR model is exactly the Aviary model (same logits); without it, the chunked and the
    recurrent backends give the same logits."""
    full = RWKVMixer(version, 64, 100, mlp=True, seed=2)
    x = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(full(x), full.rwkv(x)[0], rtol=1e-5, atol=1e-5)
        chunked = RWKVMixer(version, 64, 100, seed=2)
        recurrent = RWKVMixer(version, 64, 100, seed=2, backend="recurrent")
        torch.testing.assert_close(chunked(x), recurrent(x), rtol=1e-5, atol=1e-5)
    assert not hasattr(chunked.rwkv.blocks[0], "ffn")


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'rwkv8'"):
        build_model("rwkv8", 32, 64, 16)


def _result(model, d, T, lr, acc):
    return MQARResult(model, d, T, T // 16, lr, 10, acc, 1.0, 1.0, [(10, acc)])


def test_best_by_cell_table_and_figure(tmp_path):
    results = [_result("rwkv7", 64, 128, 1e-3, 0.5), _result("rwkv7", 64, 128, 3e-3, 0.9),
               _result("rwkv4", 64, 128, 1e-3, 0.2), _result("rwkv4", 128, 128, 1e-3, 0.7)]
    best = {(r.model, r.d_model): r.accuracy for r in best_by_cell(results)}
    assert best == {("rwkv7", 64): 0.9, ("rwkv4", 64): 0.2, ("rwkv4", 128): 0.7}
    write_table(results, tmp_path / "t.json")
    write_table(results, tmp_path / "t.csv")
    data = json.loads((tmp_path / "t.json").read_text())
    assert len(data["runs"]) == 4 and len(data["best"]) == 3
    assert (tmp_path / "t.csv").read_text().splitlines()[0].startswith("model,d_model,seq_len")
    plot(results, tmp_path / "one.png")                               # two widths: lines
    plot(results[:3], tmp_path / "two.png")                           # one width: bars
    assert (tmp_path / "one.png").stat().st_size > 1000 and (tmp_path / "two.png").stat().st_size > 1000


def test_command_line(tmp_path, capsys):
    main(["--preset", "smoke", "--steps", "5", "--models", "rwkv5,attention", "--out-dir", str(tmp_path), "-q",
          "--jobs", "2"])                                              # two worker processes
    out = capsys.readouterr().out
    assert "Attention" in out and "Eagle (RWKV-5)" in out
    assert {p.name for p in tmp_path.iterdir()} == {"mqar.csv", "mqar.json", "mqar.png", "mqar-rwkv5-d64-T32.log",
                                                     "mqar-attention-d64-T32.log"}   # each worker's progress
    assert "attention d=64 T=32" in (tmp_path / "mqar-attention-d64-T32.log").read_text()
    with pytest.raises(SystemExit):
        main(["--models", "gpt5"])
