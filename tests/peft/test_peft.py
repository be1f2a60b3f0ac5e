"""aviary.peft on a model: zero-initialised adapters change nothing, a trained adapter and its merged weights
give the same logits, the trainable counts are the methods', and applying is deterministic and strict."""

from __future__ import annotations

import pytest
import torch

from aviary.cpu import isa, kernel_weight
from aviary.loading import model_from_state_dict
from aviary.peft import (
    PeftConfig,
    adapter_state_dict,
    apply_peft,
    load_adapter_state_dict,
    merged_state_dict,
    trainable_parameters,
)
from aviary.testing import random_config, random_state_dict
from peft_helpers import CASES, VOCAB, adapted, fresh, logits, tiny, tokens

ZERO_INIT = [("lora", PeftConfig("lora", rank=4, alpha=12.0)), ("miss-bone", PeftConfig("miss", rank=24)),
             ("miss-bat", PeftConfig("miss", rank=16, miss_mode="bat")), ("state", PeftConfig("state"))]


@pytest.mark.parametrize("version, config", [(v, c) for v in (4, 5, 6, 7) for n, c in ZERO_INIT
                                             if not (v == 4 and n == "state")],
                         ids=[f"v{v}-{n}" for v in (4, 5, 6, 7) for n, _ in ZERO_INIT if not (v == 4 and n == "state")])
def test_zero_initialised_adapters_give_the_base_logits_exactly(version, config):
    sd = tiny(version)
    base, model = fresh(sd), apply_peft(fresh(sd), config)
    x = tokens()
    with torch.no_grad(), isa.reference_only():  # torch's products on both sides (the C kernels round differently)
        want, want_state = base(x)
        got, got_state = model(x)
        step, _ = model(x[:, :1], got_state)  # and a one-token step from the returned state
        want_step, _ = base(x[:, :1], want_state)
    assert torch.equal(got, want)
    assert torch.equal(got_state.wkv, want_state.wkv)
    assert torch.equal(step, want_step)


@pytest.mark.parametrize("version", [4, 7])
def test_pissa_residual_plus_BA_is_W(version):
    sd = tiny(version)
    model = apply_peft(fresh(sd), PeftConfig("pissa", rank=8))
    for i in range(2):
        for target in ("att.receptance", "att.output", "ffn.key", "ffn.value"):
            m = model.blocks[i].get_submodule(target)
            W = sd[f"blocks.{i}.{target}.weight"]
            torch.testing.assert_close(m.weight + m.lora_B @ m.lora_A, W, atol=1e-5, rtol=0)
            assert torch.equal(m.lora_A, m.init_lora_A) and torch.equal(m.lora_B, m.init_lora_B)
    torch.testing.assert_close(logits(model), logits(fresh(sd)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case, version, config", CASES, ids=[c[0] for c in CASES])
def test_trained_adapter_gives_the_logits_of_its_merged_weights(case, version, config):
    sd = tiny(version)
    model = adapted(sd, config)
    merged = merged_state_dict(model)
    assert set(merged) == set(sd) | ({f"blocks.{i}.att.time_state" for i in range(2)} if config.method == "state"
                                     else set())
    got, want = logits(model), logits(model_from_state_dict(merged))
    assert (got - logits(fresh(sd))).abs().max() > 1e-3  # the steps did change the model
    torch.testing.assert_close(want, got, atol=1e-5, rtol=0)


def _products(version: int) -> list[tuple[int, int]]:
    """(in, out) of the default targets of one block of the tiny models: C = 64, ffn F."""
    C, F = 64, {4: 256, 5: 224, 6: 224, 7: 256}[version]
    return [(C, C)] * 4 + [(C, F), (F, C)]


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_trainable_parameter_counts_are_the_methods(version):
    sd, L, r = tiny(version), 2, 8
    products = _products(version)
    counts = {
        "lora": L * sum(r * (i + o) for i, o in products),
        "pissa": L * sum(r * (i + o) for i, o in products),
        "miss": L * sum(r * o for _, o in products),  # bone: one [r, out] matrix
        "bat": L * sum(i * r for i, _ in products),  # [in/r, r, r]
    }
    if version > 4:
        counts["state"] = L * 2 * 32 * 32  # L H N^2 with H = 2 heads of N = 32
    for method, want in counts.items():
        config = PeftConfig("miss", rank=r, miss_mode="bat") if method == "bat" else PeftConfig(method, rank=r)
        model = apply_peft(fresh(sd), config)
        assert trainable_parameters(model) == want, method
        assert sum(t.numel() for t in adapter_state_dict(model).values()) == want, method
    ln = sum(v.numel() for k, v in sd.items() if "ln" in k)
    with_parts = apply_peft(fresh(sd), PeftConfig("lora", rank=r, parts=("ln", "emb")))
    assert trainable_parameters(with_parts) == counts["lora"] + ln + VOCAB * 64


def test_apply_peft_is_deterministic_in_weights_config_and_seed():
    sd = tiny(7)
    for config in (PeftConfig("lora", rank=4), PeftConfig("pissa", rank=4)):
        a, b = apply_peft(fresh(sd), config, seed=3), apply_peft(fresh(sd), config, seed=3)
        sa, sb = a.state_dict(), b.state_dict()  # incl. PiSSA's frozen residual
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.manual_seed(0)
    first = apply_peft(fresh(sd), PeftConfig("pissa", rank=4), seed=3).state_dict()
    torch.manual_seed(1)  # the global RNG does not matter, and applying leaves it alone
    state = torch.get_rng_state()
    second = apply_peft(fresh(sd), PeftConfig("pissa", rank=4), seed=3).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = apply_peft(fresh(sd), PeftConfig("lora", rank=4), seed=4)
    assert not torch.equal(other.blocks[0].att.key.lora_A, apply_peft(fresh(sd), PeftConfig("lora", rank=4),
                                                                       seed=3).blocks[0].att.key.lora_A)


def test_adapter_state_dict_round_trip_is_strict():
    sd, config = tiny(6), PeftConfig("lora", rank=4, parts=("ln_out",))
    trained = adapted(sd, config)
    resumed = apply_peft(fresh(sd), config)
    load_adapter_state_dict(resumed, adapter_state_dict(trained))
    assert torch.equal(logits(resumed), logits(trained))
    good = adapter_state_dict(trained)
    for bad, needle in (({k: v for k, v in good.items() if "ln_out" not in k}, "missing"),
                        ({**good, "blocks.0.att.gate.lora_A": torch.zeros(4, 64)}, "unexpected"),
                        ({**good, "blocks.0.att.key.lora_A": torch.zeros(8, 64)}, "mis-shaped")):
        with pytest.raises(ValueError, match=needle):
            load_adapter_state_dict(resumed, bad)


def test_adapted_products_offer_no_kernel_and_stay_in_place_of_the_weight():
    model = apply_peft(fresh(tiny(7)), PeftConfig("lora", rank=4))
    key = model.blocks[0].att.key
    assert kernel_weight(key) is None  # the C decode blocks fall back to torch instead of skipping the adapter
    assert model.decode_path.blocks == "torch"
    names = set(model.state_dict())
    assert {"blocks.0.att.key.weight", "blocks.0.att.key.lora_A", "blocks.0.att.key.lora_B"} <= names
    assert not key.weight.requires_grad and key.lora_A.requires_grad


def test_state_tuning_continues_from_a_state_tuned_checkpoint():
    cfg = random_config(7, n_layer=2, n_embd=64, head_size=32, vocab_size=VOCAB)
    sd = random_state_dict(cfg, seed=2, time_state=True)
    base = fresh(sd)
    model = apply_peft(fresh(sd), PeftConfig("state"))
    with torch.no_grad(), isa.reference_only():
        assert torch.equal(model(tokens())[0], base(tokens())[0])
    assert torch.equal(merged_state_dict(model)["blocks.1.att.time_state"], sd["blocks.1.att.time_state"])


def test_state_gradient_reaches_time_state():
    model = apply_peft(fresh(tiny(5)), PeftConfig("state"))
    model(tokens())[0].square().mean().backward()
    assert all(b.att.time_state.grad is not None and b.att.time_state.grad.abs().sum() > 0 for b in model.blocks)


@pytest.mark.parametrize("method", ["lora", "miss", "state"])
def test_bfloat16_autocast_and_bfloat16_weights_train(method):
    sd = tiny(7)
    model = apply_peft(fresh(sd), PeftConfig(method, rank=8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens())[0].float().square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    bf16 = apply_peft(fresh(sd).to(torch.bfloat16), PeftConfig(method, rank=8))
    bf16(tokens())[0].square().mean().backward()
    assert all(p.dtype == torch.bfloat16 and p.grad is not None for p in bf16.parameters() if p.requires_grad)


@pytest.mark.parametrize("config, version, needle", [
    (PeftConfig("dora"), 7, "unknown fine-tuning method"),
    (PeftConfig("lora", rank=0), 7, "rank must be a positive integer"),
    (PeftConfig("lora", dropout=1.0), 7, "dropout"),
    (PeftConfig("miss", dropout=0.1), 7, "dropout is LoRA's"),
    (PeftConfig("miss", miss_mode="row"), 7, "unknown MiSS mode"),
    (PeftConfig("miss", rank=24, miss_mode="bat"), 7, "bat needs rank 24 to divide"),
    (PeftConfig("pissa", rank=65), 7, "exceeds"),
    (PeftConfig("state"), 4, "RWKV-4 has no matrix state"),
    (PeftConfig("lora", targets=("att.gate",)), 7, "'att.gate' of blocks.0 is not a bias-free linear layer"),
    (PeftConfig("lora", targets=("att.w1",)), 7, "products of an RWKV-7 block are att.receptance"),
    (PeftConfig("lora", parts=("time",)), 7, "part 'time' matches no parameter"),
])
def test_bad_configs_are_clear_errors(config, version, needle):
    with pytest.raises(ValueError, match=needle):
        apply_peft(fresh(tiny(version)), config)


def test_config_round_trips_as_a_dict_and_applies_once():
    config = PeftConfig("miss", rank=16, miss_mode="bat", parts=["ln"])
    assert PeftConfig.from_dict(config.to_dict()) == config and config.parts == ("ln",)
    with pytest.raises(ValueError, match="unknown peft setting"):
        PeftConfig.from_dict({"method": "lora", "lora_r": 8})
    model = apply_peft(fresh(tiny(7)), config)
    with pytest.raises(ValueError, match="already has a miss adapter"):
        apply_peft(model, config)


@pytest.mark.parametrize("method", ["lora", "state"])
def test_adapters_train_under_ddp(tmp_path, method):
    """One-process DDP (gloo): every trainable tensor gets its gradient each step (DDP fails the second step
    otherwise), and the wrapped module's adapter is what the inner model reports."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = apply_peft(fresh(tiny(6)), PeftConfig(method, rank=8))
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
        for step in range(2):
            ddp(tokens(seed=step))[0].square().mean().backward()
            opt.step()
            opt.zero_grad()
        assert set(adapter_state_dict(ddp.module)) == {n for n, p in model.named_parameters() if p.requires_grad}
    finally:
        dist.destroy_process_group()
