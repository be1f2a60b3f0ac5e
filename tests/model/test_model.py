"""Model-level invariants, for every version: the parallel form, the recurrent form and split prefill
agree; a batch equals its rows run alone; gradients of the parallel form equal the reference's."""

import pytest
import torch

from aviary.loading import model_from_state_dict
from aviary.model.rescale import apply_rescale
from aviary.testing import random_config, random_state_dict

VERSIONS = [4, 5, 6, 7]
ATOL = 2e-5  # fp32, logits of magnitude ~4


def make_model(version, seed=0, **kw):
    cfg = random_config(version, n_layer=kw.pop("n_layer", 2), n_embd=kw.pop("n_embd", 128), **kw)
    return model_from_state_dict(random_state_dict(cfg, seed=seed))


def tokens(B, T, V=300, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=VERSIONS, ids=lambda v: f"v{v}")
def model(request):
    return make_model(request.param)


@torch.no_grad()
def test_parallel_equals_recurrent(model):
    x = tokens(2, 37)
    model.backend = "chunked"
    logits_p, state_p = model(x)
    model.backend = "recurrent"
    logits_r, state_r = model(x)
    model.backend = "chunked"
    torch.testing.assert_close(logits_p, logits_r, rtol=0, atol=ATOL)
    torch.testing.assert_close(state_p.shift, state_r.shift, rtol=0, atol=ATOL)
    torch.testing.assert_close(state_p.wkv, state_r.wkv, rtol=1e-4, atol=ATOL)


@torch.no_grad()
def test_token_by_token_equals_sequence(model):
    x = tokens(2, 19)
    logits, state = model(x)
    s, outs = None, []
    for t in range(x.shape[1]):
        out, s = model(x[:, t:t + 1], s)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(s.wkv, state.wkv, rtol=1e-4, atol=ATOL)


@torch.no_grad()
@pytest.mark.parametrize("split", [1, 16, 30])
def test_split_prefill_equals_one_call(model, split):
    x = tokens(1, 31)
    logits, state = model(x)
    first, mid = model(x[:, :split])
    rest, end = model(x[:, split:], mid)
    torch.testing.assert_close(torch.cat([first, rest], 1), logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(end.shift, state.shift, rtol=0, atol=ATOL)


@torch.no_grad()
def test_forward_does_not_modify_the_state_passed_in(model):
    x = tokens(1, 8)
    _, s = model(x)
    before = s.clone()
    model(x, s)
    torch.testing.assert_close(s.wkv, before.wkv, rtol=0, atol=0)
    torch.testing.assert_close(s.shift, before.shift, rtol=0, atol=0)


@torch.no_grad()
def test_batch_equals_single_rows(model):
    x = tokens(3, 21, seed=5)
    logits, state = model(x)
    for i in range(3):
        li, si = model(x[i:i + 1])
        torch.testing.assert_close(li, logits[i:i + 1], rtol=0, atol=ATOL)
        torch.testing.assert_close(si.wkv, state.select(i).wkv, rtol=1e-4, atol=ATOL)


@torch.no_grad()
def test_last_only_returns_last_position(model):
    x = tokens(2, 9)
    logits, _ = model(x)
    last, _ = model(x, last_only=True)
    assert last.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(last[:, 0], logits[:, -1], rtol=0, atol=ATOL)


@pytest.mark.parametrize("version", VERSIONS)
def test_parallel_gradients_equal_reference_gradients(version):
    model = make_model(version, n_layer=2, n_embd=64, head_size=32)
    x = tokens(2, 20)
    target = tokens(2, 20, seed=1)
    grads = {}
    for backend in ("recurrent", "chunked"):
        model.zero_grad()
        model.backend = backend
        logits, _ = model(x)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["recurrent"].keys() == grads["chunked"].keys()
    assert len(grads["chunked"]) > 10
    for name, g in grads["recurrent"].items():
        # fp32 sums in a different order: bound the error relative to the gradient's own scale
        err = (grads["chunked"][name] - g).abs().max().item()
        assert err <= 1e-4 * g.abs().max().item() + 1e-7, f"gradient of {name}: max error {err:.2e}"


@pytest.mark.parametrize("version", VERSIONS)
@torch.no_grad()
def test_bfloat16_close_to_float32(version):
    """bf16 weights and activations (wkv math and state stay fp32). Measured max |dlogit| on these
    random models is 0.02-0.06 for logits of magnitude ~4; the bound below leaves a margin."""
    model = make_model(version)
    x = tokens(1, 24)
    ref, _ = model(x)
    low, _ = model.to(torch.bfloat16)(x)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.15


@pytest.mark.parametrize("version", [4, 5, 6])
@torch.no_grad()
def test_layer_rescale_leaves_logits_unchanged(version):
    model = make_model(version, n_layer=4)
    x = tokens(1, 12)
    ref, _ = model(x)
    apply_rescale(model, 2)
    out, _ = model(x)
    # exact up to LayerNorm eps (the halved residual meets eps=1e-5 in ln1/ln2/ln_out)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-3)


def test_rwkv7_refuses_layer_rescale():
    with pytest.raises(ValueError, match="no layer-rescale"):
        apply_rescale(make_model(7), 6)


@pytest.mark.parametrize("bad", [torch.tensor([[0, 300]]), torch.tensor([[-1]])])
def test_tokens_outside_vocabulary_are_rejected(bad):
    with pytest.raises(ValueError, match=f"token id {bad.flatten()[-1].item()} is outside"):
        make_model(7)(bad)


def test_empty_or_float_tokens_are_rejected():
    model = make_model(5)
    with pytest.raises(ValueError, match="T >= 1"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 3))


def test_each_version_file_declares_its_spec():
    from aviary.model import VERSIONS, v4, v5, v6, v7

    assert VERSIONS == {4: v4.SPEC, 5: v5.SPEC, 6: v6.SPEC, 7: v7.SPEC}
    for version, spec in VERSIONS.items():
        assert spec.version == spec.cpu_block.version == version
        model = make_model(version)
        assert model.spec is spec and isinstance(model.blocks[1].att, spec.time_mix)
        assert model.init_state(3).wkv.shape == (3, model.config.n_layer, *spec.wkv_shape(model.config))
    assert [VERSIONS[v].supports_rescale for v in (4, 5, 6, 7)] == [True, True, True, False]


def test_the_model_package_imports_no_layer_built_on_it():
    """aviary.model is imported by generation, quantisation, training and serving; it imports none of them."""
    import subprocess
    import sys

    code = ("import sys, aviary.model; "
            "print(sorted(m for m in sys.modules if m.startswith(('aviary.train', 'aviary.generation', "
            "'aviary.quant', 'aviary.serve', 'aviary.commands', 'aviary.tokenizer'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
