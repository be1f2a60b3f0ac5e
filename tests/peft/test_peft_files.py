"""Adapter files: RWKV-PEFT's key names, a round trip through .pth and .safetensors, RWKV-PEFT's own files,
`aviary merge`, `aviary.load(adapter=)` and `--adapter`, the merged state-tuned file in the rwkv pip package, and
the errors for adapters that do not fit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import aviary
from aviary.cli import main
from aviary.io import CheckpointError, write_state_dict
from aviary.peft import PeftConfig, apply_peft, merge, read_adapter, save_adapter
from peft_helpers import CASES, adapted, fresh, logits, tiny

LORA_V7_BLOCK0 = [  # RWKV-PEFT's names (rwkvt/peft/rwkvLinear.py LoraLinear under make_linear_att/_ffn)
    "blocks.0.att.receptance.lora_A", "blocks.0.att.receptance.lora_B", "blocks.0.att.key.lora_A",
    "blocks.0.att.key.lora_B", "blocks.0.att.value.lora_A", "blocks.0.att.value.lora_B",
    "blocks.0.att.output.lora_A", "blocks.0.att.output.lora_B", "blocks.0.ffn.key.lora_A", "blocks.0.ffn.key.lora_B",
    "blocks.0.ffn.value.lora_A", "blocks.0.ffn.value.lora_B"]
MISS_V7_BLOCK0 = ["blocks.0.att.receptance.disha", "blocks.0.att.key.disha", "blocks.0.att.value.disha",
                  "blocks.0.att.output.disha", "blocks.0.ffn.key.disha", "blocks.0.ffn.value.disha"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny RWKV-7 written as a .pth: (path, state dict)."""
    path = tmp_path_factory.mktemp("base") / "base.pth"
    sd = tiny(7)
    write_state_dict(sd, path)
    return path, sd


def _block0(names) -> list[str]:
    return [n for n in names if n.startswith("blocks.0.")]


def test_adapter_files_hold_rwkv_peft_key_names(base, tmp_path):
    _, sd = base
    for config, want in ((PeftConfig("lora", rank=4), LORA_V7_BLOCK0), (PeftConfig("pissa", rank=4), LORA_V7_BLOCK0),
                         (PeftConfig("miss", rank=8), MISS_V7_BLOCK0),
                         (PeftConfig("state"), ["blocks.0.att.time_state"]),
                         (PeftConfig("lora", rank=4, parts=("ln",)),
                          LORA_V7_BLOCK0 + ["blocks.0.ln0.weight", "blocks.0.ln0.bias", "blocks.0.ln1.weight",
                                            "blocks.0.ln1.bias", "blocks.0.ln2.weight", "blocks.0.ln2.bias",
                                            "blocks.0.att.ln_x.weight", "blocks.0.att.ln_x.bias"])):
        path = tmp_path / f"{config.method}.pth"
        written = save_adapter(apply_peft(fresh(sd), config), None, path)
        keys = list(torch.load(path, weights_only=True))
        assert _block0(keys) == want, config
        every = {n.replace("blocks.0.", f"blocks.{i}.") for i in range(2) for n in want if i == 0 or ".ln0." not in n}
        assert set(keys) == every | ({"ln_out.weight", "ln_out.bias"} if config.parts else set())
        if config.method == "pissa":
            init = torch.load(written[-1], weights_only=True)
            assert written[-1].name == "pissa.init_pissa.pth"
            assert _block0(k.removeprefix("model.") for k in init)[:2] == [
                "blocks.0.att.receptance.init_lora_A", "blocks.0.att.receptance.init_lora_B"]
            assert all(k.startswith("model.blocks.") for k in init)  # as RWKV-PEFT's init_pissa.pth


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("case, version, config", [c for c in CASES if c[1] in (6, 7)], ids=lambda c: c
                         if isinstance(c, str) else None)
def test_file_round_trip_gives_the_unmerged_logits(tmp_path, case, version, config, suffix):
    sd = tiny(version)
    base_path = tmp_path / "base.safetensors"
    write_state_dict(sd, base_path)
    model = adapted(sd, config)
    path = tmp_path / f"adapter{suffix}"
    written = save_adapter(model, config, path)
    assert written[0] == path and (suffix == ".safetensors" or path.with_suffix(".json") in written)
    if suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        assert meta["format"] == "aviary-adapter" and json.loads(meta["peft"]) == config.to_dict()
    adapter = read_adapter(path)
    assert adapter.config == config and adapter.model["n_layer"] == 2
    got = logits(aviary.load(base_path, adapter=path))
    torch.testing.assert_close(got, logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [PeftConfig("lora", rank=4, alpha=2.0), PeftConfig("pissa", rank=4),
                                    PeftConfig("state")], ids=["lora", "pissa", "state"])
def test_aviary_merge_writes_a_checkpoint_with_the_unmerged_logits(base, tmp_path, capsys, config):
    base_path, sd = base
    model = adapted(sd, config)
    save_adapter(model, config, tmp_path / "adapter.safetensors")
    out = tmp_path / "merged.pth"
    assert main(["merge", str(base_path), str(tmp_path / "adapter.safetensors"), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    merged = torch.load(out, weights_only=True)
    assert set(merged) == set(sd) | ({f"blocks.{i}.att.time_state" for i in range(2)} if config.method == "state"
                                     else set())
    torch.testing.assert_close(logits(aviary.load(out)), logits(model), atol=1e-5, rtol=0)
    assert main(["merge", str(base_path), str(tmp_path / "adapter.safetensors"), str(out)]) == 2  # exists
    assert "--force" in capsys.readouterr().err


def _bat_merged(W: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """MiSS bat by its definition, block by block: W_ab + W_ab D_b + D_b."""
    r, out = D.shape[-1], W.clone()
    for a in range(W.shape[0] // r):
        for b in range(W.shape[1] // r):
            blk = W[a * r:(a + 1) * r, b * r:(b + 1) * r]
            out[a * r:(a + 1) * r, b * r:(b + 1) * r] = blk + blk @ D[b] + D[b]
    return out


def _bone_merged(W: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """MiSS bone by its definition: Dᵀ added to every block of r input columns (the last one cut)."""
    r, out = D.shape[0], W.clone()
    for b in range(0, W.shape[1], r):
        width = min(r, W.shape[1] - b)
        out[:, b:b + width] += D.t()[:, :width]
    return out


def test_rwkv_peft_files_are_read_and_merged_by_their_formulas(base, tmp_path):
    """Files as RWKV-PEFT writes them: a plain torch.save of its names, no settings; `init_pissa.pth` beside a
    PiSSA run, with its `model.` prefix. The merges follow the formulas of RWKV-PEFT's merge/*.py."""
    _, sd = base
    g = torch.Generator().manual_seed(0)
    targets = [(f"blocks.{i}.{t}", sd[f"blocks.{i}.{t}.weight"]) for i in range(2) for t in ("att.key", "ffn.value")]

    lora = {}
    for p, W in targets:
        lora |= {f"{p}.lora_A": torch.randn(8, W.shape[1], generator=g), f"{p}.lora_B": torch.randn(W.shape[0], 8,
                                                                                                       generator=g)}
    lora["blocks.1.ln2.weight"] = torch.randn(64, generator=g)  # a part trained in full
    (tmp_path / "lora").mkdir()
    torch.save(lora, tmp_path / "lora" / "rwkv-0.pth")
    with pytest.raises(CheckpointError, match="does not record lora_alpha"):
        read_adapter(tmp_path / "lora" / "rwkv-0.pth")
    adapter = read_adapter(tmp_path / "lora" / "rwkv-0.pth", alpha=16)
    assert (adapter.config.method, adapter.config.rank, adapter.config.parts) == ("lora", 8, ("ln",))
    merged = merge(sd, adapter)
    for p, W in targets:
        torch.testing.assert_close(merged[f"{p}.weight"], W + 2 * lora[f"{p}.lora_B"] @ lora[f"{p}.lora_A"])
    assert torch.equal(merged["blocks.1.ln2.weight"], lora["blocks.1.ln2.weight"])

    (tmp_path / "pissa").mkdir()  # RWKV-PEFT: W = (W - B0 A0) + B A
    torch.save({k: v for k, v in lora.items() if "lora" in k}, tmp_path / "pissa" / "rwkv-0.pth")
    init = {f"model.{k.replace('lora_', 'init_lora_')}": v / 2 for k, v in lora.items() if "lora" in k}
    torch.save(init, tmp_path / "pissa" / "init_pissa.pth")
    adapter = read_adapter(tmp_path / "pissa" / "rwkv-0.pth")
    assert adapter.config.method == "pissa"
    merged = merge(sd, adapter)
    for p, W in targets:
        A, B = lora[f"{p}.lora_A"], lora[f"{p}.lora_B"]
        torch.testing.assert_close(merged[f"{p}.weight"], W - (B / 2) @ (A / 2) + B @ A)

    for mode, shape, reference in (("bone", lambda W: (24, W.shape[0]), _bone_merged),
                                   ("bat", lambda W: (W.shape[1] // 16, 16, 16), _bat_merged)):
        disha = {f"{p}.disha": 0.1 * torch.randn(shape(W), generator=g) for p, W in targets}
        torch.save(disha, tmp_path / f"{mode}.pth")
        adapter = read_adapter(tmp_path / f"{mode}.pth")
        assert (adapter.config.method, adapter.config.miss_mode) == ("miss", mode)
        merged = merge(sd, adapter)
        for p, W in targets:
            torch.testing.assert_close(merged[f"{p}.weight"], reference(W, disha[f"{p}.disha"]))

    state = {f"blocks.{i}.att.time_state": torch.randn(2, 32, 32, generator=g) for i in range(2)}
    torch.save(state, tmp_path / "state.pth")
    merged = merge(sd, read_adapter(tmp_path / "state.pth"))
    assert torch.equal(merged["blocks.1.att.time_state"], state["blocks.1.att.time_state"])


def test_an_rwkv_peft_file_resumes_into_a_model(base, tmp_path):
    """read_adapter's settings rebuild the model the file was trained on: load_adapter_state_dict fits."""
    from aviary.peft import load_adapter_state_dict

    _, sd = base
    config = PeftConfig("miss", rank=16, miss_mode="bat", targets=("att.key", "ffn.value"), parts=("ln",))
    trained = adapted(sd, config)
    save_adapter(trained, config, tmp_path / "a.pth")
    (tmp_path / "a.json").unlink()  # now it looks like RWKV-PEFT's
    adapter = read_adapter(tmp_path / "a.pth")
    assert adapter.config == PeftConfig("miss", rank=16, miss_mode="bat", targets=("att.key", "ffn.value"),
                                        parts=("ln",))
    model = apply_peft(fresh(sd), adapter.config)
    load_adapter_state_dict(model, adapter.tensors)
    assert torch.equal(logits(model), logits(trained))


def test_adapter_option_on_generate_gives_the_merged_models_text(checkpoint, tmp_path, capsys):
    """--adapter (generate, chat and serve share the option) merges at load: the greedy text of the merged file."""
    from aviary.io import read_state_dict
    from aviary.peft import adapter_state_dict, load_adapter_state_dict, merged_state_dict

    sd, _ = read_state_dict(checkpoint)
    config = PeftConfig("lora", rank=4, targets=("att.value", "ffn.key"))
    model = apply_peft(fresh(sd), config)
    g = torch.Generator().manual_seed(1)
    load_adapter_state_dict(model, {k: torch.randn(v.shape, generator=g) for k, v in adapter_state_dict(model).items()})
    save_adapter(model, None, tmp_path / "adapter.pth")
    write_state_dict(merged_state_dict(model), tmp_path / "merged.safetensors")
    args = ["The Eiffel tower is in", "--temperature", "0", "-n", "8"]
    assert main(["generate", str(checkpoint), *args, "--adapter", str(tmp_path / "adapter.pth")]) == 0
    with_adapter = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "merged.safetensors"), *args]) == 0
    assert with_adapter == capsys.readouterr().out
    assert main(["generate", str(checkpoint), *args]) == 0
    assert with_adapter != capsys.readouterr().out


@pytest.mark.oracle
@pytest.mark.slow  # two fresh interpreters import the pip package (RWKV-7's compiles TorchScript): ~10 s
def test_merged_state_tuned_pth_gives_aviarys_logits_in_the_rwkv_pip_package(tmp_path):
    from oracle import run_oracle, rwkv_available

    if not rwkv_available():
        pytest.skip("the rwkv pip package is not installed")
    from aviary.peft import merged_state_dict

    jobs, ours = [], {}
    x = list(range(1, 12))
    for version in (5, 6, 7):
        model = adapted(tiny(version), PeftConfig("state"), steps=2)
        with torch.no_grad():
            for b in model.blocks:  # a state that matters: the steps only nudge it
                b.att.time_state.add_(torch.randn(b.att.time_state.shape, generator=torch.Generator().manual_seed(3)))
        path = tmp_path / f"v{version}.pth"
        write_state_dict(merged_state_dict(model), path)
        ours[version] = logits(model, torch.tensor([x]))[0]
        jobs.append({"name": f"v{version}", "version": version, "model": str(path), "strategy": "cpu fp32",
                     "tokens": x, "mode": "sequence"})
    got = run_oracle(jobs)
    for version, want in ours.items():
        torch.testing.assert_close(got[f"v{version}.logits"], want, atol=1e-4, rtol=0)


def test_adapters_that_do_not_fit_are_clear_errors(base, tmp_path):
    base_path, sd = base
    wide = apply_peft(fresh(_wider()), PeftConfig("lora", rank=4))
    save_adapter(wide, None, tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match=r"wide.safetensors: does not fit .*made for RWKV-7 L2-D128"):
        aviary.load(base_path, adapter=tmp_path / "wide.safetensors")
    torch.save(_tensors(tmp_path / "wide.safetensors"), tmp_path / "wide-peft.pth")  # no settings: RWKV-PEFT's
    with pytest.raises(CheckpointError, match=r"lora_A is \[4, 128\], expected \[4, 64\]"):
        aviary.load(base_path, adapter=read_adapter(tmp_path / "wide-peft.pth", alpha=4))
    torch.save({"blocks.0.att.key.lora_A": torch.zeros(4, 64), "blocks.0.att.key.lora_B": torch.zeros(64, 4),
                "blocks.0.att.nonsense": torch.zeros(3)}, tmp_path / "unknown.pth")
    with pytest.raises(CheckpointError, match="blocks.0.att.nonsense is not a tensor of the base model"):
        aviary.load(base_path, adapter=read_adapter(tmp_path / "unknown.pth", alpha=4))
    with pytest.raises(CheckpointError, match="missing.pth: no such file"):
        aviary.load(base_path, adapter=tmp_path / "missing.pth")
    v4 = tiny(4)
    torch.save({f"blocks.{i}.att.time_state": torch.zeros(2, 32, 32) for i in range(2)}, tmp_path / "state.pth")
    with pytest.raises(ValueError, match="RWKV-4 has no matrix state"):
        merge(v4, read_adapter(tmp_path / "state.pth"))
    save_adapter(apply_peft(fresh(sd), PeftConfig("pissa", rank=4)), None, tmp_path / "p.pth")
    (tmp_path / "p.init_pissa.pth").unlink()
    with pytest.raises(CheckpointError, match="PiSSA adapter needs its initial factors"):
        read_adapter(tmp_path / "p.pth")


def _wider():
    from aviary.testing import random_config, random_state_dict

    return random_state_dict(random_config(7, n_layer=2, n_embd=128, head_size=32, vocab_size=300), seed=1)


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))
