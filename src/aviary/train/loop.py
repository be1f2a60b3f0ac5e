"""`train(config)`: the training loop, for one process or many under `torchrun` (DDP or FSDP).

    _setup               data, model (+ adapter), DDP/FSDP wrapping, optimizer, resume from the newest checkpoint
    _loop                until the last step: log every out.log_every steps, and after each
      _train_step          one optimizer step (each micro-batch whole or in chunks: `chunks.micro_batch_backward`)
      _evaluate_and_save   validation every out.val_every steps, a checkpoint every out.save_every
                           (a fine-tuning run, model.load, also validates once before its first step)
    _finish              the last validation, export, the end of the log, loss.png

One optimizer step reads `micro_bsz * accumulate * world_size` windows. Global sample number
k = (step * accumulate + micro) * world * micro_bsz + rank * micro_bsz + j picks its window through the
`WindowSampler`, so the set of windows of a step depends only on the global batch: one process with
accumulate=2 and two processes with accumulate=1 see the same data and (up to float summation order)
compute the same update.

The loss of a step is the mean cross-entropy over its target tokens: every token, or those whose loss mask
(`BinIdx.get_mask`, chat data) is on, counted over the whole global batch before the step, so that
accumulation and the number of processes do not change the update with a mask either. A step without any
target token has loss 0.

Fine-tuning with `peft.method` (`aviary.peft`): the base model is loaded and frozen, the adapter added (the
same one on every rank and on resume: it depends only on the weights, the config and train.seed), the
optimizer sees only the adapter's tensors, checkpoints hold only those (with the optimizer state and a
fingerprint of the base), and the run ends with the adapter file and the merged model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from aviary.devices import check_device
from aviary.io.checkpoint import CheckpointError, first_sentence
from aviary.train.checkpoint import EXPORT_DTYPES, export, latest_checkpoint, load_checkpoint, save_checkpoint
from aviary.train.chunks import micro_batch_backward
from aviary.train.config import ConfigError, TrainConfig, comma_list, rank_fields
from aviary.train.data import BinIdx
from aviary.train.init import init_model, model_config
from aviary.train.optim import lr_at, make_optimizer, set_lr
from aviary.train.sampler import WindowSampler
from aviary.train.vocab import CompactVocab

if TYPE_CHECKING:
    from aviary.model import RWKV
    from aviary.peft import PeftConfig
    from aviary.state import RWKVState

__all__ = ["train", "TrainResult", "DivergedError"]

# the model fields that decide the shapes of the weights; a checkpoint written with other values cannot resume
_SHAPE_FIELDS = ("version", "n_layer", "n_embd", "head_size", "dim_ffn", "vocab_size", "compact_vocab", "rank_w",
                 "rank_a", "rank_v", "rank_g", "rank_mix", "rank_decay")


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


def _all_sum(x: float, d: _Dist, device: torch.device) -> float:
    if d.world == 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def _all_mean(x: float, d: _Dist, device: torch.device) -> float:
    return _all_sum(x, d, device) / d.world


@dataclass
class _Run:
    """Everything a run holds from setup to finish. `model` is what the forward pass calls (the DDP wrapper
    under DDP); `raw_model` is the RWKV itself, which the optimizer and the checkpoints see (FSDP shards it
    in place, so there the two are one object)."""

    cfg: TrainConfig
    dist: _Dist
    device: torch.device
    run_dir: Path
    data: BinIdx
    valid: BinIdx | None
    sampler: WindowSampler
    vocab: CompactVocab | None
    raw_model: RWKV
    model: nn.Module
    optimizer: torch.optim.Optimizer
    logger: _Logger
    total: int  # optimizer steps of the whole run
    t0: float  # when train() was called
    step: int = 0  # optimizer steps done (a resumed run starts at its checkpoint's)
    peft: PeftConfig | None = None  # the adapter being trained, or None (every weight)
    base: dict | None = None  # with peft: the base model's fingerprint (`_base_fingerprint`)

    @property
    def fsdp(self) -> bool:
        return self.dist.world > 1 and self.cfg.train.strategy == "fsdp"

    @property
    def global_batch(self) -> int:
        return self.cfg.train.micro_bsz * self.cfg.train.accumulate * self.dist.world

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.cfg.data.ctx_len

    @property
    def tokens(self) -> int:
        """Training tokens read by all ranks up to `step`."""
        return self.step * self.tokens_per_step


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or continue) as `cfg` says; resumes from the newest checkpoint in `out.dir` if there is one."""
    cfg.validate()
    t0 = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    d, device = _setup_distributed(cfg.train.device)
    run = _setup(cfg, d, device, t0)
    losses = _loop(run)
    result = _finish(run, losses)
    del run  # the DDP/FSDP wrappers must be collectable before the group goes (_destroy_process_group)
    if d.owns_group:
        _destroy_process_group()
    return result


# ---- setup: data, model, wrapping, optimizer, resume ---------------------------------------------------------


def _setup(cfg: TrainConfig, d: _Dist, device: torch.device, t0: float) -> _Run:
    """Everything before the first step. The data and the newest checkpoint are checked before anything is
    written to the run directory."""
    data, valid, sampler, vocab = _load_data(cfg)
    raw_model = _build_model(cfg, device, vocab)
    if cfg.model.load:  # the checkpoint decides the vocabulary
        _check_ids(data, raw_model.config.vocab_size)
    peft = cfg.peft.peft_config()
    base = _apply_peft(raw_model, peft, cfg.train.seed) if peft is not None else None
    raw_model.train()
    run_dir = Path(cfg.out.dir)
    ckpt = latest_checkpoint(run_dir)
    payload = _resume_payload(ckpt, cfg, raw_model, base) if ckpt is not None else None
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if cfg.train.grad_cp:
        _enable_grad_checkpointing(raw_model)
    model = _wrap(raw_model, cfg, d, device)
    o = cfg.optim
    optimizer = make_optimizer(raw_model, o.lr_init, (o.beta1, o.beta2), o.adam_eps, o.weight_decay)
    run = _Run(cfg=cfg, dist=d, device=device, run_dir=run_dir, data=data, valid=valid, sampler=sampler,
               vocab=vocab, raw_model=raw_model, model=model, optimizer=optimizer,
               logger=_Logger(run_dir, d.main, cfg.out.tensorboard),
               total=_total_steps(cfg, sampler.n_windows, d.world), t0=t0, peft=peft, base=base)
    if payload is not None:
        _restore(run, ckpt, payload)
    trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    if d.main and peft is not None:
        print(f"aviary train: {peft.method} fine-tuning of {cfg.model.load}: {trainable:,} trainable parameters "
              f"({100 * trainable / raw_model.num_parameters:.3g} % of {raw_model.num_parameters:,})")
    if d.main and run.step == 0:
        run.logger.write({"step": 0, "tokens": 0, "event": "start", "parameters": raw_model.num_parameters,
                          "trainable_parameters": trainable, "peft": peft.to_dict() if peft else None,
                          "model": raw_model.config.to_dict(), "windows": sampler.n_windows,
                          "total_steps": run.total, "global_batch": run.global_batch, "world_size": d.world,
                          "compact_vocab_rows": vocab.size if vocab is not None else None})
    return run


def _load_data(cfg: TrainConfig) -> tuple[BinIdx, BinIdx | None, WindowSampler, CompactVocab | None]:
    T = cfg.data.ctx_len
    data = BinIdx(cfg.data.train)
    valid = BinIdx(cfg.data.valid) if cfg.data.valid else None
    sampler = WindowSampler(len(data), T, seed=cfg.train.seed)
    if valid is not None and len(valid) < T + 1:
        raise ConfigError(f"data.valid has {len(valid)} tokens, fewer than one window of {T + 1}")
    if not cfg.model.load:  # before the model is built (with model.load, after: the checkpoint decides)
        _check_ids(data, cfg.model.vocab_size)
    vocab = CompactVocab.from_tokens(data.tokens, cfg.model.vocab_size) if cfg.model.compact_vocab else None
    return data, valid, sampler, vocab


def _check_ids(data: BinIdx, vocab_size: int) -> None:
    top = int(data.tokens.max())
    if top >= vocab_size:
        raise ConfigError(f"data.train holds token ids up to {top}, beyond the model's vocabulary of {vocab_size}")


def _build_model(cfg: TrainConfig, device: torch.device, vocab: CompactVocab | None) -> RWKV:
    from aviary.model import RWKV

    m = cfg.model
    if m.load:
        from aviary.loading import load

        model = load(m.load, dtype="float32")
        try:
            model.backend = cfg.train.backend
        except ValueError as e:  # a backend this checkpoint's version lacks (known once the checkpoint is read)
            raise ConfigError(f"train.backend: {e}") from None
        model.train()
        return model.to(device)
    rows = vocab.size if vocab is not None else m.vocab_size
    ranks = {name: getattr(m, name) for name in rank_fields(m.version)}
    config = model_config(m.version, m.n_layer, m.n_embd, rows, m.head_size, m.dim_ffn, **ranks)
    model = RWKV(config, backend=cfg.train.backend).to(device)
    return init_model(model, seed=cfg.train.seed, lr_init=cfg.optim.lr_init)


def _apply_peft(model: RWKV, peft: PeftConfig, seed: int) -> dict:
    """Add the adapter to the loaded base model in place (freezing the rest); returns the base's fingerprint."""
    from aviary.peft import apply_peft

    if peft.method == "state" and not model.spec.state_tuning:
        raise ConfigError(f"peft.method=state: RWKV-{model.config.version} has no matrix state to tune "
                          "(state tuning is for RWKV-5, 6 and 7); use lora, pissa or miss")
    base = _base_fingerprint(model)
    try:
        apply_peft(model, peft, seed=seed)
    except ValueError as e:  # a part that matches no parameter, a target this version lacks
        raise ConfigError(f"peft: {e}") from None
    return base


def _base_fingerprint(model: RWKV) -> dict:
    """What identifies the weights a fine-tuning checkpoint was trained on: the sizes, and float64 sums of the
    weights and of their magnitudes (a checkpoint of the adapter alone is meaningless on another base)."""
    with torch.no_grad():
        sums = [(float(p.double().sum()), float(p.double().abs().sum())) for p in model.parameters()]
    return {"model": model.config.to_dict(), "sum": math.fsum(s for s, _ in sums),
            "abs_sum": math.fsum(a for _, a in sums)}


def _enable_grad_checkpointing(model) -> None:
    """Recompute each block in the backward pass (RWKV-LM --grad_cp 1)."""
    for block in model.blocks:
        forward = block.forward

        def wrapped(*args, _forward=forward):
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False)

        block.forward = wrapped


def _wrap(model: RWKV, cfg: TrainConfig, d: _Dist, device: torch.device) -> nn.Module:
    """The model as the forward pass calls it: itself in one process, DDP-wrapped, or FSDP-sharded in place."""
    if d.world == 1:
        return model
    if cfg.train.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # one FSDP unit per block, except block 0: the shell calls its ln0 outside the block's forward,
        # so block 0 stays in the root unit (gathered for the whole forward)
        for block in model.blocks[1:]:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    # find_unused_parameters: v7 layer 0 carries v0/v1/v2 (official names) that its math never uses
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def _total_steps(cfg: TrainConfig, n_windows: int, world: int) -> int:
    t = cfg.train
    global_bsz = t.micro_bsz * t.accumulate * world
    if t.max_steps:
        return t.max_steps
    if t.max_tokens:
        return max(1, t.max_tokens // (global_bsz * cfg.data.ctx_len))
    return max(1, int(t.epochs * n_windows) // global_bsz)


# the peft fields that decide what an adapter checkpoint means, per method
_PEFT_FIELDS = {"none": (), "state": ("parts",), "lora": ("rank", "alpha", "targets", "parts"),
                "pissa": ("rank", "targets", "parts", "pissa_niter"), "miss": ("rank", "targets", "parts", "miss_mode")}


def _resume_payload(path: Path, cfg: TrainConfig, model, base: dict | None) -> dict:
    """The newest checkpoint of the run directory, checked against this run's model before anything is
    loaded from it: a checkpoint of another model size, another fine-tuning method or adapter size, or of an
    adapter of another base model is a run directory reused by mistake. `base`: this run's base fingerprint
    when it trains an adapter."""
    payload = load_checkpoint(path)
    fix = f"delete {path.parent} or choose another --out.dir"
    config = payload["config"] if isinstance(payload.get("config"), dict) else {}
    saved = config.get("model")
    if isinstance(saved, dict) and not cfg.model.load and not saved.get("load"):
        changed = [f"model.{k} {saved[k]!r} -> {getattr(cfg.model, k)!r}" for k in _SHAPE_FIELDS
                   if k in saved and saved[k] != getattr(cfg.model, k)]
        if changed:
            raise CheckpointError(path, f"this run directory holds checkpoints of another model "
                                        f"({', '.join(changed)}); {fix}")
    changed = _peft_changes(config.get("peft") if isinstance(config.get("peft"), dict) else {}, cfg)
    if changed:
        raise CheckpointError(path, f"this run directory holds checkpoints of another fine-tuning "
                                    f"({', '.join(changed)}); {fix}")
    if base is not None and not _same_base(payload.get("base"), base):
        raise CheckpointError(path, f"this run directory holds an adapter trained on another base model than "
                                    f"model.load={cfg.model.load}; {fix}")
    ours = _trainable_state(model) if base is not None else model.state_dict()
    theirs = payload["model"]
    missing, extra = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    shapes = [k for k in sorted(ours.keys() & theirs.keys()) if tuple(ours[k].shape) != tuple(theirs[k].shape)]
    if missing or extra or shapes:
        found = [f"{what} {names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
                 for what, names in (("missing", missing), ("unexpected", extra), ("other shape for", shapes))
                 if names]
        raise CheckpointError(path, f"does not fit this run's model ({'; '.join(found)}); {fix}")
    return payload


def _peft_changes(saved: dict, cfg: TrainConfig) -> list[str]:
    """'peft.rank 8 -> 16' for each field that makes the saved adapter another one than this run's."""
    now = cfg.peft
    method = saved.get("method", "none")
    if method != now.method:
        return [f"peft.method {method} -> {now.method}"]

    def norm(name: str, value: Any) -> Any:
        return ",".join(comma_list(value)) if name in ("targets", "parts") and isinstance(value, str) else value

    return [f"peft.{k} {saved[k]!r} -> {getattr(now, k)!r}" for k in _PEFT_FIELDS.get(method, ())
            if k in saved and norm(k, saved[k]) != norm(k, getattr(now, k))]


def _same_base(saved: Any, ours: dict) -> bool:
    if not isinstance(saved, dict) or saved.get("model") != ours["model"]:
        return False
    tol = 1e-6 * max(ours["abs_sum"], 1e-30)  # float64 sums: equal up to summation order on another device
    return all(isinstance(saved.get(k), float) and abs(saved[k] - ours[k]) <= tol for k in ("sum", "abs_sum"))


def _trainable_state(model: RWKV) -> dict[str, torch.Tensor]:
    """What a fine-tuning checkpoint holds of the model: the adapter's tensors (RWKV-PEFT's names)."""
    from aviary.peft import adapter_state_dict

    return adapter_state_dict(model)


def _restore(run: _Run, path: Path, payload: dict) -> None:
    """Load a checked checkpoint's weights, optimizer state and step into the run."""
    try:
        if run.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(run.raw_model, run.optimizer, model_state_dict=payload["model"],
                           optim_state_dict=payload["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            if run.peft is not None:
                from aviary.peft import load_adapter_state_dict

                load_adapter_state_dict(run.raw_model, payload["model"])
            else:
                run.raw_model.load_state_dict(payload["model"])
            run.optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:  # torch's words for "this state does not fit"
        raise CheckpointError(path, f"does not fit this run ({type(e).__name__}: {first_sentence(e)}); delete "
                                    f"{path.parent} or choose another --out.dir") from None
    run.step = payload["step"]
    if run.dist.main:
        print(f"aviary train: resuming from {path} (step {run.step})")


# ---- the steps -------------------------------------------------------------------------------------------------


def _loop(run: _Run) -> list[float]:
    """Steps from `run.step` to `run.total`, with the progress bar and the log lines; the losses of each."""
    from tqdm import tqdm

    out = run.cfg.out
    bar = tqdm(total=run.total, initial=run.step, disable=not (run.dist.main and out.progress), unit="step",
               dynamic_ncols=True)
    losses: list[float] = []
    if run.step == 0 and run.valid is not None and run.cfg.model.load:  # fine-tuning: where it starts from
        val_loss = evaluate(run.model, run.valid, run.cfg, run.dist, run.device, run.vocab)
        run.logger.write({"step": 0, "tokens": 0, "val_loss": val_loss})
        if run.dist.main:
            bar.write(f"step 0: validation loss {val_loss:.4f}")
    window_t, window_tokens = time.time(), 0  # tokens/s over the steps since the last log line
    while run.step < run.total:
        loss, lr, grad_norm = _train_step(run)
        losses.append(loss)
        window_tokens += run.tokens_per_step
        bar.update(1)
        if run.step % out.log_every == 0 or run.step == run.total:
            now = time.time()
            tps = window_tokens / max(now - window_t, 1e-9)
            window_t, window_tokens = now, 0
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:.0f}", lr=f"{lr:.2e}")
            run.logger.write({"step": run.step, "tokens": run.tokens, "loss": loss, "lr": lr,
                              "grad_norm": grad_norm, "tok_per_s": round(tps, 1),
                              "elapsed_s": round(now - run.t0, 1)})
        _evaluate_and_save(run, bar)
    bar.close()
    return losses


def _train_step(run: _Run) -> tuple[float, float, float]:
    """One optimizer step over `accumulate` micro-batches. Returns the loss (mean over ranks), the learning
    rate and the gradient norm before clipping (NaN when clipping is off); raises DivergedError on inf/NaN."""
    cfg, d, o, t = run.cfg, run.dist, run.cfg.optim, run.cfg.train
    lr = lr_at(run.step, run.total, o.lr_init, o.lr_final, o.warmup_steps, o.schedule)
    set_lr(run.optimizer, lr)
    batches = []
    for a in range(t.accumulate):
        first = ((run.step * t.accumulate + a) * d.world + d.rank) * t.micro_bsz  # global sample (module doc)
        batches.append(_batch(run.data, run.sampler, first, t.micro_bsz, run.device, run.vocab))
    # each target token weighs 1 / (target tokens of the global batch); DDP and FSDP average over ranks
    targets = sum(float(w.sum()) for _, _, w in batches)
    targets = _all_sum(targets, d, run.device) if run.data.has_mask else targets * d.world
    scale = d.world / max(targets, 1.0)
    ddp = d.world > 1 and not run.fsdp
    loss_sum = torch.zeros((), device=run.device)
    for a, (x, y, weight) in enumerate(batches):
        loss_sum += micro_batch_backward(
            partial(_forward, run.model, cfg, run.vocab), x, y, weight * scale, chunk_len=t.chunk_len,
            mode=t.chunk_mode, l2wrap=o.l2wrap, no_sync=run.model.no_sync if ddp else contextlib.nullcontext,
            sync=not ddp or a == t.accumulate - 1)  # DDP all-reduces in the last backward only
    if o.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), o.grad_clip))
    else:
        grad_norm = float("nan")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    step_loss = _all_mean(loss_sum.item(), d, run.device)
    if not math.isfinite(step_loss):
        raise DivergedError(f"loss became {step_loss} at step {run.step}; lower optim.lr_init?")
    return step_loss, lr, grad_norm


def _evaluate_and_save(run: _Run, bar) -> None:
    """After a step: the validation loss every `out.val_every` steps (the last one is `_finish`'s), a
    checkpoint every `out.save_every` steps and at the end."""
    out, step = run.cfg.out, run.step
    if run.valid is not None and out.val_every and step % out.val_every == 0 and step < run.total:
        val_loss = evaluate(run.model, run.valid, run.cfg, run.dist, run.device, run.vocab)
        run.logger.write({"step": step, "tokens": run.tokens, "val_loss": val_loss})
        if run.dist.main:
            bar.write(f"step {step}: validation loss {val_loss:.4f}")
    if step % out.save_every == 0 or step == run.total:
        msd, osd = _state_dicts(run)
        payload = {"model": msd, "optimizer": osd, "step": step, "config": run.cfg.to_dict()}
        if run.base is not None:
            payload["base"] = run.base
        if run.dist.main:
            save_checkpoint(run.run_dir, step, payload, out.keep_last)


def _state_dicts(run: _Run) -> tuple[dict, dict]:
    """Full (gathered, on the CPU under FSDP) model and optimizer state dicts; every rank must call this.
    With an adapter, the "model" is the adapter's tensors only."""
    if run.peft is not None:  # (never under FSDP: TrainConfig.validate)
        return _trainable_state(run.raw_model), run.optimizer.state_dict()
    if run.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(run.raw_model, run.optimizer,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return run.raw_model.state_dict(), run.optimizer.state_dict()


# ---- finish: last validation, export, log, plot ----------------------------------------------------------------


def _finish(run: _Run, losses: list[float]) -> TrainResult:
    """After the last step: the final validation loss, the exports and the end of the log (rank 0 writes)."""
    d, out = run.dist, run.cfg.out
    val_loss = None
    if run.valid is not None:
        val_loss = evaluate(run.model, run.valid, run.cfg, d, run.device, run.vocab)
        run.logger.write({"step": run.step, "tokens": run.tokens, "val_loss": val_loss})
    exported: list[Path] = []
    formats = [f for f in out.export.split(",") if f]
    if formats and run.peft is not None and d.main:  # the adapter, and the model with it merged in (no FSDP)
        from aviary.peft import merged_state_dict, save_adapter

        msd = merged_state_dict(run.raw_model)
        for fmt in formats:
            exported += save_adapter(run.raw_model, run.peft, run.run_dir / f"adapter.{fmt}",
                                     dtype=EXPORT_DTYPES[out.export_dtype])
    elif formats and run.peft is None:
        msd = _state_dicts(run)[0] if run.fsdp else run.raw_model.state_dict()
        if run.vocab is not None:
            msd = run.vocab.expand(msd)
    if formats and d.main:
        for fmt in formats:
            exported.append(export(msd, run.run_dir / f"model.{fmt}", out.export_dtype))
    if d.main:
        run.logger.write({"step": run.step, "tokens": run.tokens, "event": "end",
                          "wall_s": round(time.time() - run.t0, 1), "val_loss": val_loss})
        run.logger.close()
        plot_losses(run.run_dir / "log.jsonl", run.run_dir / "loss.png")
    return TrainResult(run.run_dir, run.step, run.tokens, losses, val_loss, exported, time.time() - run.t0)


def _destroy_process_group() -> None:
    # A process that exits with its gloo group alive aborts now and then in C++ ("terminate called
    # without an active exception") while Python tears down, which turns a finished run into a failed
    # one under torchrun (docs/benchmarks.md, Design measurements item 12). The DDP/FSDP wrappers hold
    # the group and sit in reference cycles, so they are collected first: destroying the group while a
    # wrapper still holds it leaves the same abort. Only after a run that ended well, when every rank gets
    # here: on an error the group is left alone, since destroying it could wait for ranks that never arrive.
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.destroy_process_group()


# ---- pieces ----------------------------------------------------------------------------------------------------


def _rows(data: BinIdx, offsets: list[int], T: int, device, vocab: CompactVocab | None) -> torch.Tensor:
    t = torch.from_numpy(np.stack([data.get(o, T + 1) for o in offsets])).to(device)  # [B, T+1]
    return vocab.map(t) if vocab is not None else t


def _masks(data: BinIdx, offsets: list[int], T: int, device) -> torch.Tensor:
    """[B, T] float32: 1 where the target of a position is a training target (the window at o predicts
    tokens o+1 .. o+T), 0 where the loss mask is off; all 1 for data without a mask."""
    if not data.has_mask:
        return torch.ones(len(offsets), T, device=device)
    return torch.from_numpy(np.stack([data.get_mask(o + 1, T) for o in offsets])).to(device, torch.float32)


def _batch(data: BinIdx, sampler: WindowSampler, first: int, n: int, device,
           vocab: CompactVocab | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets [n, ctx_len] and the targets' loss mask (`_masks`) of global samples first .. first+n-1."""
    offsets = [sampler(first + j) for j in range(n)]
    t = _rows(data, offsets, sampler.ctx_len, device, vocab)
    return t[:, :-1], t[:, 1:], _masks(data, offsets, sampler.ctx_len, device)


def _forward(model, cfg: TrainConfig, vocab: CompactVocab | None, x: torch.Tensor, state: RWKVState | None = None,
             last_only: bool = False) -> tuple[torch.Tensor, RWKVState]:
    """model(x, state) under the run's precision: float32 logits (over the full vocabulary rows) and the state."""
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    with autocast:
        logits, state = model(x, state, last_only=last_only)
    logits = logits.float()
    return (vocab.logits(logits) if vocab is not None else logits), state


@torch.no_grad()
def evaluate(model, data: BinIdx, cfg: TrainConfig, d: _Dist, device, vocab: CompactVocab | None = None) -> float:
    """Mean loss per target token (every token, or those of data's loss mask) over `out.val_samples` windows
    spread evenly over the held-out stream (fixed every time); in chunks of train.chunk_len when set."""
    T = cfg.data.ctx_len
    n_windows = (len(data) - 1) // T
    n = min(cfg.out.val_samples, n_windows)
    if n >= d.world:  # the same number of forward passes on every rank (FSDP gathers in each)
        n -= n % d.world
    picks = [int(i * n_windows / n) * T for i in range(n)]
    mine = picks[d.rank::d.world]
    piece = cfg.train.chunk_len or T
    total, count = 0.0, 0.0
    was_training = model.training
    model.eval()
    for i in range(0, len(mine), cfg.train.micro_bsz):
        offsets = mine[i:i + cfg.train.micro_bsz]
        rows, mask = _rows(data, offsets, T, device, vocab), _masks(data, offsets, T, device)
        state = None
        for s in range(0, T, piece):
            logits, state = _forward(model, cfg, vocab, rows[:, s:s + piece], state)
            y = rows[:, s + 1:s + piece + 1].reshape(-1)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y, reduction="none")
            if vocab is not None:  # an id unseen in training: its own share of the lumped row's probability
                nll = nll + (y == vocab.K) * math.log(vocab.n_shared)
            w = mask[:, s:s + piece].reshape(-1)
            total += float((nll * w).sum())
            count += float(w.sum())
    model.train(was_training)
    if d.world > 1:
        import torch.distributed as dist

        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / count if count else float("nan")  # no windows or no targets: no loss (never 0.0)


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
