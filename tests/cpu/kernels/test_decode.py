"""Whole models decoding with the kernels: one-token steps equal the reference path, the decode thread split,
in-place decode, and the layout of the states it writes into. Each test runs once per instruction set
(conftest.py)."""

import pytest
import torch
import torch.nn as nn

import aviary
from aviary import cpu
from aviary.cpu import Linear, reference_only
from aviary.cpu.threads import all_threads, small_ops_on_one_thread
from aviary.loading import model_from_state_dict
from aviary.testing import random_config, random_state_dict, save_random_checkpoint


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
    assert not cpu.can_split_threads(model)


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


def test_states_from_init_cat_select_and_expand_are_layer_major():
    from aviary.state import RWKVState

    model = model_from_state_dict(random_state_dict(random_config(6, n_layer=3, n_embd=64, vocab_size=100)))
    with torch.no_grad():
        _, a = model(torch.tensor([[1, 2]]))
        _, b = model(torch.tensor([[3, 4], [5, 6]]))
    made = {"init": model.init_state(4), "cat": RWKVState.cat([a, b, a]),
            "select": RWKVState.cat([a, b]).select([2, 0]), "expand": a.expand(3)}
    for name, st in made.items():
        assert all(st.wkv[:, i].is_contiguous() and st.shift[:, i].is_contiguous() for i in range(3)), name
    torch.testing.assert_close(made["cat"].wkv, torch.cat([a.wkv, b.wkv, a.wkv]))
    torch.testing.assert_close(made["select"].wkv, torch.cat([b.wkv[1:], a.wkv]))
    torch.testing.assert_close(made["expand"].shift, a.shift.expand(3, -1, -1, -1))


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_inplace_decode_of_a_batch_major_state(version):
    model = model_from_state_dict(random_state_dict(random_config(version, n_layer=2, n_embd=128, vocab_size=300)))
    with torch.no_grad():
        _, st = model(torch.tensor([[1, 2], [3, 4]]))
        batch_major = type(st)(st.version, st.shift.contiguous(), st.wkv.contiguous())
        assert not batch_major.wkv[:, 1].is_contiguous()
        ref, ref_state = model(torch.tensor([[5], [6]]), st)
        out, same = model(torch.tensor([[5], [6]]), batch_major, inplace=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(same.wkv, ref_state.wkv, atol=1e-5, rtol=1e-5)


def test_expanded_and_initial_states_are_copies_that_inplace_decode_cannot_reach(tmp_path):
    path = tmp_path / "tuned.pth"
    save_random_checkpoint(path, random_config(7, n_layer=2, n_embd=128, vocab_size=300), time_state=True)
    model = aviary.load(path)
    tuned = model.initial_wkv.clone()
    with torch.no_grad():
        state = model.init_state(1)
        model(torch.tensor([[1]]), state, inplace=True)
        assert torch.equal(model.initial_wkv, tuned)  # the model's state-tuned start is not the state's memory
        one = state.clone()
        copy = one.expand(1)
        model(torch.tensor([[2]]), copy, inplace=True)
        assert torch.equal(one.wkv, state.wkv) and not torch.equal(copy.wkv, one.wkv)
