"""One-token WKV steps in C (`aviary.cpu.steps`) against the torch steps in aviary.ops, and RWKV-7's one-token
time-mix tail in C against the module's torch path. Each test runs once per instruction set (conftest.py)."""

import pytest
import torch

from aviary.cpu import reference_only, steps
from aviary.cpu.threads import small_ops_on_one_thread
from aviary.loading import model_from_state_dict
from aviary.ops.delta import delta_rule_step
from aviary.ops.gla import gla_step
from aviary.testing import random_config, random_state_dict
from kernel_isas import built


def _step_inputs(B, H, K, V, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    return dict(r=rnd(B, 1, H, K), k=rnd(B, 1, H, K), v=rnd(B, 1, H, V), logw=-torch.exp(rnd(B, 1, H, K)),
                a=rnd(B, 1, H, K) * 0.2, b=rnd(B, 1, H, K) * 0.2, u=rnd(H, K), state=rnd(B, H, K, V))


def _f64(d):
    return {n: t.double() for n, t in d.items()}


@built
@pytest.mark.parametrize("B,H,K,V", [(1, 1, 1, 1), (1, 12, 64, 64), (3, 2, 5, 7), (2, 3, 64, 17), (16, 4, 32, 32)])
def test_c_wkv_steps_match_the_torch_steps(B, H, K, V):
    d = _step_inputs(B, H, K, V, seed=B * 100 + K)
    assert steps.steps_available(d["state"], d["r"])
    e = _f64(d)
    with small_ops_on_one_thread():  # a decode step: (16, 4, 32, 32) is big enough for the worker threads
        _check_steps(d, e, B, H, K)
    assert d["state"].equal(_step_inputs(B, H, K, V, seed=B * 100 + K)["state"])  # the input state is untouched


def _check_steps(d, e, B, H, K):
    for lw_c, lw_ref in ((d["logw"], e["logw"]), (d["logw"][:1, :, :, :], e["logw"][:1])):  # own and broadcast
        y, S = steps.gla_step(d["r"], d["k"], d["v"], lw_c, d["u"], d["state"])
        y_ref, S_ref = gla_step(e["r"], e["k"], e["v"], lw_ref.expand(B, 1, H, K), e["u"], e["state"])
        torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(S.double(), S_ref, atol=1e-5, rtol=1e-5)
    y, S = steps.delta_rule_step(d["r"], d["logw"], d["k"], d["v"], d["a"], d["b"], d["state"])
    y_ref, S_ref = delta_rule_step(e["r"], e["logw"], e["k"], e["v"], e["a"], e["b"], e["state"])
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S.double(), S_ref, atol=1e-5, rtol=1e-5)


@built
def test_c_wkv_steps_read_strided_states_and_step_aside_when_they_should():
    d = _step_inputs(2, 3, 8, 8, seed=5)
    layers = torch.stack([d["state"], d["state"] * 2], dim=1)  # [B, L, ...]: layer 1's slice is strided
    y, S = steps.gla_step(d["r"], d["k"], d["v"], d["logw"], d["u"], layers[:, 1])
    y_ref, S_ref = gla_step(d["r"], d["k"], d["v"], d["logw"], d["u"], layers[:, 1].contiguous())
    torch.testing.assert_close(S, S_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert not steps.steps_available(d["state"].double(), d["r"].double())
    assert not steps.steps_available(d["state"].requires_grad_(True), d["r"])
    with reference_only():
        assert not steps.steps_available(layers, d["r"])


@built
def test_c_wkv_steps_write_into_out_even_when_it_is_the_input():
    d = _step_inputs(2, 3, 8, 8, seed=9)
    y_ref, S_ref = steps.delta_rule_step(d["r"], d["logw"], d["k"], d["v"], d["a"], d["b"], d["state"])
    state = d["state"].clone()
    y, S = steps.delta_rule_step(d["r"], d["logw"], d["k"], d["v"], d["a"], d["b"], state, out=state)
    assert S.data_ptr() == state.data_ptr()
    torch.testing.assert_close(S, S_ref, atol=0, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    state = d["state"].clone()
    y, S = steps.gla_step(d["r"], d["k"], d["v"], d["logw"], d["u"], state, out=state)
    y_ref, S_ref = steps.gla_step(d["r"], d["k"], d["v"], d["logw"], d["u"], d["state"])
    assert S.data_ptr() == state.data_ptr()
    torch.testing.assert_close(S, S_ref, atol=0, rtol=0)
    strided = torch.empty(2, 2, 3, 8, 8)[:, 0]  # not contiguous: ignored, a new tensor comes back
    _, S = steps.gla_step(d["r"], d["k"], d["v"], d["logw"], d["u"], d["state"], out=strided)
    assert S.data_ptr() != strided.data_ptr()
    torch.testing.assert_close(S, S_ref, atol=0, rtol=0)


# ---- RWKV-7's one-token time-mix tail in C against the module's torch path ----------------------------

@built
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("head_size", [64, 24])
def test_rwkv7_tail_matches_the_time_mix(layer, head_size, monkeypatch):
    C = 192
    model = model_from_state_dict(random_state_dict(random_config(7, n_layer=2, n_embd=C, vocab_size=50,
                                                                  head_size=head_size)))
    att = model.blocks[layer].att
    B, H, N = 3, C // head_size, head_size
    g = torch.Generator().manual_seed(layer * 7 + head_size)
    x, sx, v_first = (torch.randn(B, 1, C, generator=g) for _ in range(3))
    wkv = torch.randn(B, H, N, N, generator=g) * 0.3
    wkv_before = wkv.clone()
    calls = []
    real = steps.rwkv7_tail
    monkeypatch.setattr(steps, "rwkv7_tail", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        out_state = torch.empty_like(wkv)
        y, S, vf = att(x, sx, wkv, None if layer == 0 else v_first, "recurrent", out_state)
        assert calls and S.data_ptr() == out_state.data_ptr()
        with reference_only():  # the module's torch path, the reference
            y_ref, S_ref, vf_ref = att(x, sx, wkv, None if layer == 0 else v_first, "recurrent")
    assert len(calls) == 1
    assert float(y_ref.abs().max()) > 0.1 and float((S_ref - wkv).abs().max()) > 0.01  # not trivially zero
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(S, S_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vf, vf_ref)
    assert torch.equal(wkv, wkv_before)  # the input state is untouched
