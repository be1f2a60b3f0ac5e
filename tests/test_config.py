"""`infer_config` reads the version and every size from an official state dict's keys and shapes."""

import dataclasses

import pytest
import torch

from aviary.config import ConfigError, ModelConfig, detect_version, infer_config
from aviary.io.names import from_official, to_official
from aviary.testing import random_config, random_state_dict

CONFIGS = [
    random_config(4),
    random_config(5),
    random_config(6),
    random_config(7),
    random_config(4, n_embd=96, vocab_size=1000),  # width not a power of two, vocab not 65536
    random_config(5, n_embd=192, head_size=64, vocab_size=777),  # 3 heads
    random_config(6, n_embd=192, head_size=64, n_layer=3),
    random_config(7, n_embd=192, head_size=64, vocab_size=65529),
    random_config(5, n_embd=128, head_size=32),  # 4 heads of 32
    random_config(7, n_layer=1),  # rank_v from layer 0, the only one
    random_config(6, dim_ffn=320),  # ffn not 3.5 C
    dataclasses.replace(random_config(6), rank_mix=16, rank_decay=48),
    dataclasses.replace(random_config(7), rank_w=32, rank_a=16, rank_v=8, rank_g=96),
]


def _id(cfg: ModelConfig) -> str:
    return f"v{cfg.version}-L{cfg.n_layer}-C{cfg.n_embd}-N{cfg.head_size}-V{cfg.vocab_size}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_infer_config_recovers_every_size(cfg):
    sd = random_state_dict(cfg)
    assert infer_config(sd) == cfg
    assert detect_version(sd) == cfg.version


def test_width_not_a_power_of_two_has_three_heads():
    cfg = infer_config(random_state_dict(random_config(7, n_embd=192, head_size=64)))
    assert (cfg.n_head, cfg.head_size) == (3, 64)
    v4 = infer_config(random_state_dict(random_config(4, n_embd=96)))
    assert (v4.n_embd, v4.head_size, v4.dim_ffn) == (96, 96, 384)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.version == 7], ids=_id)
def test_fla_round_trip_keeps_the_config(cfg):
    """fla files lack layer 0's v LoRA; the config read after conversion must still be the same."""
    sd, _ = to_official(from_official(random_state_dict(cfg), "fla-rwkv7"))
    inferred = infer_config(sd)
    assert dataclasses.replace(inferred, rank_v=cfg.rank_v) == cfg
    if cfg.n_layer > 1:  # a one-layer model has no v LoRA anywhere, so its rank is unknowable and unused
        assert inferred.rank_v == cfg.rank_v


def test_time_state_does_not_change_the_config():
    cfg = random_config(6)
    assert infer_config(random_state_dict(cfg, time_state=True)) == cfg


def test_unknown_layout_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown key layout"):
        infer_config({"encoder.weight": torch.zeros(2, 2)})
    hf = from_official(random_state_dict(random_config(4)), "hf-rwkv4")  # not official names
    with pytest.raises(ConfigError, match="rwkv.blocks"):
        infer_config(hf)


@pytest.mark.parametrize("change", ["decay_per_head", "no_gate"])
def test_rwkv5_0_and_5_1_are_refused(change):
    sd = random_state_dict(random_config(5))
    for i in range(2):
        if change == "decay_per_head":  # 5.1: gate present, one decay per head
            sd[f"blocks.{i}.att.time_decay"] = torch.zeros(2)
        else:  # 5.0: no gate
            del sd[f"blocks.{i}.att.gate.weight"]
    with pytest.raises(ConfigError, match="5.0/5.1"):
        infer_config(sd)


def test_inconsistent_shapes_are_refused():
    sd = random_state_dict(random_config(6))
    sd["blocks.0.att.time_faaaa"] = torch.zeros(3, 64)  # 3 heads of 64 != width 128
    with pytest.raises(ConfigError, match="does not match n_embd"):
        infer_config(sd)
    del sd["blocks.0.ffn.key.weight"]
    with pytest.raises(ConfigError, match="missing tensor 'blocks.0.ffn.key.weight'"):
        infer_config(sd)


def test_block_indices_must_run_from_zero_without_gaps():
    # the layer count once came from the largest index: one stray key claimed 100,000,001 layers
    sd = random_state_dict(random_config(7))
    with pytest.raises(ConfigError, match=r"without gaps; found blocks 0, 1, 100000000$"):
        infer_config({**sd, "blocks.100000000.att.r_k": torch.zeros(2, 64)})
    gap = {k.replace("blocks.1.", "blocks.2."): v for k, v in sd.items()}
    with pytest.raises(ConfigError, match="found blocks 0, 2$"):
        infer_config(gap)
    # "blocks.01." and absurdly long indices are not block keys (they are refused later as unexpected)
    odd = {**sd, "blocks.01.att.r_k": torch.zeros(2, 64), "blocks.12345678901.att.r_k": torch.zeros(2, 64)}
    assert infer_config(odd).n_layer == 2


@pytest.mark.parametrize("key,shape", [("emb.weight", (128,)), ("emb.weight", (1, 300, 128)),
                                       ("blocks.0.att.r_k", (128,)), ("blocks.0.ffn.key.weight", (512,)),
                                       ("blocks.0.att.w1", (128, 64, 1))])
def test_tensors_with_the_wrong_number_of_dimensions_are_named(key, shape):
    sd = random_state_dict(random_config(7))
    sd[key] = torch.zeros(shape)
    with pytest.raises(ConfigError, match=rf"tensor '{key}' has shape \(.*\): expected 2 dimensions"):
        infer_config(sd)


def test_rwkv6_mix_lora_is_three_dimensional():
    sd = random_state_dict(random_config(6))
    sd["blocks.0.att.time_maa_w2"] = sd["blocks.0.att.time_maa_w2"].flatten(0, 1)
    with pytest.raises(ConfigError, match="'blocks.0.att.time_maa_w2' .* expected 3 dimensions"):
        infer_config(sd)
