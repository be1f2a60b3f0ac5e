"""RWKV-4 parity with transformers' `RwkvForCausalLM`, on a random official checkpoint converted with
`aviary convert` to the hf-rwkv4 layout and loaded with `from_pretrained` (offline)."""

import pytest
import torch

import aviary
from aviary.cli import main
from aviary.io.names import from_official
from aviary.testing import random_config, save_random_checkpoint

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.oracle
ATOL = 1e-4  # fp32; logits and state values are of magnitude ~1-10


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(aviary model, transformers model) from the same random weights; C=96 is not a power of two."""
    tmp = tmp_path_factory.mktemp("rwkv4")
    save_random_checkpoint(tmp / "rwkv4.pth", random_config(4, n_layer=3, n_embd=96, vocab_size=300), seed=3)
    assert main(["convert", str(tmp / "rwkv4.pth"), str(tmp / "hf")]) == 0
    hf = transformers.RwkvForCausalLM.from_pretrained(tmp / "hf").eval()
    assert hf.config.rescale_every == 0  # convert writes no fp32 rescale: it would perturb LayerNorm eps
    return aviary.load(tmp / "rwkv4.pth"), hf


def tokens(B, T, seed=0):
    return torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_state_as_ours(state):
    """transformers: 5 tensors [B, C, L] = ffn shift, att shift, aa, bb, pp.
    Ours: shift [B, L, 2, C] (att, ffn), wkv [B, L, 3, C] (aa, bb, pp), the same e^{-pp} scaling."""
    ffn, att, aa, bb, pp = (s.permute(0, 2, 1) for s in state)
    return torch.stack([att, ffn], dim=2), torch.stack([aa, bb, pp], dim=2)


def test_converted_names_and_shapes_match_transformers(pair):
    model, hf = pair
    ours = from_official(model.state_dict(), "hf-rwkv4")
    theirs = hf.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@torch.no_grad()
def test_logits_and_final_state_match(pair):
    model, hf = pair
    x = tokens(2, 29)
    out = hf(x, use_cache=True)
    logits, state = model(x)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=ATOL)
    shift, wkv = hf_state_as_ours(out.state)
    torch.testing.assert_close(state.shift, shift, rtol=0, atol=ATOL)
    torch.testing.assert_close(state.wkv, wkv, rtol=1e-5, atol=ATOL)


@torch.no_grad()
def test_continuing_from_the_state_matches(pair):
    model, hf = pair
    x = tokens(1, 20, seed=1)
    out = hf(x[:, :13], use_cache=True)
    _, state = model(x[:, :13])
    rest_hf = hf(x[:, 13:], state=out.state, use_cache=True).logits
    rest, _ = model(x[:, 13:], state)
    torch.testing.assert_close(rest, rest_hf, rtol=0, atol=ATOL)
