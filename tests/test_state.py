"""RWKVState is a value: clone, select, concatenate, move, save and load without changing results."""

import pytest
import torch

from aviary.loading import load_start_state, model_from_state_dict
from aviary.state import RWKVState, StateError, from_pip_state, time_state_to_wkv, to_pip_state, wkv_to_time_state
from aviary.testing import random_config, random_state_dict


@pytest.fixture(scope="module", params=[4, 7], ids=["v4", "v7"])
def model(request):
    return model_from_state_dict(random_state_dict(random_config(request.param, n_layer=2, n_embd=64,
                                                                 head_size=32)))


def toks(B, T, seed=0):
    return torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(seed))


def test_init_state_layout(model):
    cfg = model.config
    s = model.init_state(3)
    assert s.shift.shape == (3, cfg.n_layer, 2, cfg.n_embd)
    assert s.wkv.dtype == torch.float32 and s.wkv.shape[:2] == (3, cfg.n_layer)
    assert s.batch_size == 3 and s.n_layer == cfg.n_layer
    assert s.nbytes == s.shift.numel() * 4 + s.wkv.numel() * 4


@torch.no_grad()
def test_saved_and_reloaded_state_continues_identically(model, tmp_path):
    _, s = model(toks(2, 10))
    s.save(tmp_path / "s.safetensors")
    loaded = RWKVState.load(tmp_path / "s.safetensors")
    assert loaded.version == s.version
    a, _ = model(toks(2, 5, seed=1), s)
    b, _ = model(toks(2, 5, seed=1), loaded)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@torch.no_grad()
def test_select_and_cat_round_trip(model):
    _, s = model(toks(3, 6))
    parts = [s.select(i) for i in range(3)]
    joined = RWKVState.cat(parts)
    torch.testing.assert_close(joined.wkv, s.wkv, rtol=0, atol=0)
    torch.testing.assert_close(s.select([2, 0]).shift, s.shift[[2, 0]], rtol=0, atol=0)
    with pytest.raises(IndexError):
        s.select(3)


@torch.no_grad()
def test_expand_shares_a_prefix(model):
    prefix = toks(1, 7)
    _, s1 = model(prefix)
    _, s3 = model(prefix.expand(3, -1))
    torch.testing.assert_close(s1.expand(3).wkv, s3.wkv, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_clone_is_independent(model):
    _, s = model(toks(1, 4))
    c = s.clone()
    c.wkv.add_(1)
    assert not torch.equal(c.wkv, s.wkv)


def test_state_from_another_model_is_rejected(model):
    other_version = 5 if model.config.version != 5 else 6
    other = model_from_state_dict(random_state_dict(random_config(other_version, n_layer=2, n_embd=64,
                                                                  head_size=32)))
    with pytest.raises(StateError, match="state is for RWKV"):
        model(toks(1, 2), other.init_state(1))
    wider = model_from_state_dict(random_state_dict(random_config(model.config.version, n_layer=2, n_embd=128)))
    with pytest.raises(StateError, match="do not fit"):
        model(toks(1, 2), wider.init_state(1))
    with pytest.raises(StateError, match="batch size"):
        model(toks(2, 2), model.init_state(1))


def test_cat_of_different_models_is_rejected(model):
    other = model_from_state_dict(random_state_dict(random_config(model.config.version, n_layer=3, n_embd=64,
                                                                  head_size=32)))
    with pytest.raises(StateError):
        RWKVState.cat([model.init_state(1), other.init_state(1)])


def test_loading_a_non_state_file_fails_clearly(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(StateError, match="x.safetensors"):
        RWKVState.load(bad)


@torch.no_grad()
def test_time_state_becomes_the_initial_state():
    cfg = random_config(6, n_layer=2, n_embd=64, head_size=32)
    sd = random_state_dict(cfg, time_state=True)
    model = model_from_state_dict(sd)
    s = model.init_state(2)
    for i in range(cfg.n_layer):
        official = sd[f"blocks.{i}.att.time_state"]  # [H, V, K]
        torch.testing.assert_close(s.wkv[0, i], official.transpose(-1, -2), rtol=0, atol=0)
    # and it is what a call without a state starts from
    a, _ = model(toks(2, 3))
    b, _ = model(toks(2, 3), s)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- the official layouts (aviary.state) and start states (aviary.loading.load_start_state) -------------


@torch.no_grad()
@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_pip_state_lists_convert_both_ways(version):
    cfg = random_config(version, n_layer=2, n_embd=64, head_size=32)
    model = model_from_state_dict(random_state_dict(cfg))
    _, s = model(toks(1, 5))
    pip = []  # the rwkv pip package's list (0.8.32), written out: per layer att shift, wkv, ffn shift
    for i in range(cfg.n_layer):
        att, ffn = s.shift[0, i]
        if version == 4:
            pip += [att, *s.wkv[0, i], ffn]  # aa, bb, pp
        else:
            pip += [att, s.wkv[0, i].transpose(-1, -2) if version == 7 else s.wkv[0, i], ffn]  # v7: [H, V, K]
    ours = from_pip_state(version, pip)
    model.check_state(ours, 1)
    assert torch.equal(ours.shift, s.shift) and torch.equal(ours.wkv, s.wkv)
    back = to_pip_state(s)
    assert len(back) == len(pip) and all(torch.equal(a, b) for a, b in zip(back, pip, strict=True))
    with pytest.raises(StateError, match="per layer"):
        from_pip_state(version, pip[:-1])


def test_time_state_orientation():
    official = torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).view(2, 3, 4, 4)  # [L, H, V, K]
    ours = time_state_to_wkv(official)
    assert ours.dtype == torch.float32 and ours[1, 2, 0, 3] == official[1, 2, 3, 0]  # [L, H, K, V]
    assert torch.equal(wkv_to_time_state(ours), official.float())


@torch.no_grad()
def test_load_start_state_reads_both_kinds_of_file(tmp_path):
    cfg = random_config(7, n_layer=2, n_embd=64, head_size=32)
    sd = random_state_dict(cfg, time_state=True)
    tuned = {k: sd.pop(k) for k in [k for k in sd if k.endswith("time_state")]}
    model = model_from_state_dict(sd)
    _, s = model(toks(1, 4))
    s.save(tmp_path / "chat.state")
    loaded = load_start_state(model, tmp_path / "chat.state")
    assert torch.equal(loaded.wkv, s.wkv) and model.initial_wkv is None
    torch.save(tuned, tmp_path / "tuned.pth")
    assert load_start_state(model, tmp_path / "tuned.pth") is None
    for i in range(cfg.n_layer):
        torch.testing.assert_close(model.init_state(1).wkv[0, i], tuned[f"blocks.{i}.att.time_state"].transpose(-1, -2),
                                   rtol=0, atol=0)


def test_load_start_state_errors_name_the_file(tmp_path):
    model = model_from_state_dict(random_state_dict(random_config(7, n_layer=2, n_embd=64, head_size=32)))
    other = model_from_state_dict(random_state_dict(random_config(7, n_layer=3, n_embd=64, head_size=32)))
    other.init_state(1).save(tmp_path / "other.state")
    with pytest.raises(StateError, match=r"other\.state: state shapes"):
        load_start_state(model, tmp_path / "other.state")
    (tmp_path / "noise.bin").write_bytes(bytes(range(256)))
    with pytest.raises(StateError, match=r"noise\.bin: neither an Aviary state file .* nor a state-tuning file"):
        load_start_state(model, tmp_path / "noise.bin")
    torch.save({f"blocks.{i}.att.time_state": torch.zeros(4, 16, 16) for i in range(2)}, tmp_path / "narrow.pth")
    with pytest.raises(StateError, match=r"narrow\.pth: initial state has shape"):
        load_start_state(model, tmp_path / "narrow.pth")
    torch.save({f"blocks.{i}.att.time_state": torch.full((2, 32, 32), float("nan")) for i in range(2)},
               tmp_path / "nan.pth")
    with pytest.raises(StateError, match=r"nan\.pth: the state-tuning file's time_state holds NaN"):
        load_start_state(model, tmp_path / "nan.pth")
