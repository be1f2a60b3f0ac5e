"""Aviary's C decode kernels against their references (F.linear, the dequantised int8 product), and the
`kernels.Linear` layer and decode thread split in whole models."""

import pytest
import torch
import torch.nn as nn

import aviary
from aviary import kernels
from aviary._threads import all_threads, small_ops_on_one_thread
from aviary.kernels import Linear, reference_only
from aviary.loading import model_from_state_dict
from aviary.quant import Int8Linear, int8_linear_reference, quantize_int8
from aviary.testing import random_config, random_state_dict, save_random_checkpoint

needs = {dt: pytest.mark.skipif(not kernels.available(dt), reason=f"no C kernel for {dt} on this machine")
         for dt in (torch.float32, torch.bfloat16, torch.int8)}


def _case(dtype, out, n_in, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n_in, generator=g)
    w = torch.randn(out, n_in, generator=g)
    if dtype == torch.int8:
        q, scale = quantize_int8(w)
        return x, q, scale, int8_linear_reference(x.double(), q, scale.double())
    w = w.to(dtype)
    return x, w, None, x.double() @ w.double().t()


# sizes: not multiples of 16 or 4 (tails), exactly 16, a row block split unevenly over threads
SHAPES = [(1, 1), (5, 7), (33, 100), (64, 16), (130, 768), (1000, 96)]


DTYPES = [pytest.param(d, marks=needs[d]) for d in (torch.float32, torch.bfloat16, torch.int8)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_reference(dtype, rows, shape, threads, monkeypatch):
    out, n_in = shape
    x, w, scale, ref = _case(dtype, out, n_in, rows)
    monkeypatch.setattr(kernels, "PARALLEL_MIN_BYTES", 0 if threads > 1 else 1 << 62)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = kernels.linear(x, w, scale)
    finally:
        torch.set_num_threads(before)
    assert y.shape == (rows, out) and y.dtype == torch.float32
    tol = 1e-5 * max(1.0, float(ref.abs().max()))
    assert float((y.double() - ref).abs().max()) <= tol


@needs[torch.float32]
def test_kernel_returns_the_input_dtype_and_checks_its_arguments():
    w = torch.randn(8, 4)
    assert kernels.linear(torch.randn(2, 4).bfloat16(), w).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="do not fit"):
        kernels.linear(torch.randn(2, 5), w)
    with pytest.raises(ValueError, match="need a scale"):
        kernels.linear(torch.randn(2, 4), torch.zeros(8, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="take none"):
        kernels.linear(torch.randn(2, 4), w, torch.ones(8))
    with pytest.raises(ValueError, match="contiguous weight"):
        kernels.linear(torch.randn(2, 4), torch.randn(4, 8).t())
    with pytest.raises(ValueError, match="float32, bfloat16 or int8"):
        kernels.linear(torch.randn(2, 4), w.double())


def test_linear_is_an_nn_linear_with_the_same_gradients():
    torch.manual_seed(0)
    ref = nn.Linear(48, 40, bias=False)
    fast = Linear(48, 40, bias=False)
    fast.load_state_dict(ref.state_dict())
    assert fast.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 48, requires_grad=True)
    (fast(x) ** 2).sum().backward()  # needs a gradient: F.linear
    gx, gw = x.grad.clone(), fast.weight.grad.clone()
    x.grad = None
    (ref(x) ** 2).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, ref.weight.grad)
    with torch.no_grad():  # the kernel (where built): same numbers
        torch.testing.assert_close(fast(x.detach()[None]), ref(x.detach()[None]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_model_with_kernels_matches_reference_path(version):
    model = model_from_state_dict(random_state_dict(random_config(version, n_layer=2, n_embd=128, vocab_size=300)))
    toks = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with reference_only():
            ref, ref_state = model(toks[:, :7])
            refs = []
            for t in range(7, 10):
                lg, ref_state = model(toks[:, t:t + 1], ref_state)
                refs.append((lg, ref_state))
        out, state = model(toks[:, :7])
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        for t, (lg_ref, st_ref) in zip(range(7, 10), refs, strict=True):
            lg, state = model(toks[:, t:t + 1], state)  # one token: the kernels and the thread split
            torch.testing.assert_close(lg, lg_ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(state.shift, st_ref.shift, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(state.wkv, st_ref.wkv, atol=1e-4, rtol=1e-4)


def test_int8_layer_kernels_agree():
    lin = nn.Linear(96, 70, bias=False)
    layer = Int8Linear.from_linear(lin)
    x = torch.randn(1, 3, 96)
    with torch.no_grad():
        ref = int8_linear_reference(x, layer.weight_int8, layer.scale)
        for kernel in ("aviary", "int8pack", None):
            layer.kernel = kernel
            tol = 0.05 if kernel == "int8pack" else 1e-4  # int8pack rounds x and y to bf16
            torch.testing.assert_close(layer(x), ref, atol=tol * float(ref.abs().max()), rtol=0)


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
        model = model_from_state_dict(random_state_dict(random_config(7, n_layer=2, n_embd=128, vocab_size=300)))
        with torch.no_grad():
            model(torch.tensor([[3]]))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_thread_split_is_off_when_a_plain_linear_is_swapped_in(tmp_path):
    path = tmp_path / "m.pth"
    save_random_checkpoint(path, random_config(7, n_layer=2, n_embd=128, vocab_size=300))
    model = aviary.load(path)
    assert isinstance(model.head, Linear) and model.split_decode_threads
    model.quantize(head=False)
    assert model.split_decode_threads
    plain = nn.Linear(128, 300, bias=False)
    model.head = plain
    model._update_thread_split()
    assert not model.split_decode_threads


@pytest.mark.parametrize("version", [5, 7])
def test_inplace_decode_equals_a_fresh_state_and_reuses_it(version):
    model = model_from_state_dict(random_state_dict(random_config(version, n_layer=2, n_embd=128, vocab_size=300)))
    toks = torch.randint(0, 300, (3, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, fresh = model(toks[:, :3])
        owned = fresh.clone()
        shift_ptr, wkv_ptr = owned.shift.data_ptr(), owned.wkv.data_ptr()
        for t in range(3, 6):
            ref, fresh = model(toks[:, t:t + 1], fresh)
            out, same = model(toks[:, t:t + 1], owned, inplace=True)
            assert same is owned and owned.wkv.data_ptr() == wkv_ptr and owned.shift.data_ptr() == shift_ptr
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(owned.wkv, fresh.wkv, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(owned.shift, fresh.shift, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="inplace"):
        model(toks[:, :1], None, inplace=True)
    grad_state = fresh.clone()
    grad_state.wkv.requires_grad_(True)
    with pytest.raises(ValueError, match="no autograd"):
        model(toks[:, :1], grad_state, inplace=True)


def test_new_states_are_laid_out_layer_by_layer():
    model = model_from_state_dict(random_state_dict(random_config(7, n_layer=3, n_embd=128, vocab_size=300)))
    with torch.no_grad():
        _, state = model(torch.tensor([[1, 2], [3, 4]]))
    assert all(state.wkv[:, i].is_contiguous() and state.shift[:, i].is_contiguous() for i in range(3))
    assert state.wkv.shape[:2] == (2, 3)
