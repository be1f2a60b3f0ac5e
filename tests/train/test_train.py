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
@pytest.mark.parametrize("strategy, chunk_len", [("ddp", 0), ("fsdp", 0), ("fsdp", 16)])
def test_two_processes_equal_one(corpus, tmp_path, strategy, chunk_len):
    """torchrun with 2 gloo processes (micro 2 each) == 1 process with micro 2 x accumulate 2; also with the
    samples in chunks (several backward passes per micro-batch under FSDP)."""
    one = train(tiny_config(corpus, tmp_path / "one", train__max_steps=6, train__micro_bsz=2, train__accumulate=2,
                            train__chunk_len=chunk_len))
    cfg = tiny_config(corpus, tmp_path / "two", train__max_steps=6, train__micro_bsz=2, train__strategy=strategy,
                      train__chunk_len=chunk_len)
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
    # inf and NaN slip past every < and > (reliability probe, finding 12)
    ("optim:\n  lr_init: .inf\n", "optim.lr_init=inf must be a finite number"),
    ("optim:\n  grad_clip: .nan\n", "optim.grad_clip=nan must be a finite number"),
    ("train:\n  epochs: .inf\n", "train.epochs=inf must be a finite number"),
    ("train:\n  max_steps: 1e400\n", "train.max_steps: expected int, got '1e400'"),
    ("train:\n  max_steps: 2.5\n", "train.max_steps: expected int"),
    ("out:\n  val_samples: 0\n", "out.val_samples must be positive"),
    ("out:\n  val_samples: -1\n", "out.val_samples must be positive"),
    ("train:\n  threads: -1\n", "train.threads=-1 must be >= 0"),
    ("train:\n  device: tpu\n", "train.device='tpu' is not one of"),
    ("train:\n  device: gpu0\n", "train.device='gpu0' is not one of"),
    ("model:\n  rank_mix: 16\n", "model.rank_mix=16: must be >= 0, and set only for a version with that LoRA "
                                  r"\(RWKV-7 has rank_w, rank_a, rank_v, rank_g\)"),
    ("model:\n  rank_g: -1\n", "model.rank_g=-1: must be >= 0"),
])
def test_bad_configs_are_refused(tmp_path, corpus, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(tmp_path / "c.yaml")
        if not cfg.data.train:
            cfg.data.train = str(corpus[0])
        cfg.validate()


def test_every_problem_on_one_line(tmp_path, corpus):
    cfg = TrainConfig()
    cfg.data.train, cfg.optim.lr_init, cfg.train.threads, cfg.out.val_samples = str(corpus[0]), float("nan"), -2, 0
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    message = str(e.value)
    assert "\n" not in message and message.count(";") == 2
    assert "optim.lr_init=nan" in message and "train.threads" in message and "out.val_samples" in message


def test_int_options_from_the_command_line():
    from aviary.train.config import set_field

    cfg = TrainConfig()
    set_field(cfg, "train.max_steps", "1e3")
    assert cfg.train.max_steps == 1000
    for bad in ("1e400", "nan", "inf", "2.5", "ten"):
        with pytest.raises(ConfigError, match="expected int"):
            set_field(cfg, "train.max_steps", bad)


def test_binary_config_names_the_file(tmp_path):
    (tmp_path / "c.yaml").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=r"c\.yaml: not a YAML or TOML text file"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks_is_refused_before_compute(tmp_path, corpus):
    with pytest.raises(ConfigError, match="train.device cuda: no CUDA device"):
        train(tiny_config(corpus, tmp_path, train__device="cuda"))
    assert not tmp_path.joinpath("log.jsonl").exists()


def test_divergence_is_one_clear_error(tmp_path, corpus, capsys):
    from aviary.train.loop import DivergedError

    with pytest.raises(DivergedError, match="loss became nan at step") as e:
        train(tiny_config(corpus, tmp_path / "a", optim__lr_init=1e6, train__max_steps=6))
    assert isinstance(e.value, FloatingPointError) and isinstance(e.value, ValueError)
    argv = ["train", *_flags(tiny_config(corpus, tmp_path / "b", optim__lr_init=1e6, train__max_steps=6))]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aviary train: error: loss became nan") and "\n" not in err


def test_no_validation_windows_is_no_loss(corpus):
    """evaluate over no windows returns NaN, never a loss of 0.0 (validate() refuses val_samples <= 0)."""
    from aviary.model import RWKV
    from aviary.train.data import BinIdx
    from aviary.train.init import model_config
    from aviary.train.loop import _Dist, evaluate

    cfg = tiny_config(corpus, "unused", out__val_samples=0)
    model = RWKV(model_config(7, 1, 32, VOCAB, 16, 0))
    assert math.isnan(evaluate(model, BinIdx(corpus[1]), cfg, _Dist(), torch.device("cpu")))


def _flags(cfg: TrainConfig) -> list[str]:
    return [f"--{s}.{k}={v}" for s, sec in cfg.to_dict().items() for k, v in sec.items()]


# ---- resuming in a run directory that holds someone else's checkpoints ------------------------------------


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(corpus, run, train__max_steps=2, out__save_every=1, out__val_samples=1))
    return run


def _copy_run(run: Path, to: Path) -> tuple[Path, Path]:
    import shutil

    shutil.copytree(run, to)
    return to, list_checkpoints(to)[-1]


def test_resume_with_another_model_size_says_what_changed(corpus, finished_run, tmp_path, capsys):
    run, newest = _copy_run(finished_run, tmp_path / "run")
    config_before = (run / "config.json").read_text()
    argv = ["train", *_flags(tiny_config(corpus, run, train__max_steps=4, model__n_embd=64))]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and newest.name in err and "model.n_embd 32 -> 64" in err
    assert "choose another --out.dir" in err
    assert (run / "config.json").read_text() == config_before  # nothing in the run directory was touched


@pytest.mark.parametrize("damage, message", [
    ("truncate", "not a readable training checkpoint (truncated or corrupt?)"),
    ("pickle", "refused to load: the pickle asks to import"),
    ("keyless", "does not fit this run's model (missing"),
    ("not-a-checkpoint", "not a training checkpoint"),
])
def test_resume_from_a_damaged_checkpoint_names_it(corpus, finished_run, tmp_path, capsys, damage, message):
    run, newest = _copy_run(finished_run, tmp_path / "run")
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:3000])
    elif damage == "pickle":
        class Payload:
            def __reduce__(self):
                return os.system, (f"touch {tmp_path / 'ran'}",)

        torch.save({"model": Payload()}, newest)
    else:
        payload = torch.load(newest, weights_only=True)
        payload["model" if damage == "keyless" else "step"] = {} if damage == "keyless" else "two"
        torch.save(payload, newest)
    assert main(["train", *_flags(tiny_config(corpus, run, train__max_steps=4))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"aviary train: error: {newest}: ") and "\n" not in err, err
    assert message in err and "delete" in err
    assert not (tmp_path / "ran").exists()


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
