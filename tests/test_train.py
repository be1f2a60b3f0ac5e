"""Training: the loss falls for every version, exact resume, export that loads in aviary and the pip package,
and bad configs refused before any compute. Tiny models (vocab 64, width 32-64), a few dozen steps each."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import aviary
from aviary.cli import main
from aviary.train import TrainConfig, train
from aviary.train.checkpoint import list_checkpoints
from aviary.train.config import ConfigError, load_config
from aviary.train.data import write_binidx

VOCAB = 64


def make_corpus(prefix: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """Documents of a few arithmetic-progression patterns: easy to learn, impossible to memorise at once."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        start, stride, n = rng.integers(1, VOCAB), rng.integers(1, 4), rng.integers(40, 120)
        docs.append([int(1 + (start + stride * i) % (VOCAB - 1)) for i in range(n)] + [0])
    write_binidx(prefix, docs)
    return prefix


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("corpus")
    return make_corpus(d / "train"), make_corpus(d / "valid", n_docs=8, seed=1)


def tiny_config(corpus, out: Path, version: int = 7, **overrides) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.version, cfg.model.n_layer, cfg.model.n_embd, cfg.model.head_size = version, 2, 32, 16
    cfg.model.vocab_size = VOCAB
    cfg.data.train, cfg.data.valid, cfg.data.ctx_len = str(corpus[0]), str(corpus[1]), 32
    cfg.optim.lr_init, cfg.optim.lr_final, cfg.optim.warmup_steps = 1e-2, 1e-3, 3
    cfg.train.micro_bsz, cfg.train.max_steps, cfg.train.threads, cfg.train.device = 4, 30, 1, "cpu"
    cfg.out.dir, cfg.out.progress, cfg.out.log_every, cfg.out.save_every = str(out), False, 1, 10
    cfg.out.val_samples, cfg.out.export = 8, ""
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


def log_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_loss_falls_for_every_version(corpus, tmp_path, version):
    r = train(tiny_config(corpus, tmp_path, version=version, train__max_steps=25))
    first, last = np.mean(r.losses[:3]), np.mean(r.losses[-3:])
    assert last < first - 0.8, (version, r.losses)
    assert r.val_loss is not None and r.val_loss < first
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "loss.png").stat().st_size > 1000


def test_resume_is_exact(corpus, tmp_path):
    """Stop after step 6 (the checkpoint a killed run leaves), resume: steps 7-12 are bitwise the same."""
    full = train(tiny_config(corpus, tmp_path / "full", train__max_steps=12, out__save_every=6))
    part = tmp_path / "part"
    train(tiny_config(corpus, part, train__max_steps=12, out__save_every=6))
    # a kill between step 6's checkpoint and the end: only step 6 survives
    for p in list_checkpoints(part)[1:]:
        p.unlink()
    (part / "log.jsonl").unlink()
    resumed = train(tiny_config(corpus, part, train__max_steps=12, out__save_every=6))
    assert resumed.steps == 12 and len(resumed.losses) == 6
    assert resumed.losses == full.losses[6:]  # fp32 on CPU: bitwise


def test_checkpoints_keep_last_n_and_atomic_names(corpus, tmp_path):
    train(tiny_config(corpus, tmp_path, train__max_steps=8, out__save_every=2, out__keep_last=2))
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-00000006.pt", "step-00000008.pt"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_accumulation_equals_bigger_batch(corpus, tmp_path):
    """micro 2 x accumulate 2 is the same optimizer step as micro 4 (L2Wrap scaled by grad_output)."""
    a = train(tiny_config(corpus, tmp_path / "a", train__max_steps=6))
    b = train(tiny_config(corpus, tmp_path / "b", train__max_steps=6, train__micro_bsz=2, train__accumulate=2))
    np.testing.assert_allclose(a.losses, b.losses, rtol=2e-5)


def test_bf16_and_grad_checkpointing_run(corpus, tmp_path):
    plain = train(tiny_config(corpus, tmp_path / "p", train__max_steps=4))
    cp = train(tiny_config(corpus, tmp_path / "cp", train__max_steps=4, train__grad_cp=True))
    np.testing.assert_allclose(plain.losses, cp.losses, rtol=1e-5)
    bf = train(tiny_config(corpus, tmp_path / "bf", train__max_steps=4, train__precision="bf16"))
    np.testing.assert_allclose(plain.losses[0], bf.losses[0], rtol=2e-2)


def test_export_loads_and_continues_training(corpus, tmp_path):
    r = train(tiny_config(corpus, tmp_path / "run", train__max_steps=5, out__export="safetensors,pth",
                          out__export_dtype="fp32"))
    assert [p.name for p in r.exported] == ["model.safetensors", "model.pth"]
    tokens = torch.tensor([[1, 4, 7, 10, 13]])
    a = aviary.load(r.exported[0])(tokens)[0]
    b = aviary.load(r.exported[1])(tokens)[0]
    assert torch.equal(a, b)
    # fine-tune from the export: starts where the first run ended
    ft = train(tiny_config(corpus, tmp_path / "ft", train__max_steps=2, model__load=str(r.exported[0])))
    assert ft.losses[0] < r.losses[0] - 0.3


@pytest.mark.oracle
def test_export_matches_the_pip_package(corpus, tmp_path):
    from oracle import run_oracle, rwkv_available

    if not rwkv_available():
        pytest.skip("the rwkv pip package is not installed")
    jobs, ours = [], {}
    tokens = [1, 4, 7, 10, 13, 16, 19, 22]
    for version in (4, 5, 6, 7):
        r = train(tiny_config(corpus, tmp_path / f"v{version}", version=version, train__max_steps=3,
                              out__export="pth", out__export_dtype="fp32"))
        jobs.append({"name": f"v{version}", "version": version, "model": str(r.exported[0]),
                     "strategy": "cpu fp32", "tokens": tokens, "mode": "sequence"})
        ours[f"v{version}"] = aviary.load(r.exported[0])(torch.tensor([tokens]))[0][0]
    theirs = run_oracle(jobs)
    for name, logits in ours.items():
        torch.testing.assert_close(logits, theirs[f"{name}.logits"], atol=1e-4, rtol=1e-4, msg=name)


def _free_port() -> int:
    """A TCP port nothing listens on now (a fixed one can still be held from an earlier run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(corpus, tmp_path, strategy):
    """torchrun with 2 gloo processes (micro 2 each) == 1 process with micro 2 x accumulate 2."""
    one = train(tiny_config(corpus, tmp_path / "one", train__max_steps=6, train__micro_bsz=2, train__accumulate=2))
    cfg = tiny_config(corpus, tmp_path / "two", train__max_steps=6, train__micro_bsz=2, train__strategy=strategy)
    args = [f"--{s}.{k}={v}" for s, sec in cfg.to_dict().items() for k, v in sec.items() if v != ""]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "aviary", "train", *args],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = log_losses(tmp_path / "two")
    np.testing.assert_allclose([two[s] for s in range(1, 7)], one.losses, rtol=1e-5)


# ---- configs and errors: all before any compute -----------------------------------------------------


def test_yaml_toml_and_command_line_overrides(tmp_path, corpus):
    (tmp_path / "c.yaml").write_text("model:\n  n_layer: 3\noptim:\n  lr_init: 1e-3\n")
    (tmp_path / "c.toml").write_text("[model]\nn_layer = 3\n[optim]\nlr_init = 1e-3\n")
    assert load_config(tmp_path / "c.yaml").to_dict() == load_config(tmp_path / "c.toml").to_dict()
    assert load_config(tmp_path / "c.yaml").optim.lr_init == 1e-3


@pytest.mark.parametrize("text,message", [
    ("model:\n  n_layers: 3\n", "unknown option 'model.n_layers'"),
    ("modle:\n  n_layer: 3\n", "unknown section 'modle'"),
    ("model:\n  n_layer: three\n", "expected int"),
    ("data:\n  ctx_len: 100\n", "multiple of 16"),
    ("model:\n  n_embd: 100\n", "not a multiple of model.head_size"),
    ("optim:\n  schedule: linear\n", "is not one of"),
])
def test_bad_configs_are_refused(tmp_path, corpus, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(tmp_path / "c.yaml")
        if not cfg.data.train:
            cfg.data.train = str(corpus[0])
        cfg.validate()


def test_cli_errors_before_compute(tmp_path, corpus, capsys):
    assert main(["train", "--data.train", str(tmp_path / "nope"), "--out.dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "nope.bin" in err and "aviary data prepare" in err
    assert not (tmp_path / "o").exists()
    assert main(["train", str(tmp_path / "absent.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    assert main(["train", "--data.train", str(corpus[0]), "--train.micro_bsz", "0"]) == 2
    assert main(["train", "--print-config", "--optim.lr_init", "3e-4"]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["lr_init"] == 3e-4


def test_data_beyond_vocab_is_refused(tmp_path, corpus):
    write_binidx(tmp_path / "big", [[1, 2, 300, 0] * 20])
    with pytest.raises(ConfigError, match="beyond the model's vocabulary"):
        train(tiny_config((tmp_path / "big", corpus[1]), tmp_path / "run"))


def test_compact_vocab_exports_the_exact_full_model(corpus, tmp_path):
    """Rows only for ids seen in training, the rest lumped: the exported full-vocabulary model gives the
    same log-probabilities as the compact one, and unseen ids share the lumped row's mass equally."""
    from aviary.model import RWKV
    from aviary.train.checkpoint import latest_checkpoint, load_checkpoint
    from aviary.train.vocab import CompactVocab

    r = train(tiny_config(corpus, tmp_path, model__vocab_size=200, model__compact_vocab=True, train__max_steps=4,
                          out__export="safetensors", out__export_dtype="fp32"))
    full = aviary.load(r.exported[0])
    assert full.config.vocab_size == 200
    payload = load_checkpoint(latest_checkpoint(tmp_path))
    vocab = CompactVocab.from_tokens(np.fromfile(str(corpus[0]) + ".bin", dtype=np.uint16), 200)
    compact = RWKV(full.config.__class__(**{**full.config.to_dict(), "vocab_size": vocab.size}))
    compact.load_state_dict(payload["model"])
    tokens = torch.tensor([[1, 4, 7, 10, 13, 16]])
    lp_full = torch.log_softmax(full(tokens)[0], -1)
    lp_compact = torch.log_softmax(vocab.logits(compact(vocab.map(tokens))[0]), -1)
    torch.testing.assert_close(lp_full[..., vocab.used], lp_compact[..., :vocab.K], atol=1e-5, rtol=1e-5)
    unseen = np.setdiff1d(np.arange(200), vocab.used)
    torch.testing.assert_close(lp_full[..., unseen],
                               (lp_compact[..., vocab.K:] - math.log(vocab.n_shared)).expand(-1, -1, len(unseen)))
    assert r.losses[-1] < r.losses[0]
