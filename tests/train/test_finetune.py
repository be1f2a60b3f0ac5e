"""Fine-tuning in the training loop: adapters (`peft`), masked losses (chat data) and chunked samples
(`train.chunk_len`). Checkpoints hold the adapter and the optimizer only and resume exactly; the run exports
the adapter and the merged model, which agree; the loss counts only target tokens; bad combinations are
refused before any compute. Tiny random base models (vocab 64, width 32), a few steps each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import aviary
from aviary.cli import main
from aviary.peft import PeftConfig, adapter_state_dict, apply_peft, load_adapter_state_dict
from aviary.testing import random_config, save_random_checkpoint
from aviary.train import train
from aviary.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from aviary.train.config import ConfigError
from aviary.train.data import BinIdx, BinIdxWriter
from aviary.train.sampler import WindowSampler
from test_train import VOCAB, _flags, _free_port, log_losses, make_corpus, tiny_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("corpus")
    return make_corpus(d / "train"), make_corpus(d / "valid", n_docs=8, seed=1)


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Path:
    """Conversation-like documents with a loss mask: a 'question' of random ids (context, mask 0) and an
    'answer' that continues an arithmetic progression (targets, mask 1), then the end-of-document id (mask 0)."""
    prefix = tmp_path_factory.mktemp("chat") / "chat"
    rng = np.random.default_rng(2)
    w = BinIdxWriter(prefix, mask=True)
    for _ in range(60):
        question = rng.integers(1, VOCAB, rng.integers(5, 20)).tolist()
        start, stride = rng.integers(1, VOCAB), rng.integers(1, 4)
        answer = [int(1 + (start + stride * i) % (VOCAB - 1)) for i in range(rng.integers(5, 25))]
        w.add(question + answer + [0], [0] * len(question) + [1] * len(answer) + [0])
    w.close()
    return prefix


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The model to fine-tune: a random RWKV-7 with the shapes of tiny_config (C 32, head 16, vocab 64)."""
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_random_checkpoint(path, random_config(7, n_layer=2, n_embd=32, vocab_size=VOCAB, head_size=16), seed=3)
    return path


def finetune_config(corpus, out: Path, base: Path, method: str = "lora", **overrides):
    defaults = {"model__load": str(base), "peft__method": method, "peft__rank": 4, "peft__alpha": 8.0,
                "optim__lr_init": 0.2 if method == "state" else 1e-2}
    return tiny_config(corpus, out, **{**defaults, **overrides})


# ---- adapters: checkpoints, resume, exports ---------------------------------------------------------------


@pytest.mark.parametrize("method, chunk_len", [("lora", 0), ("state", 16)])
def test_resume_of_a_finetuning_run_is_exact(corpus, base, tmp_path, method, chunk_len):
    """Stop after step 4, resume: steps 5-8 have the losses of a straight run; the checkpoint holds the adapter
    (RWKV-PEFT's names), the optimizer state and the base's fingerprint, and no base weight."""
    def config(out):
        return finetune_config(corpus, out, base, method, train__max_steps=8, out__save_every=4,
                               train__chunk_len=chunk_len)

    full = train(config(tmp_path / "full"))
    part = tmp_path / "part"
    train(config(part))
    for p in list_checkpoints(part)[1:]:
        p.unlink()
    (part / "log.jsonl").unlink()
    resumed = train(config(part))
    assert resumed.losses == full.losses[4:]  # fp32 on CPU: bitwise
    payload = load_checkpoint(latest_checkpoint(part))
    model = aviary.load(base)
    apply_peft(model, PeftConfig(method, rank=4, alpha=8.0))
    assert payload["model"].keys() == adapter_state_dict(model).keys()
    assert all(("lora_" in k) if method == "lora" else k.endswith("att.time_state") for k in payload["model"])
    assert {"optimizer", "step", "config", "base"} <= payload.keys()
    assert log_losses(part)[5] == full.losses[4]


def test_resume_refuses_another_adapter_or_base(corpus, base, tmp_path, capsys):
    run = tmp_path / "run"
    train(finetune_config(corpus, run, base, train__max_steps=2, out__save_every=1))
    other_base = tmp_path / "other.safetensors"
    save_random_checkpoint(other_base, random_config(7, n_layer=2, n_embd=32, vocab_size=VOCAB, head_size=16), seed=4)
    for overrides, message in [({"peft__rank": 8}, "another fine-tuning (peft.rank 4 -> 8)"),
                               ({"peft__method": "state"}, "another fine-tuning (peft.method lora -> state)"),
                               ({"peft__method": "none"}, "another fine-tuning (peft.method lora -> none)"),
                               ({"model__load": str(other_base)}, "an adapter trained on another base model")]:
        cfg = finetune_config(corpus, run, base, train__max_steps=4, **overrides)
        assert main(["train", *_flags(cfg)]) == 2
        err = capsys.readouterr().err
        assert message in err and "choose another --out.dir" in err, err


def test_cli_lora_run_exports_adapter_and_merged_model(corpus, base, tmp_path, capsys):
    """`aviary train --model.load BASE --peft.method lora ...`: adapter.{safetensors,pth} and model.* whose
    logits are the adapter-applied model's, with alpha != rank and after a few steps."""
    run = tmp_path / "run"
    cfg = finetune_config(corpus, run, base, train__max_steps=4, out__export="safetensors,pth",
                          out__export_dtype="fp32")
    assert main(["train", *_flags(cfg)]) == 0
    out = capsys.readouterr().out
    assert "lora fine-tuning" in out and "trainable parameters" in out and "exported" in out
    for name in ("adapter.safetensors", "adapter.pth", "model.safetensors", "model.pth"):
        assert (run / name).is_file(), name
    adapted = aviary.load(base)
    apply_peft(adapted, PeftConfig("lora", rank=4, alpha=8.0))
    load_adapter_state_dict(adapted, load_checkpoint(latest_checkpoint(run))["model"])
    tokens = torch.tensor([[1, 4, 7, 10, 13, 16, 19]])
    want = adapted.eval()(tokens)[0]
    torch.testing.assert_close(aviary.load(run / "model.safetensors")(tokens)[0], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aviary.load(base, adapter=run / "adapter.safetensors")(tokens)[0], want,
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(aviary.load(base)(tokens)[0], want, atol=1e-3)  # it did train



def test_a_finetuning_run_validates_before_its_first_step(corpus, base, tmp_path):
    """With model.load and data.valid, log.jsonl has a val_loss at step 0: the base model's, on the windows the
    last validation uses, so before and after compare. A run from scratch and a resumed run add none."""
    import json

    from aviary.train.loop import _Dist, evaluate

    def val_losses(run_dir: Path) -> dict[int, float]:
        records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        return {r["step"]: r["val_loss"] for r in records if "val_loss" in r and "event" not in r}

    cfg = finetune_config(corpus, tmp_path / "ft", base, train__max_steps=4, out__save_every=2)
    r = train(cfg)
    vals = val_losses(tmp_path / "ft")
    assert list(vals) == [0, 4] and vals[4] == r.val_loss < vals[0]
    assert vals[0] == evaluate(aviary.load(base), BinIdx(corpus[1]), cfg, _Dist(), torch.device("cpu"))
    cfg.train.max_steps = 6  # resumed from step 4: no second step-0 record
    train(cfg)
    assert list(val_losses(tmp_path / "ft")) == [0, 4, 6]
    train(tiny_config(corpus, tmp_path / "scratch", train__max_steps=2))
    assert list(val_losses(tmp_path / "scratch")) == [2]

# ---- masked losses ----------------------------------------------------------------------------------------


def test_loss_is_the_mean_over_target_tokens(chat, base, tmp_path):
    """The first step's loss (before any update) and the validation loss are the cross-entropy of the base
    model averaged over the tokens whose mask is on, with the targets of window o at o+1 .. o+T."""
    from aviary.train.loop import _Dist, evaluate

    cfg = tiny_config((chat, chat), tmp_path, model__load=str(base), train__max_steps=1, train__chunk_len=16)
    r = train(cfg)
    data, model = BinIdx(chat), aviary.load(base)
    sampler = WindowSampler(len(data), 32, seed=0)

    def masked_mean(offsets):
        rows = torch.from_numpy(np.stack([data.get(o, 33) for o in offsets]))
        mask = torch.from_numpy(np.stack([data.get_mask(o + 1, 32) for o in offsets]))
        with torch.no_grad():
            logits = model(rows[:, :-1])[0]
        ce = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="none").view(mask.shape)
        return ce[mask].mean().item()

    assert r.losses[0] == pytest.approx(masked_mean([sampler(j) for j in range(4)]), rel=1e-5)
    n_windows = (len(data) - 1) // 32
    picks = [int(i * n_windows / 8) * 32 for i in range(8)]
    assert evaluate(model, data, cfg, _Dist(), torch.device("cpu")) == pytest.approx(masked_mean(picks), rel=1e-5)


def test_masked_accumulation_equals_bigger_batch(chat, base, tmp_path):
    """Tokens weigh 1 / (target tokens of the whole step), so micro 2 x accumulate 2 == micro 4 with a mask."""
    a = train(finetune_config((chat, chat), tmp_path / "a", base, train__max_steps=4))
    b = train(finetune_config((chat, chat), tmp_path / "b", base, train__max_steps=4, train__micro_bsz=2,
                              train__accumulate=2))
    np.testing.assert_allclose(a.losses, b.losses, rtol=2e-5)


def test_no_target_tokens_is_loss_zero(base, tmp_path):
    prefix = tmp_path / "none"
    w = BinIdxWriter(prefix, mask=True)
    for _ in range(4):
        w.add(list(range(1, 40)) + [0], [0] * 40)
    w.close()
    r = train(tiny_config((prefix, ""), tmp_path / "run", model__load=str(base), train__max_steps=2))
    assert r.losses == [0.0, 0.0]


# ---- chunked samples -----------------------------------------------------------------------------------------


def test_full_chunks_train_like_whole_samples(corpus, base, tmp_path):
    whole = train(finetune_config(corpus, tmp_path / "whole", base, train__max_steps=4))
    chunked = train(finetune_config(corpus, tmp_path / "chunked", base, train__max_steps=4, train__chunk_len=16))
    np.testing.assert_allclose(chunked.losses, whole.losses, rtol=1e-5)
    np.testing.assert_allclose(chunked.val_loss, whole.val_loss, rtol=1e-5)
    truncated = train(finetune_config(corpus, tmp_path / "truncated", base, train__max_steps=4, train__chunk_len=16,
                                      train__chunk_mode="truncated"))
    assert truncated.losses[0] == pytest.approx(whole.losses[0], rel=1e-5)  # the same forward values
    assert truncated.losses[-1] < truncated.losses[0]


@pytest.mark.slow
def test_two_processes_equal_one_with_state_tuning_chunks_and_a_mask(chat, base, tmp_path):
    """torchrun with 2 gloo processes (micro 2 each) == 1 process with micro 2 x accumulate 2: DDP reduces the
    time_state gradient of chunk 0's backward, the last of each step."""
    kw = {"train__max_steps": 4, "train__micro_bsz": 2, "train__chunk_len": 16}
    one = train(finetune_config((chat, chat), tmp_path / "one", base, "state", train__accumulate=2, **kw))
    cfg = finetune_config((chat, chat), tmp_path / "two", base, "state", **kw)
    args = [f for f in _flags(cfg) if not f.endswith("=")]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "aviary", "train", *args],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = log_losses(tmp_path / "two")
    np.testing.assert_allclose([two[s] for s in range(1, 5)], one.losses, rtol=1e-5)


# ---- refused before compute --------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"peft__method": "lora", "model__load": ""}, "peft.method=lora fine-tunes a trained model: set model.load"),
    ({"peft__method": "adapter"}, "peft.method='adapter' is not one of"),
    ({"peft__method": "lora", "train__strategy": "fsdp"}, "does not run under train.strategy fsdp"),
    ({"peft__method": "lora", "peft__rank": 0}, "peft rank must be a positive integer"),
    ({"peft__method": "miss", "peft__dropout": 0.1}, "dropout is LoRA's"),
    ({"peft__method": "state", "train__chunk_len": 16, "train__chunk_mode": "truncated"},
     "use train.chunk_mode full"),
    ({"train__chunk_len": 24}, "train.chunk_len=24 must be 0 (off) or a multiple of 16 that divides data.ctx_len=32"),
    ({"train__chunk_len": 64}, "multiple of 16 that divides"),
    ({"train__chunk_mode": "bptt"}, "train.chunk_mode='bptt' is not one of"),
])
def test_bad_finetuning_configs_are_refused(corpus, base, tmp_path, overrides, message):
    cfg = tiny_config(corpus, tmp_path, **{"model__load": str(base), **overrides})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg.validate()


def test_state_tuning_of_rwkv4_is_refused_before_training(corpus, tmp_path):
    v4 = tmp_path / "v4.safetensors"
    save_random_checkpoint(v4, random_config(4, n_layer=2, n_embd=32, vocab_size=VOCAB, head_size=32))
    with pytest.raises(ConfigError, match="RWKV-4 has no matrix state to tune"):
        train(tiny_config(corpus, tmp_path / "run", model__load=str(v4), peft__method="state"))
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_the_example_finetuning_config_is_valid(corpus):
    from aviary.train.config import load_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs" / "finetune-lora.yaml")
    cfg.model.load, cfg.data.train = str(root / cfg.model.load), str(corpus[0])
    cfg.validate()
    assert cfg.peft.method == "lora"
