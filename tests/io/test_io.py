"""Checkpoint I/O: every layout round-trips to the official names, every loader path gives the same
model, state-tuned files set the initial state, and every kind of bad input gets a clear error that
names the file."""

import os
import pickle
import random

import pytest
import torch

import aviary
from aviary.io import CheckpointError, read_state_dict, write_state_dict
from aviary.io.names import LAYOUTS, from_official, get_layout, to_official
from aviary.state import StateError
from aviary.testing import random_config, random_state_dict

VERSIONS = [4, 5, 6, 7]
# (layout, version) pairs a layout can hold
HELD = [(name, v) for name in LAYOUTS for v in VERSIONS if v in get_layout(name).versions]
LAYER0_V = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}  # in official v7 files, never used


def small_sd(version, seed=0, **kw):
    return random_state_dict(random_config(version, n_layer=2, n_embd=128, vocab_size=300), seed=seed, **kw)


def tokens(B=2, T=11, V=300):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


def logits_of(path):
    with torch.no_grad():
        return aviary.load(path)(tokens())[0]


# ---- names --------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,version", HELD, ids=[f"{n}-v{v}" for n, v in HELD])
def test_round_trip_is_exact(layout, version):
    sd = small_sd(version, time_state=version != 4)
    back, detected = to_official(from_official(sd, layout))
    assert detected == layout
    assert set(back) == set(sd)
    for key, t in sd.items():
        if layout == "fla-rwkv7" and key in LAYER0_V:  # fla has no layer-0 v LoRA: zeros stand in
            assert back[key].shape == t.shape and not back[key].any()
        else:
            assert back[key].dtype == t.dtype and torch.equal(back[key], t), key


# Names and shapes read from transformers' modeling_rwkv.py, the RWKV-5/6 remote code, and fla's
# layers/rwkv7.py + models/rwkv7/modeling_rwkv7.py (C=128, H=2, N=64, ranks from random_config).
EXPECTED = {
    "hf-rwkv4": {
        "rwkv.embeddings.weight": (300, 128),
        "rwkv.blocks.0.pre_ln.weight": (128,),
        "rwkv.blocks.1.attention.time_mix_key": (1, 1, 128),
        "rwkv.blocks.1.attention.time_first": (128,),
        "rwkv.blocks.1.feed_forward.time_mix_receptance": (1, 1, 128),
        "rwkv.blocks.1.feed_forward.value.weight": (128, 512),
        "rwkv.ln_out.bias": (128,),
        "head.weight": (300, 128),
    },
    "hf-rwkv5": {
        "rwkv.blocks.1.attention.time_mix_gate": (1, 1, 128),
        "rwkv.blocks.1.attention.time_decay": (2, 64),
        "rwkv.blocks.1.attention.time_faaaa": (2, 64),
        "rwkv.blocks.1.attention.ln_x.weight": (128,),
        "rwkv.blocks.1.attention.gate.weight": (128, 128),
    },
    "hf-rwkv6": {
        "rwkv.blocks.1.attention.time_maa_w1": (128, 160),
        "rwkv.blocks.1.attention.time_maa_w2": (5, 32, 128),
        "rwkv.blocks.1.attention.time_decay": (1, 1, 128),
        "rwkv.blocks.1.attention.time_decay_w1": (128, 64),
        "rwkv.blocks.1.feed_forward.time_maa_k": (1, 1, 128),
    },
    "fla-rwkv7": {
        "model.embeddings.weight": (300, 128),
        "model.layers.0.pre_norm.weight": (128,),
        "model.layers.1.attn_norm.bias": (128,),
        "model.layers.1.ffn_norm.weight": (128,),
        "model.layers.1.attn.x_r": (1, 1, 128),
        "model.layers.1.attn.k_k": (128,),
        "model.layers.1.attn.k_a": (128,),
        "model.layers.1.attn.r_k": (2, 64),
        "model.layers.1.attn.r_proj.weight": (128, 128),
        "model.layers.1.attn.o_proj.weight": (128, 128),
        "model.layers.1.attn.g_norm.weight": (128,),
        "model.layers.1.attn.w_lora.lora.0.weight": (64, 128),
        "model.layers.1.attn.w_lora.lora.2.weight": (128, 64),
        "model.layers.1.attn.w_lora.lora.2.bias": (128,),
        "model.layers.1.attn.v_lora.lora.0.weight": (32, 128),
        "model.layers.1.attn.g_lora.lora.2.weight": (128, 128),
        "model.layers.1.ffn.x_k": (128,),
        "model.layers.1.ffn.key.weight": (512, 128),
        "model.norm.weight": (128,),
        "lm_head.weight": (300, 128),
    },
}
ABSENT = {"hf-rwkv4": ["rwkv.head.weight", "rwkv.blocks.0.attention.time_mix_k"],
          "fla-rwkv7": ["model.layers.0.attn.v_lora.lora.0.weight", "model.layers.1.attn.g_lora.lora.2.bias"]}


@pytest.mark.parametrize("layout", list(EXPECTED))
def test_layout_names_and_shapes(layout):
    version = get_layout(layout).versions[0]
    sd = small_sd(version)
    out = from_official(sd, layout)
    assert {k: tuple(out[k].shape) for k in EXPECTED[layout] if k in out} == EXPECTED[layout]
    assert not set(ABSENT.get(layout, [])) & set(out)
    # the LoRA matrices are stored transposed: fla's lora.0 is Linear(C, r), weight [r, C] = w1.T
    if layout == "fla-rwkv7":
        assert torch.equal(out["model.layers.1.attn.w_lora.lora.0.weight"], sd["blocks.1.att.w1"].t())
        assert torch.equal(out["model.layers.1.attn.a_lora.lora.2.bias"], sd["blocks.1.att.a0"].flatten())


def test_older_fla_packed_x_x_is_unpacked():
    sd = small_sd(7)
    fla = from_official(sd, "fla-rwkv7")
    names = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
    fla["model.layers.1.attn.x_x"] = torch.cat([fla.pop(f"model.layers.1.attn.{n}")[0] for n in names])
    back, _ = to_official(fla)
    for n in names:
        assert torch.equal(back[f"blocks.1.att.{n}"], sd[f"blocks.1.att.{n}"])


def test_layout_that_cannot_hold_the_version():
    with pytest.raises(ValueError, match="hf-rwkv4 holds RWKV-4 only; this model is RWKV-7"):
        from_official(small_sd(7), "hf-rwkv4")
    with pytest.raises(ValueError, match="unknown layout"):
        from_official(small_sd(7), "gguf")


def test_library_names_on_the_wrong_version_are_refused():
    v6_with_fla_names = {get_layout("fla-rwkv7").names.apply(k): v for k, v in small_sd(6).items()}
    with pytest.raises(ValueError, match="fla-rwkv7 layout, which cannot hold the RWKV-6"):
        to_official(v6_with_fla_names)


def test_mixed_layouts_are_refused():
    sd = small_sd(4)
    mixed = {**sd, **from_official(sd, "hf-rwkv4")}
    with pytest.raises(ValueError, match="several layouts"):
        to_official(mixed)


# ---- every loader path gives the same model ----------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_every_format_loads_the_same_model(tmp_path, version):
    sd = small_sd(version)
    write_state_dict(sd, tmp_path / "a.pth")
    reference = logits_of(tmp_path / "a.pth")
    folder_layout = {4: "hf-rwkv4", 5: "hf-rwkv5", 6: "hf-rwkv6", 7: "fla-rwkv7"}[version]
    write_state_dict(sd, tmp_path / "a.safetensors")
    write_state_dict(sd, tmp_path / "folder", folder_layout)
    torch.save({"_forward_module." + k: v for k, v in sd.items()}, tmp_path / "deepspeed.pth")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "lightning.ckpt")
    for name in ("a.safetensors", "folder", "deepspeed.pth", "lightning.ckpt"):
        torch.testing.assert_close(logits_of(tmp_path / name), reference, rtol=0, atol=0, msg=name)
    assert read_state_dict(tmp_path / "folder")[1] == folder_layout


def test_sharded_and_bin_folders(tmp_path):
    sd = small_sd(4)
    hf = from_official(sd, "hf-rwkv4")
    keys = sorted(hf)
    (tmp_path / "shards").mkdir()
    from safetensors.torch import save_file

    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        shard = tmp_path / "shards" / f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: hf[k].contiguous() for k in part}, str(shard))
    (tmp_path / "bin").mkdir()
    torch.save(hf, tmp_path / "bin" / "pytorch_model.bin")
    for folder in ("shards", "bin"):
        back, layout = read_state_dict(tmp_path / folder)
        assert layout == "hf-rwkv4" and set(back) == set(sd)


def test_legacy_zipless_pth_loads(tmp_path):
    sd = small_sd(5)
    torch.save(sd, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    back, _ = read_state_dict(tmp_path / "old.pth")
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("version", [5, 6, 7])
def test_time_state_becomes_the_initial_state(tmp_path, version):
    sd = small_sd(version, time_state=True)
    write_state_dict(sd, tmp_path / "tuned.pth")
    state = aviary.load(tmp_path / "tuned.pth").init_state(batch_size=2)
    for i in range(2):
        expected = sd[f"blocks.{i}.att.time_state"].transpose(-1, -2)  # official [H, V, K] -> ours [H, K, V]
        for b in range(2):
            torch.testing.assert_close(state.wkv[b, i], expected, rtol=0, atol=0)


# ---- bad input: a clear error naming the file ----------------------------------------------------

@pytest.fixture
def good_files(tmp_path):
    sd = small_sd(7)
    write_state_dict(sd, tmp_path / "good.pth")
    write_state_dict(sd, tmp_path / "good.safetensors")
    return sd


def expect_error(path, *fragments, error=CheckpointError):
    with pytest.raises(error) as info:
        aviary.load(path)
    message = str(info.value)
    assert os.fspath(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path, good_files, suffix):
    data = (tmp_path / f"good{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / f"cut{suffix}", "truncated")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_random_bytes(tmp_path, suffix):
    # garbage makes the unpickler fail in many ways (KeyError, IndexError, struct.error, ...): try several
    for seed, size in enumerate([1, 7, 100, 4096] * 10):
        path = tmp_path / f"noise{seed}{suffix}"
        path.write_bytes(random.Random(seed).randbytes(size))
        expect_error(path, "corrupt")


def test_empty_file(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    expect_error(tmp_path / "empty.pth", "file ends early")


class _RunsCode:
    def __reduce__(self):
        return os.system, ("echo pwned > marker",)


def test_malicious_pickle_is_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # os.system would write the marker here
    torch.save({"emb.weight": torch.zeros(2, 2), "evil": _RunsCode()}, tmp_path / "evil.pth")
    expect_error(tmp_path / "evil.pth", "refused", "system", "could run code")
    with open(tmp_path / "evil_plain.pth", "wb") as f:  # a bare pickle, no torch zip container
        pickle.dump({"evil": _RunsCode()}, f, protocol=2)
    expect_error(tmp_path / "evil_plain.pth", "refused", "system")
    assert not (tmp_path / "marker").exists()


def test_unknown_key_layout(tmp_path):
    torch.save({"encoder.layer.0.weight": torch.zeros(3), "decoder.bias": torch.zeros(3)},
               tmp_path / "bert.pth")
    expect_error(tmp_path / "bert.pth", "unknown key layout", "decoder.bias")


def test_missing_tensor(tmp_path, good_files):
    sd = dict(good_files)
    del sd["blocks.1.att.key.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    expect_error(tmp_path / "missing.pth", "missing", "blocks.1.att.key.weight")


def test_shape_mismatch(tmp_path, good_files):
    sd = dict(good_files)
    sd["blocks.1.att.key.weight"] = torch.zeros(128, 64)
    torch.save(sd, tmp_path / "wrong.pth")
    expect_error(tmp_path / "wrong.pth", "shape mismatch", "blocks.1.att.key.weight")


def test_unknown_extension_and_missing_path(tmp_path, good_files):
    (tmp_path / "weights.onnx").write_bytes(b"\0" * 16)
    expect_error(tmp_path / "weights.onnx", "unknown checkpoint extension", ".onnx")
    expect_error(tmp_path / "nope.pth", "no such file")
    (tmp_path / "empty_folder").mkdir()
    expect_error(tmp_path / "empty_folder", "no weights found")


def test_file_converted_by_the_pip_package(tmp_path, good_files):
    pip_markers = {"_strategy": "cpu fp32", "_version": "0.8", "_rescale_layer": 0}
    torch.save({**good_files, **pip_markers}, tmp_path / "pip.pth")
    expect_error(tmp_path / "pip.pth", "rwkv pip package")


def test_rwkv5_0_style_keys(tmp_path):
    sd = small_sd(5)
    sd["blocks.0.att.time_decay"] = torch.zeros(2)  # 5.0/5.1: one decay per head
    torch.save(sd, tmp_path / "v5_1.pth")
    expect_error(tmp_path / "v5_1.pth", "5.0/5.1")


# ---- bad input at run time -----------------------------------------------------------------------

def test_token_outside_the_vocabulary(tmp_path, good_files):
    model = aviary.load(tmp_path / "good.pth")
    with pytest.raises(ValueError, match="token id 300 is outside"):
        model(torch.tensor([[1, 300]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1]]))


def test_state_from_another_model():
    from aviary.loading import model_from_state_dict

    v7 = model_from_state_dict(small_sd(7))
    with torch.no_grad():
        _, state7 = v7(tokens(B=2))
        _, state6 = model_from_state_dict(small_sd(6))(tokens(B=2))
        wide = model_from_state_dict(random_state_dict(random_config(7, n_embd=192, vocab_size=300)))
        _, wide_state = wide(tokens(B=2))
        with pytest.raises(StateError, match="RWKV-6"):
            v7(tokens(B=2), state6)
        with pytest.raises(StateError, match="another model"):
            v7(tokens(B=2), wide_state)
        with pytest.raises(StateError, match="batch size"):
            v7(tokens(B=1), state7)


def test_loading_a_checkpoint_does_not_import_torch_dynamo(tmp_path):
    """The model a checkpoint is loaded into is built on the meta device; torch's `normal_` on a meta tensor (the
    default init of an embedding) imports torch._dynamo, ~1.4 s of every model load. In a fresh interpreter."""
    import subprocess
    import sys

    path = tmp_path / "m.safetensors"
    aviary.testing.save_random_checkpoint(path, random_config(7, n_layer=2, n_embd=64, vocab_size=300))
    code = ("import sys, aviary\n"
            f"aviary.load({str(path)!r})\n"
            "assert 'torch._dynamo' not in sys.modules, 'loading imported torch._dynamo'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_an_embedding_built_on_a_device_is_still_initialised():
    from aviary.model.rwkv import RWKV

    torch.manual_seed(0)
    w = RWKV(random_config(7, n_layer=1, n_embd=64, vocab_size=300)).emb.weight.detach()
    assert 0.9 < float(w.std()) < 1.1  # nn.Embedding's N(0, 1)
