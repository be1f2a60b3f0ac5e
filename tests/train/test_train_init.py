"""The official initialisation (reference section 8.1), optimizer groups (8.2), LR schedule (8.3) and L2Wrap
(8.4): exact values of the per-channel schedules, statistics of the random matrices."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aviary.model import RWKV
from aviary.train.init import init_model, model_config
from aviary.train.optim import L2Wrap, lr_at, param_groups

L, C, V = 3, 128, 500


def build(version: int, lr_init: float = 6e-4) -> RWKV:
    return init_model(RWKV(model_config(version, L, C, V)), seed=0, lr_init=lr_init)


def ratios(i):
    return i / (L - 1), 1 - i / L, torch.arange(C, dtype=torch.float64) / C


def close(p, expected):
    torch.testing.assert_close(p.detach().double().flatten(), expected.double().flatten().expand(p.numel()),
                               atol=1e-6, rtol=1e-6)


def is_orthogonal(w, gain):
    """Rows (or columns, for a tall matrix) orthonormal up to `gain`."""
    w = w.detach().double()
    m = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return torch.allclose(m, gain**2 * torch.eye(m.shape[0], dtype=torch.float64), atol=1e-4 * max(1, gain**2))


@pytest.mark.parametrize(("C", "ranks"), [(128, (32, 32, 32, 64)), (768, (64, 64, 32, 128)),
                                         (2048, (128, 128, 64, 224))])
def test_new_model_default_sizes_follow_the_reference(C, ranks):
    # RWKV-7 LoRA ranks max(32, round(k*sqrt(C)/32)*32), k = 2.5 / 2.5 / 1.7 / 5 (w / a / v / g): RWKV-LM
    # `RWKV-v7/train_temp/src/model.py` as of 2026-08. Its earlier rule (1.8 / 1.8 / 1.3, gate 0.6*C^0.8) gave
    # (32, 32, 32, 32) at C = 128 and (96, 96, 64, 256) at 2048; both give the same at 768.
    c7 = model_config(7, 2, C)
    assert (c7.rank_w, c7.rank_a, c7.rank_v, c7.rank_g) == ranks and c7.dim_ffn == 4 * C and c7.head_size == 64
    c6 = model_config(6, 2, C)
    assert (c6.rank_mix, c6.rank_decay, c6.dim_ffn) == (32, 64, int(3.5 * C) // 32 * 32)
    assert model_config(5, 2, C, dim_ffn=96).dim_ffn == 96
    c4 = model_config(4, 2, C)
    assert (c4.head_size, c4.dim_ffn, c4.rank_w) == (C, 4 * C, 0)
    big = model_config(6, 2, 4096)
    assert (big.rank_mix, big.rank_decay) == (64, 128)


def test_v7_per_channel_schedules():
    m = build(7)
    n = torch.arange(C, dtype=torch.float64)
    linear = n / (C - 1) - 0.5
    z = ((n % 64) - 31.5) / 31.5
    zigzag = z * z.abs()
    for i, b in enumerate(m.blocks):
        r01, r1a0, ddd = ratios(i)
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            close(getattr(b.att, name), 1 - ddd ** (power * r1a0))
        www = -6 + 6 * (n / (C - 1)) ** (1 + r01**0.3)
        close(b.att.w0, www + 0.5 + 2.5 * zigzag)
        close(b.att.a0, -0.19 + 0.3 * zigzag + 0.4 * linear)
        close(b.att.v0, 0.73 - 0.4 * linear)
        close(b.att.k_k, 0.71 - 0.1 * linear)
        close(b.att.k_a, torch.tensor(1.02))
        close(b.att.r_k, torch.tensor(-0.04))
        close(b.att.ln_x.weight, torch.tensor(((1 + i) / L) ** 0.7))
        close(b.ffn.x_k, 1 - ddd ** (r1a0**4))
        for name in ("w1", "a1", "v1", "g1"):
            assert not getattr(b.att, name).any()
        for name in ("w2", "a2", "v2", "g2"):
            assert is_orthogonal(getattr(b.att, name), 0.1)
        assert not b.att.output.weight.any() and not b.ffn.value.weight.any()
        assert is_orthogonal(b.att.receptance.weight, 1) and is_orthogonal(b.att.key.weight, 0.1)
        assert is_orthogonal(b.att.value.weight, 1) and is_orthogonal(b.ffn.key.weight, 1)


@pytest.mark.parametrize("version", [5, 6, 7])
def test_emb_head_and_norms(version):
    m = build(version)
    assert m.emb.weight.abs().max() <= 1e-4 and m.emb.weight.std() > 5e-5  # U(-1e-4, 1e-4): std 5.8e-5
    assert is_orthogonal(m.head.weight, 0.5 * math.sqrt(V / C))
    assert torch.equal(m.ln_out.weight, torch.ones(C)) and not m.ln_out.bias.any()


def test_v5_v6_decay_and_bonus():
    n = torch.arange(C, dtype=torch.float64)
    for version in (5, 6):
        m = build(version)
        for i, b in enumerate(m.blocks):
            r01, r1a0, ddd = ratios(i)
            close(b.att.time_decay, -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r01))
            close(b.att.time_faaaa, r01 * (1 - n / (C - 1)) + 0.1 * ((n + 1) % 3 - 1))
            close(b.att.ln_x.weight, torch.tensor(((1 + i) / L) ** 0.7))
            assert is_orthogonal(b.att.gate.weight, 0.1) and not b.ffn.receptance.weight.any()
            if version == 5:
                close(b.att.time_mix_v, ddd**r1a0 + 0.3 * r01)
                close(b.att.time_mix_g, ddd ** (0.5 * r1a0))
            else:
                close(b.att.time_maa_v, 1 - (ddd**r1a0 + 0.3 * r01))
                close(b.att.time_maa_x, 1 - ddd**r1a0)
                close(b.ffn.time_maa_k, 1 - ddd ** (r1a0**3))
                assert not b.att.time_maa_w1.any() and b.att.time_maa_w2.abs().max() <= 0.01
                assert b.att.time_decay_w2.abs().max() <= 0.01 and b.att.time_decay_w2.std() > 0.004


def test_v4_schedules_and_matrices():
    m = build(4, lr_init=6e-4)
    h = torch.arange(C, dtype=torch.float64)
    for i, b in enumerate(m.blocks):
        r01, r1a0, ddd = ratios(i)
        close(b.att.time_decay, -5 + 8 * (h / (C - 1)) ** (0.7 + 1.3 * r01))
        close(b.att.time_first, math.log(0.3) + 0.5 * ((h + 1) % 3 - 1))
        close(b.att.time_mix_r, ddd ** (0.5 * r1a0))
        for lin in (b.att.key, b.att.receptance, b.att.output, b.ffn.value, b.ffn.receptance):
            assert not lin.weight.any()
        assert is_orthogonal(b.ffn.key.weight, 2.0)  # 4C x C: gain sqrt(rows/cols)
    assert m.emb.weight.abs().max() <= 6e-4  # v4neo: U(-lr_init, lr_init)


def test_init_is_deterministic():
    a, b = build(7).state_dict(), build(7).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def groups_by_name(model, wd=0.1):
    return {n: (g["lr_scale"], g["weight_decay"]) for g in param_groups(model, wd) for n in g["names"]}


def test_v7_optimizer_groups():
    g = groups_by_name(build(7))
    assert g["blocks.1.att.w0"] == (2.0, 0.0)
    decayed = {n for n, (_, wd) in g.items() if wd}
    assert decayed == {n for n in g if n.endswith(".weight") and (
        n in ("emb.weight", "head.weight") or any(s in n for s in (".receptance.", ".key.", ".value.", ".output.")))}
    for n in ("blocks.0.att.w1", "blocks.0.att.a2", "blocks.0.ln1.weight", "blocks.0.att.ln_x.weight",
              "blocks.0.att.x_r", "blocks.0.att.k_k"):
        assert g[n] == (1.0, 0.0), n
    assert set(groups_by_name(build(7), wd=0).values()) == {(1.0, 0.0), (2.0, 0.0)}


def test_v4_v6_optimizer_groups():
    g6 = groups_by_name(build(6))
    assert g6["blocks.0.att.time_decay"] == (2.0, 0.0)
    assert g6["blocks.0.att.time_decay_w1"] == (1.0, 0.0)  # rule "_w1" comes first
    assert g6["blocks.0.att.time_faaaa"] == (1.0, 0.0) and g6["blocks.0.att.time_maa_k"] == (1.0, 0.0)
    assert g6["blocks.0.att.gate.weight"] == (1.0, 0.1) and g6["emb.weight"] == (1.0, 0.1)
    assert g6["blocks.0.ln2.weight"] == (1.0, 0.0)
    g4 = groups_by_name(build(4))
    assert g4["blocks.0.att.time_first"] == (3.0, 0.0) and g4["blocks.0.att.time_decay"] == (2.0, 0.0)


def test_lr_schedule():
    kw = dict(total_steps=110, lr_init=1e-3, lr_final=1e-4, warmup_steps=10)
    assert lr_at(0, **kw) == pytest.approx(1e-5)  # 0.01 * lr_init
    assert lr_at(5, **kw) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(0.55e-3)  # cosine midpoint: (lr_init + lr_final) / 2
    assert lr_at(110, **kw) == pytest.approx(1e-4) and lr_at(500, **kw) == pytest.approx(1e-4)
    assert lr_at(60, schedule="exponential", **kw) == pytest.approx(math.sqrt(1e-3 * 1e-4))


def test_l2wrap_gradient_and_scaling():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, requires_grad=True)
    y = torch.randint(0, 7, (2, 3))
    loss = F.cross_entropy(logits.view(-1, 7), y.view(-1))
    (ce_grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    out = L2Wrap.apply(loss, logits, 1e-2)
    assert out.item() == loss.item()
    (grad,) = torch.autograd.grad(out * 0.5, logits)  # a scaled loss scales the L2 term as well
    maxx, ids = logits.detach().max(-1, keepdim=True)
    extra = torch.zeros_like(logits).scatter_(-1, ids, maxx * 1e-2 / 6)
    torch.testing.assert_close(grad, 0.5 * (ce_grad + extra))


def test_model_config_takes_explicit_lora_ranks():
    assert model_config(7, 2, 128).rank_g == 64  # RWKV-LM's current default at C=128
    c = model_config(7, 2, 128, rank_g=32, rank_w=0)  # 0: the default
    assert (c.rank_w, c.rank_g) == (model_config(7, 2, 128).rank_w, 32)
    with pytest.raises(ValueError, match="no LoRA rank 'rank_mix'"):
        model_config(7, 2, 128, rank_mix=16)
