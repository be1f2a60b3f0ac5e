"""Packed (oneDNN) linears and the decode thread split: against the plain model, which is their reference."""

import pytest
import torch
import torch.nn as nn

import aviary
from aviary._threads import all_threads, small_ops_on_one_thread
from aviary.loading import model_from_state_dict
from aviary.packed import PackedLinear, pack_model, packing_available
from aviary.testing import random_config, random_state_dict, save_random_checkpoint

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN packed linear")


def _pair(version, dtype=torch.float32, seed=0):
    sd = random_state_dict(random_config(version, n_layer=2, n_embd=128, vocab_size=300), seed=seed)
    plain = model_from_state_dict(sd).to(dtype)
    packed = model_from_state_dict(sd).to(dtype)
    assert packed.pack() > 0
    return plain, packed


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_packed_model_matches_plain_model_prefill_and_decode(version):
    plain, packed = _pair(version)
    toks = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, ref_state = plain(toks[:, :8])
        out, state = packed(toks[:, :8])
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(state.wkv, ref_state.wkv, atol=1e-4, rtol=1e-4)
        for t in range(8, 11):  # one-token steps: the recurrent path with the thread split
            ref, ref_state = plain(toks[:, t:t + 1], ref_state)
            out, state = packed(toks[:, t:t + 1], state)
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(state.shift, ref_state.shift, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(state.wkv, ref_state.wkv, atol=1e-4, rtol=1e-4)


def test_packed_bf16_matches_plain_bf16():
    plain, packed = _pair(7, torch.bfloat16)
    toks = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref, _ = plain(toks)
        out, _ = packed(toks)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_packed_linear_keeps_the_weight_and_state_dict():
    lin = nn.Linear(64, 40, bias=False)
    p = PackedLinear.from_linear(lin)
    assert torch.equal(p.weight, lin.weight.detach())
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(p(x), lin(x).detach(), atol=1e-5, rtol=1e-5)
    plain, packed = _pair(6)
    assert packed.state_dict().keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(packed.state_dict()[k], v), k
    other = model_from_state_dict(random_state_dict(random_config(6, n_layer=2, n_embd=128, vocab_size=300), seed=9))
    packed.load_state_dict(other.state_dict())  # repacks every weight
    toks = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(packed(toks)[0], other(toks)[0], atol=1e-4, rtol=1e-4)


def test_packed_linear_rejects_shape_mismatch_and_wrong_input():
    p = PackedLinear(torch.randn(8, 4))
    with pytest.raises(RuntimeError, match="size mismatch"):
        p.load_state_dict({"weight": torch.randn(4, 8)})
    with pytest.raises(RuntimeError, match="bfloat16 input"):
        p(torch.randn(2, 4).bfloat16())
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        PackedLinear(torch.randn(8, 4).double())


def test_packed_model_refuses_gradients_with_a_clear_error():
    _, packed = _pair(7)
    assert not any(p.requires_grad for p in packed.parameters())
    packed.requires_grad_(True)
    with pytest.raises(RuntimeError, match="pack=False"):
        packed(torch.tensor([[1, 2]]))


def test_load_packs_by_default_and_not_when_asked(tmp_path):
    path = tmp_path / "m.pth"
    save_random_checkpoint(path, random_config(7, n_layer=2, n_embd=128, vocab_size=300))
    fast = aviary.load(path)
    assert isinstance(fast.head, PackedLinear) and fast.split_decode_threads
    plain = aviary.load(path, pack=False)
    assert isinstance(plain.head, nn.Linear) and not plain.split_decode_threads
    assert any(p.requires_grad for p in plain.parameters())
    q = aviary.load(path, quantize="int8")  # int8 block linears and head: nothing left to pack
    assert pack_model(q) == 0 and q.split_decode_threads
    half = model_from_state_dict(random_state_dict(random_config(7, n_layer=2, n_embd=128, vocab_size=300)))
    half.quantize(head=False)  # the head is still a plain Linear: it must keep all threads
    assert not half.split_decode_threads
    half.pack()
    assert half.split_decode_threads


def test_thread_split_restores_the_count_even_on_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        with small_ops_on_one_thread():
            seen.append(torch.get_num_threads())
            with all_threads():
                seen.append(torch.get_num_threads())
            seen.append(torch.get_num_threads())
        assert seen == [1, 2, 1] and torch.get_num_threads() == 2
        with pytest.raises(KeyError), small_ops_on_one_thread():
            raise KeyError("boom")
        assert torch.get_num_threads() == 2
        with all_threads():  # outside the split: changes nothing
            assert torch.get_num_threads() == 2
        _, packed = _pair(7)
        with torch.inference_mode():
            packed(torch.tensor([[3]]))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
