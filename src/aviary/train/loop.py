"""`train(config)`: the training loop, for one process or many under `torchrun` (DDP or FSDP).

One optimizer step reads `micro_bsz * accumulate * world_size` windows. Global sample number
k = (step * accumulate + micro) * world * micro_bsz + rank * micro_bsz + j picks its window through the
`WindowSampler`, so the set of windows of a step depends only on the global batch: one process with
accumulate=2 and two processes with accumulate=1 see the same data and (up to float summation order)
compute the same update.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from aviary.devices import check_device
from aviary.io.checkpoint import CheckpointError, first_sentence
from aviary.train.checkpoint import export, latest_checkpoint, load_checkpoint, save_checkpoint
from aviary.train.config import ConfigError, TrainConfig
from aviary.train.data import BinIdx
from aviary.train.init import init_model, model_config
from aviary.train.optim import L2Wrap, lr_at, make_optimizer, set_lr
from aviary.train.sampler import WindowSampler
from aviary.train.vocab import CompactVocab

__all__ = ["train", "TrainResult", "DivergedError"]

# the model fields that decide the shapes of the weights; a checkpoint written with other values cannot resume
_SHAPE_FIELDS = ("version", "n_layer", "n_embd", "head_size", "dim_ffn", "vocab_size", "compact_vocab")


class DivergedError(FloatingPointError, ValueError):
    """The training loss became inf or NaN. A ValueError too, so the CLI reports it in one line: the cure is
    a setting (a lower learning rate), not a code fix."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    losses: list[float]  # training loss of every step run by this call
    val_loss: float | None
    exported: list[Path]
    wall_s: float


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run created the process group, so it destroys it at the end

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_name: str) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:  # train.device is already one of auto, cpu, cuda, cuda:N, mps (TrainConfig.validate)
        device = check_device(device_name, "train.device", "--train.device cpu")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if world == 1:
        return _Dist(), device
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def _all_mean(x: float, d: _Dist, device: torch.device) -> float:
    if d.world == 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / d.world


def _build_model(cfg: TrainConfig, device: torch.device, vocab: CompactVocab | None):
    from aviary.model import RWKV

    m = cfg.model
    if m.load:
        from aviary.loading import load

        model = load(m.load, dtype="float32")
        model.train()
        return model.to(device)
    rows = vocab.size if vocab is not None else m.vocab_size
    config = model_config(m.version, m.n_layer, m.n_embd, rows, m.head_size, m.dim_ffn)
    model = RWKV(config, backend="chunked").to(device)
    return init_model(model, seed=cfg.train.seed, lr_init=cfg.optim.lr_init)


def _enable_grad_checkpointing(model) -> None:
    """Recompute each block in the backward pass (RWKV-LM --grad_cp 1)."""
    for block in model.blocks:
        forward = block.forward

        def wrapped(*args, _forward=forward):
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False)

        block.forward = wrapped


def _rows(data: BinIdx, offsets: list[int], T: int, device, vocab: CompactVocab | None) -> torch.Tensor:
    t = torch.from_numpy(np.stack([data.get(o, T + 1) for o in offsets])).to(device)  # [B, T+1]
    return vocab.map(t) if vocab is not None else t


def _batch(data: BinIdx, sampler: WindowSampler, first: int, n: int, device,
           vocab: CompactVocab | None) -> tuple[torch.Tensor, torch.Tensor]:
    t = _rows(data, [sampler(first + j) for j in range(n)], sampler.ctx_len, device, vocab)
    return t[:, :-1], t[:, 1:]


def _logits(model, x, cfg: TrainConfig, device, vocab: CompactVocab | None) -> torch.Tensor:
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    with autocast:
        logits, _ = model(x)
    logits = logits.float()
    return vocab.logits(logits) if vocab is not None else logits


def _loss(model, x, y, cfg: TrainConfig, device, vocab: CompactVocab | None) -> torch.Tensor:
    logits = _logits(model, x, cfg, device, vocab)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    if cfg.optim.l2wrap > 0 and torch.is_grad_enabled():
        loss = L2Wrap.apply(loss, logits, cfg.optim.l2wrap)
    return loss


@torch.no_grad()
def evaluate(model, data: BinIdx, cfg: TrainConfig, d: _Dist, device, vocab: CompactVocab | None = None) -> float:
    """Mean loss over `out.val_samples` windows spread evenly over the held-out stream (fixed every time)."""
    T = cfg.data.ctx_len
    n_windows = (len(data) - 1) // T
    n = min(cfg.out.val_samples, n_windows)
    if n >= d.world:  # the same number of forward passes on every rank (FSDP gathers in each)
        n -= n % d.world
    picks = [int(i * n_windows / n) * T for i in range(n)]
    mine = picks[d.rank::d.world]
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(mine), cfg.train.micro_bsz):
        chunk = mine[i:i + cfg.train.micro_bsz]
        rows = _rows(data, chunk, T, device, vocab)
        logits, y = _logits(model, rows[:, :-1], cfg, device, vocab), rows[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        if vocab is not None:  # an id unseen in training: its own share of the lumped row's probability
            nll = nll + (y.reshape(-1) == vocab.K) * math.log(vocab.n_shared)
        total += nll.sum().item() / T
        count += len(chunk)
    model.train(was_training)
    if d.world > 1:
        import torch.distributed as dist

        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / count if count else float("nan")  # no windows: no loss (never 0.0)


def _total_steps(cfg: TrainConfig, n_windows: int, global_bsz: int) -> int:
    t = cfg.train
    if t.max_steps:
        return t.max_steps
    if t.max_tokens:
        return max(1, t.max_tokens // (global_bsz * cfg.data.ctx_len))
    return max(1, int(t.epochs * n_windows) // global_bsz)


def _state_dicts(model, optimizer, fsdp: bool) -> tuple[dict, dict]:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), optimizer.state_dict()


def _resume_payload(path: Path, cfg: TrainConfig, model) -> dict:
    """The newest checkpoint of the run directory, checked against this run's model before anything is
    loaded from it: a checkpoint of another model size is a run directory reused by mistake."""
    payload = load_checkpoint(path)
    fix = f"delete {path.parent} or choose another --out.dir"
    saved = payload["config"].get("model") if isinstance(payload.get("config"), dict) else None
    if isinstance(saved, dict) and not cfg.model.load and not saved.get("load"):
        changed = [f"model.{k} {saved[k]!r} -> {getattr(cfg.model, k)!r}" for k in _SHAPE_FIELDS
                   if k in saved and saved[k] != getattr(cfg.model, k)]
        if changed:
            raise CheckpointError(path, f"this run directory holds checkpoints of another model "
                                        f"({', '.join(changed)}); {fix}")
    ours, theirs = model.state_dict(), payload["model"]
    missing, extra = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    shapes = [k for k in sorted(ours.keys() & theirs.keys()) if tuple(ours[k].shape) != tuple(theirs[k].shape)]
    if missing or extra or shapes:
        found = [f"{what} {names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
                 for what, names in (("missing", missing), ("unexpected", extra), ("other shape for", shapes))
                 if names]
        raise CheckpointError(path, f"does not fit this run's model ({'; '.join(found)}); {fix}")
    return payload


def _load_state_dicts(model, optimizer, msd: dict, osd: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd,
                       options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(msd)
    optimizer.load_state_dict(osd)


class _Logger:
    """JSONL log (+ optional TensorBoard) written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = run_dir / "log.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                print("aviary train: TensorBoard logging needs the `tensorboard` package; skipping it")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float | int):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_losses(log_path: Path, png_path: Path) -> Path | None:
    """Training and validation loss against tokens, from log.jsonl; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train, val = [], []
    for line in log_path.read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            train.append((r["tokens"], r["loss"]))
        if "val_loss" in r:
            val.append((r["tokens"], r["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or continue) as `cfg` says; resumes from the newest checkpoint in `out.dir` if there is one."""
    cfg.validate()
    t0 = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    d, device = _setup_distributed(cfg.train.device)
    result = _train(cfg, d, device, t0)
    if d.owns_group:
        # A process that exits with its gloo group alive aborts now and then in C++ ("terminate called
        # without an active exception") while Python tears down, which turns a finished run into a failed
        # one under torchrun (6 of 85 two-rank runs of a small DDP script here). The DDP/FSDP wrappers hold
        # the group and sit in reference cycles, so they are collected first: destroying the group while a
        # wrapper still holds it leaves the same abort (0 of 60 with the collection). Only after a run that
        # ended well, when every rank gets here: on an error the group is left alone, since destroying it
        # could wait for ranks that never arrive.
        import gc

        import torch.distributed as dist

        gc.collect()
        dist.destroy_process_group()
    return result


def _train(cfg: TrainConfig, d: _Dist, device: torch.device, t0: float) -> TrainResult:
    T = cfg.data.ctx_len
    data = BinIdx(cfg.data.train)
    valid = BinIdx(cfg.data.valid) if cfg.data.valid else None
    sampler = WindowSampler(len(data), T, seed=cfg.train.seed)
    if valid is not None and len(valid) < T + 1:
        raise ConfigError(f"data.valid has {len(valid)} tokens, fewer than one window of {T + 1}")
    run_dir = Path(cfg.out.dir)
    full_vocab = cfg.model.vocab_size
    if int(data.tokens.max()) >= full_vocab and not cfg.model.load:
        raise ConfigError(f"data.train holds token ids up to {int(data.tokens.max())}, beyond the model's "
                          f"vocabulary of {full_vocab}")
    vocab = CompactVocab.from_tokens(data.tokens, full_vocab) if cfg.model.compact_vocab else None
    model = _build_model(cfg, device, vocab)
    if vocab is None and int(data.tokens.max()) >= model.config.vocab_size:
        raise ConfigError(f"data.train holds token ids up to {int(data.tokens.max())}, beyond the model's "
                          f"vocabulary of {model.config.vocab_size}")
    model.train()
    ckpt = latest_checkpoint(run_dir)
    payload = _resume_payload(ckpt, cfg, model) if ckpt is not None else None
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if cfg.train.grad_cp:
        _enable_grad_checkpointing(model)
    raw_model = model
    fsdp = d.world > 1 and cfg.train.strategy == "fsdp"
    if d.world > 1:
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            # one FSDP unit per block, except block 0: the shell calls its ln0 outside the block's forward,
            # so block 0 stays in the root unit (gathered for the whole forward)
            for block in model.blocks[1:]:
                fully_shard(block)
            fully_shard(model)
        else:
            from torch.nn.parallel import DistributedDataParallel

            # find_unused_parameters: v7 layer 0 carries v0/v1/v2 (official names) that its math never uses
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                            find_unused_parameters=True)
    o = cfg.optim
    optimizer = make_optimizer(raw_model, o.lr_init, (o.beta1, o.beta2), o.adam_eps, o.weight_decay)

    step = 0
    if payload is not None:
        try:
            _load_state_dicts(raw_model if not fsdp else model, optimizer, payload["model"], payload["optimizer"],
                              fsdp)
        except (RuntimeError, ValueError, KeyError) as e:  # torch's words for "this state does not fit"
            raise CheckpointError(ckpt, f"does not fit this run ({type(e).__name__}: {first_sentence(e)}); delete "
                                        f"{ckpt.parent} or choose another --out.dir") from None
        step = payload["step"]
        if d.main:
            print(f"aviary train: resuming from {ckpt} (step {step})")

    micro, accum = cfg.train.micro_bsz, cfg.train.accumulate
    global_bsz = micro * accum * d.world
    total = _total_steps(cfg, sampler.n_windows, global_bsz)
    logger = _Logger(run_dir, d.main, cfg.out.tensorboard)
    if d.main and step == 0:
        logger.write({"step": 0, "tokens": 0, "event": "start", "parameters": raw_model.num_parameters,
                      "model": raw_model.config.to_dict(), "windows": sampler.n_windows, "total_steps": total,
                      "global_batch": global_bsz, "world_size": d.world,
                      "compact_vocab_rows": vocab.size if vocab is not None else None})

    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, disable=not (d.main and cfg.out.progress), unit="step",
               dynamic_ncols=True)
    losses: list[float] = []
    val_loss = None
    tok_per_step = global_bsz * T
    window_t, window_tokens = time.time(), 0
    while step < total:
        lr = lr_at(step, total, o.lr_init, o.lr_final, o.warmup_steps, o.schedule)
        set_lr(optimizer, lr)
        step_loss = 0.0
        for a in range(accum):
            first = ((step * accum + a) * d.world + d.rank) * micro
            x, y = _batch(data, sampler, first, micro, device, vocab)
            sync = a == accum - 1 or d.world == 1 or fsdp
            ctx = contextlib.nullcontext() if sync else model.no_sync()
            with ctx:
                loss = _loss(model, x, y, cfg, device, vocab)
                (loss / accum).backward()
            step_loss += loss.item() / accum
        if o.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip))
        else:
            grad_norm = float("nan")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_loss = _all_mean(step_loss, d, device)
        if not math.isfinite(step_loss):
            raise DivergedError(f"loss became {step_loss} at step {step}; lower optim.lr_init?")
        losses.append(step_loss)
        window_tokens += tok_per_step
        bar.update(1)
        if step % cfg.out.log_every == 0 or step == total:
            now = time.time()
            tps = window_tokens / max(now - window_t, 1e-9)
            window_t, window_tokens = now, 0
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tps:.0f}", lr=f"{lr:.2e}")
            logger.write({"step": step, "tokens": step * tok_per_step, "loss": step_loss, "lr": lr,
                          "grad_norm": grad_norm, "tok_per_s": round(tps, 1), "elapsed_s": round(now - t0, 1)})
        if valid is not None and cfg.out.val_every and step % cfg.out.val_every == 0 and step < total:
            val_loss = evaluate(model, valid, cfg, d, device, vocab)
            logger.write({"step": step, "tokens": step * tok_per_step, "val_loss": val_loss})
            bar.write(f"step {step}: validation loss {val_loss:.4f}") if d.main else None
        if step % cfg.out.save_every == 0 or step == total:
            msd, osd = _state_dicts(model if fsdp else raw_model, optimizer, fsdp)
            if d.main:
                save_checkpoint(run_dir, step, {"model": msd, "optimizer": osd, "step": step,
                                                "config": cfg.to_dict()}, cfg.out.keep_last)
    bar.close()

    if valid is not None:
        val_loss = evaluate(model, valid, cfg, d, device, vocab)
        logger.write({"step": step, "tokens": step * tok_per_step, "val_loss": val_loss})
    exported: list[Path] = []
    formats = [f for f in cfg.out.export.split(",") if f]
    if formats:
        msd = _state_dicts(model, optimizer, fsdp)[0] if fsdp else raw_model.state_dict()
        if vocab is not None:
            msd = vocab.expand(msd)
        if d.main:
            for fmt in formats:
                exported.append(export(msd, run_dir / f"model.{fmt}", cfg.out.export_dtype))
    if d.main:
        logger.write({"step": step, "tokens": step * tok_per_step, "event": "end",
                      "wall_s": round(time.time() - t0, 1), "val_loss": val_loss})
        logger.close()
        plot_losses(run_dir / "log.jsonl", run_dir / "loss.png")
    return TrainResult(run_dir, step, step * tok_per_step, losses, val_loss, exported, time.time() - t0)

