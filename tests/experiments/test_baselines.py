"""The comparison models of the experiments: Mamba's fast scan against the reference recurrence and against
`transformers`' MambaModel, and the Transformer's causality and position handling."""

import pytest
import torch

from aviary.experiments.baselines import Mamba, Transformer, selective_scan, selective_scan_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scan_inputs(dtype, Bt=2, T=9, Di=5, N=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(Bt, T, Di, generator=g, dtype=dtype),
            torch.rand(Bt, T, Di, generator=g, dtype=dtype) * 2,          # dt > 0 (after softplus)
            -torch.rand(Di, N, generator=g, dtype=dtype) * 4,             # A < 0
            torch.randn(Bt, T, N, generator=g, dtype=dtype),
            torch.randn(Bt, T, N, generator=g, dtype=dtype)]


def test_selective_scan_matches_reference_values_and_gradients():
    args = [a.requires_grad_() for a in _scan_inputs(torch.float64)]
    assert torch.autograd.gradcheck(selective_scan, args)
    fast = selective_scan(*args)
    ref = selective_scan_reference(*args)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    gy = torch.randn_like(fast)
    g_fast = torch.autograd.grad(fast, args, gy)
    g_ref = torch.autograd.grad(ref, args, gy)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_mamba_equals_transformers_mamba():
    from transformers import MambaConfig, MambaModel

    model = Mamba(300, 32, 2, seed=3)
    ref = MambaModel(MambaConfig(vocab_size=300, hidden_size=32, state_size=16, num_hidden_layers=2, expand=2,
                                 conv_kernel=4, use_cache=False))
    ref.load_state_dict(model.backbone.state_dict())
    ref.eval()
    x = torch.randint(0, 300, (3, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.hidden(x), ref(input_ids=x).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert model.forward(x).shape == (3, 21, 300)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_transformer_is_causal(pos):
    model = Transformer(50, 32, 2, n_head=2, max_len=16, pos=pos).eval()
    x = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 50                       # change the future
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :7], model(y)[:, :7])
        assert not torch.allclose(model(x)[:, 7:], model(y)[:, 7:])


def test_transformer_positions():
    learned = Transformer(50, 32, 1, max_len=8, pos="learned")
    with pytest.raises(ValueError, match="past this Transformer's 8 learned positions"):
        learned(torch.zeros(1, 9, dtype=torch.long))
    rope = Transformer(50, 32, 1, n_head=2, max_len=8, pos="rope")
    assert rope(torch.zeros(1, 20, dtype=torch.long)).shape == (1, 20, 50)   # rotary runs past max_len
    with pytest.raises(ValueError, match="pos must be"):
        Transformer(50, 32, 1, pos="alibi")
    with pytest.raises(ValueError, match="heads"):
        Transformer(50, 30, 1, n_head=4)


def test_seeded_construction_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = Transformer(50, 32, 1, seed=7)
    after = torch.rand(1)
    b = Transformer(50, 32, 1, seed=7)
    assert torch.equal(before, after)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
