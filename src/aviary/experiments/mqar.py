"""Multi-query associative recall (MQAR), the task of Zoology (Arora et al., 2023), reimplemented from its
description, and a trainer for the 2-layer models the RWKV papers compare on it: RWKV-4, 5, 6 and 7 (Aviary's
own time-mix, chunked backend), a softmax-attention Transformer and Mamba (`aviary.experiments.baselines`).

    python -m aviary.experiments.mqar --preset smoke
    python -m aviary.experiments.mqar --preset cpu --out-dir mqar-cpu      # ~1 hour on 2 cores
    python -m aviary.experiments.mqar --preset gpu --device cuda --out-dir mqar-gpu

As in Zoology's figure-2 models, each of the two layers is the sequence mixer alone (Zoology's state mixer is
the identity; `--mlp` adds the model's own MLP/channel-mix), and the plotted number of a cell (model, width,
length) is the best test accuracy over a learning-rate sweep. Logits are computed only at the scored positions
(one in T/kv), which is what makes the task affordable on a CPU; each training batch is fresh (no fixed
training set), and a run stops early once held-out accuracy reaches 0.99 (Zoology's rule).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MODELS", "MQARResult", "PRESETS", "best_by_cell", "build_model", "mqar_batch", "plot", "run", "sweep",
           "sweep_cell", "write_table"]

IGNORE = -100
MODELS = ("rwkv4", "rwkv5", "rwkv6", "rwkv7", "attention", "mamba")
LABELS = {"rwkv4": "RWKV-4", "rwkv5": "Eagle (RWKV-5)", "rwkv6": "Finch (RWKV-6)", "rwkv7": "Goose (RWKV-7)",
          "attention": "Attention", "mamba": "Mamba"}


def mqar_batch(n: int, seq_len: int, n_pairs: int, vocab: int = 8192, alpha: float = 0.01,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` MQAR examples -> (inputs [n, T] int64, labels [n, T] int64, IGNORE (-100) where not scored).

    Layout of one example (T = seq_len, kv = n_pairs), built as a T+1 array `s` and shifted by one
    (inputs = s[:-1], labels = s[1:]):

        s[0 : 2kv]   k1 v1 k2 v2 ... k_kv v_kv        keys distinct, from [1, vocab/2); values from [vocab/2, vocab)
        s[2kv : T+1] 0 ... k_i v_i ... 0              each key once more (a query), followed by its value

    Query i sits at s[2kv + 2(g_i - 1)], its gap g_i in 1..(T - 2kv)/2 drawn without replacement with
    p(g) proportional to g^(alpha - 1) (a power law: most queries come soon after the context). Exactly
    kv positions per example are scored: the input position holding the query key, whose label is the
    value paired with that key in the context. The filler token is 0.
    """
    if seq_len % 2 or 4 * n_pairs > seq_len or vocab <= seq_len:
        raise ValueError(f"need seq_len even, 4*n_pairs <= seq_len and vocab > seq_len "
                         f"(got seq_len={seq_len}, n_pairs={n_pairs}, vocab={vocab})")
    half = vocab // 2
    space = (seq_len - 2 * n_pairs) // 2
    gaps = torch.arange(1, space + 1, dtype=torch.float64)
    p_gap = alpha * gaps ** (alpha - 1)                                                       # [space]
    s = torch.zeros(n, seq_len + 1, dtype=torch.int64)
    scored = torch.zeros(n, seq_len + 1, dtype=torch.bool)
    for b in range(n):
        keys = torch.randperm(half - 1, generator=generator)[:n_pairs] + 1                   # [kv] in [1, half)
        values = torch.randint(half, vocab, (n_pairs,), generator=generator)                 # [kv] in [half, vocab)
        s[b, 0:2 * n_pairs:2], s[b, 1:2 * n_pairs:2] = keys, values
        g = torch.multinomial(p_gap, n_pairs, replacement=False, generator=generator) + 1   # [kv] distinct gaps
        pos = 2 * n_pairs + 2 * (g - 1)                                                      # [kv] query positions
        order = torch.randperm(n_pairs, generator=generator)                                 # which key at each
        s[b, pos], s[b, pos + 1] = keys[order], values[order]
        scored[b, pos] = True
    inputs = s[:, :-1]
    labels = torch.where(scored[:, :-1], s[:, 1:], IGNORE)
    return inputs.contiguous(), labels


@dataclass
class MQARResult:
    model: str
    d_model: int
    seq_len: int
    n_pairs: int
    lr: float
    steps: int  # optimiser steps taken (fewer than the budget when it stopped early)
    accuracy: float
    seconds: float  # wall clock
    cpu_seconds: float  # CPU time of the process (= compute time for a one-thread run, whatever else shares the CPU)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out accuracy) at each check


class RWKVMixer(nn.Module):
    """A small Aviary RWKV with the official initialisation, run as `hidden(tokens)` for the MQAR trainer.

    mlp=False: each block is LN -> time-mix -> residual only (the block's channel-mix is skipped, as Zoology's
    identity state mixer); mlp=True: the whole Aviary block."""

    def __init__(self, version: int, d_model: int, vocab: int, *, n_layer: int = 2, mlp: bool = False,
                 seed: int = 0, head_size: int = 64, backend: str = "chunked"):
        super().__init__()
        from aviary.model import RWKV
        from aviary.train.init import init_model, model_config

        cfg = model_config(version, n_layer=n_layer, n_embd=d_model, vocab_size=vocab,
                           head_size=min(head_size, d_model))
        self.rwkv = init_model(RWKV(cfg), seed=seed)
        self.head = self.rwkv.head
        self.mlp, self.backend = mlp, backend
        if not mlp:
            for block in self.rwkv.blocks:
                del block.ffn, block.ln2

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        from aviary.model.common import token_shift

        m = self.rwkv
        x = m.blocks[0].ln0(m.emb(tokens))
        state = m.init_state(tokens.shape[0])
        v_first = None
        for i, block in enumerate(m.blocks):
            if self.mlp:
                x, _, _, v_first = block(x, state.shift[:, i], state.wkv[:, i], v_first, self.backend)
            else:
                xa = block.ln1(x)
                dx, _, v_first = block.att(xa, token_shift(xa, state.shift[:, i, 0]), state.wkv[:, i], v_first,
                                           self.backend)
                x = x + dx
        return m.ln_out(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(tokens))


def build_model(name: str, d_model: int, vocab: int, seq_len: int, *, mlp: bool = False, seed: int = 0) -> nn.Module:
    """One of MODELS, 2 layers of width `d_model`, with `hidden(tokens) -> [B, T, C]` and `head`."""
    from aviary.experiments.baselines import Mamba, Transformer

    if name.startswith("rwkv") and name in MODELS:
        # RWKV-4's chunked WKV forms [B, 64, 64, C] pair weights per chunk: at batch 64 and d=64 a training step
        # took 4 s against 0.4 s for the recurrent form (the same function; tests/ops check they agree)
        return RWKVMixer(int(name[4:]), d_model, vocab, mlp=mlp, seed=seed,
                         backend="recurrent" if name == "rwkv4" else "chunked")
    if name == "attention":  # Zoology's: one head, learned positions, dropout 0.1
        return Transformer(vocab, d_model, 2, n_head=1, max_len=seq_len, pos="learned", mlp=mlp, dropout=0.1,
                           seed=seed)
    if name == "mamba":
        return Mamba(vocab, d_model, 2, seed=seed)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def scored_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the scored positions only: the head runs on those rows alone."""
    mask = y != IGNORE
    return F.cross_entropy(model.head(model.hidden(x)[mask]), y[mask])


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> float:
    """Fraction of scored positions (labels != -100) whose argmax equals the label."""
    was_training = model.training
    model.eval()
    hit = total = 0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i:i + batch_size], labels[i:i + batch_size]
        mask = y != IGNORE
        pred = model.head(model.hidden(x)[mask]).argmax(-1)
        hit += int((pred == y[mask]).sum())
        total += int(mask.sum())
    model.train(was_training)
    return hit / total


def run(model: str, d_model: int, seq_len: int, lr: float, steps: int, *, n_pairs: int | None = None,
        vocab: int = 8192, batch_size: int = 64, n_test: int = 1000, weight_decay: float = 0.1, alpha: float = 0.01,
        warmup: int = 0, eval_every: int = 100, target: float = 0.99, mlp: bool = False, seed: int = 0,
        device: str = "cpu", log=None) -> MQARResult:
    """Train a fresh 2-layer `model` on fresh MQAR batches (AdamW, linear warm-up then cosine to 0 over `steps`)
    and return its accuracy on `n_test` held-out examples. Stops early once that accuracy reaches `target`
    (checked every `eval_every` steps). n_pairs defaults to seq_len // 16 (Zoology: (64, 4), (128, 8), (256, 16)).
    `model` is one of MODELS (an int v means "rwkv{v}")."""
    if isinstance(model, int):
        model = f"rwkv{model}"
    n_pairs = n_pairs or max(1, seq_len // 16)
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    net = build_model(model, d_model, vocab, seq_len, mlp=mlp, seed=seed).to(device)
    test = [t.to(device) for t in mqar_batch(n_test, seq_len, n_pairs, vocab, alpha,
                                             torch.Generator().manual_seed(10_000 + seed))]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)

    def lr_at(step: int) -> float:  # step 0-based
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    curve: list[tuple[int, float]] = []
    acc, done = 0.0, 0
    net.train()
    for step in range(steps):
        x, y = (t.to(device) for t in mqar_batch(batch_size, seq_len, n_pairs, vocab, alpha, g))
        loss = scored_loss(net, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        if done % eval_every == 0 or done == steps:
            acc = accuracy(net, *test)
            curve.append((done, acc))
            if log:
                log(f"  {model} d={d_model} T={seq_len} lr={lr:.1e} step {done}/{steps} loss {loss.item():.3f} "
                    f"accuracy {acc:.3f}")
            if acc >= target:
                break
    return MQARResult(model, d_model, seq_len, n_pairs, lr, done, acc, time.perf_counter() - t0,
                      time.process_time() - c0, curve)


def sweep_cell(model: str, d_model: int, seq_len: int, lrs, steps: int, *, enough: float | None = None, log=print,
               on_result=None, **kwargs) -> list[MQARResult]:
    """The learning-rate sweep of one cell, in the order given. The rates after a run that reached `enough`
    (default: the early-stopping target, 0.99) are skipped: the cell's best is known to be at least that."""
    enough = kwargs.get("target", 0.99) if enough is None else enough
    results = []
    for lr in lrs:
        r = run(model, d_model, seq_len, lr, steps, log=log, **kwargs)
        results.append(r)
        if log:
            log(f"{LABELS.get(r.model, r.model)} d={d_model} T={seq_len} lr={lr:.1e}: accuracy {r.accuracy:.3f} "
                f"after {r.steps} steps ({r.seconds:.0f} s)")
        if on_result:
            on_result(r)
        if r.accuracy >= enough:
            break
    return results


def _cell_in_worker(args: tuple) -> list[MQARResult]:
    from aviary.cpu.malloc import keep_freed_memory

    cell, lrs, steps, kwargs, log_dir = args
    torch.set_num_threads(1)
    keep_freed_memory()
    if log_dir is None:
        return sweep_cell(*cell, lrs, steps, log=None, **kwargs)
    # the parent hears of a cell only when all of it is done: its progress goes to a file meanwhile
    with open(Path(log_dir) / "mqar-{}-d{}-T{}.log".format(*cell), "a", buffering=1) as f:
        return sweep_cell(*cell, lrs, steps, log=lambda msg: print(msg, file=f), **kwargs)


def sweep(models, d_models, seq_lens, lrs, steps: int, *, jobs: int = 1, log=print, on_result=None,
          log_dir: str | Path | None = None, **kwargs) -> list[MQARResult]:
    """Every (model, width, length) cell with its learning-rate sweep (`sweep_cell`). jobs > 1 runs cells in that
    many worker processes of one thread each (the most expensive cells first); on_result(result) is called as
    each run (jobs=1) or cell (jobs>1) finishes. With jobs > 1, each cell's progress lines go to
    `log_dir`/mqar-MODEL-dD-TT.log when log_dir is given."""
    cells = [(m, d, T) for m in models for d in d_models for T in seq_lens]
    if jobs <= 1:
        return [r for cell in cells for r in sweep_cell(*cell, lrs, steps, log=log, on_result=on_result, **kwargs)]
    import concurrent.futures as cf
    import multiprocessing as mp

    # CPU seconds per step at batch 64, T 128, d 64, one thread (docs/evaluation.md, MQAR): the slowest start first
    cost = {"mamba": 0.6, "rwkv6": 0.36, "rwkv5": 0.3, "rwkv7": 0.3, "rwkv4": 0.28, "attention": 0.14}
    cells.sort(key=lambda c: -cost.get(c[0], 0) * c[1] * c[2])
    results = []
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_cell_in_worker, (cell, lrs, steps, kwargs, log_dir)): cell for cell in cells}
        for f in cf.as_completed(futures):  # in the order they finish
            for r in f.result():
                results.append(r)
                if log:
                    log(f"{LABELS.get(r.model, r.model)} d={r.d_model} T={r.seq_len} lr={r.lr:.1e}: accuracy "
                        f"{r.accuracy:.3f} after {r.steps} steps ({r.seconds:.0f} s)")
                if on_result:
                    on_result(r)
    return results


def best_by_cell(results: list[MQARResult]) -> list[MQARResult]:
    """The run with the best accuracy for each (model, width, length): the number the papers plot."""
    best: dict[tuple, MQARResult] = {}
    for r in results:
        key = (r.model, r.d_model, r.seq_len)
        if key not in best or r.accuracy > best[key].accuracy:
            best[key] = r
    return list(best.values())


# smoke: a small vocabulary and short sequences, so that one CPU thread learns recall in about a minute (CI).
# cpu: the cell of the check (T=128, d=64, vocab 8192, 8 pairs) for every model, on a CPU in about an
#   hour (docs/evaluation.md, "MQAR", has the measured times).
# gpu: Zoology's figure-2 grid (the Finch paper's figure): T 64-512, d 64-512, Zoology's lr sweep.
PRESETS = {
    "smoke": dict(models=["rwkv7"], d_models=[64], seq_lens=[32], lrs=[3e-3], steps=300,
                  kwargs=dict(n_pairs=4, vocab=256, batch_size=32, n_test=200, eval_every=100)),
    "cpu": dict(models=list(MODELS), d_models=[64], seq_lens=[128], lrs=[1e-3, 3e-3], steps=3000,
                kwargs=dict(n_pairs=8, vocab=8192, batch_size=64, n_test=500, eval_every=100, warmup=50, enough=0.9)),
    "gpu": dict(models=list(MODELS), d_models=[64, 128, 256, 512], seq_lens=[64, 128, 256, 512],
                lrs=[1e-4, 4.64e-4, 2.15e-3, 1e-2], steps=12_000,
                kwargs=dict(vocab=8192, batch_size=256, n_test=3000, eval_every=500, warmup=200)),
}


def write_table(results: list[MQARResult], path: str | Path) -> None:
    """Every run as CSV (.csv; the learning curve left out) or JSON (runs and best per cell)."""
    path = str(path)
    rows = [asdict(r) for r in results]
    if path.endswith(".csv"):
        with open(path, "w", newline="") as f:
            fields = [k for k in rows[0] if k != "curve"]
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    else:
        with open(path, "w") as f:
            json.dump({"runs": rows, "best": [asdict(r) for r in best_by_cell(results)]}, f, indent=1)


def plot(results: list[MQARResult], path: str | Path) -> None:
    """The Finch paper's layout: one panel per sequence length, accuracy against model width, a line per model
    (the best learning rate of each cell). With a single width, bars instead of lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_by_cell(results)
    lengths = sorted({r.seq_len for r in best})
    widths = sorted({r.d_model for r in best})
    models = [m for m in MODELS if any(r.model == m for r in best)] + \
        sorted({r.model for r in best} - set(MODELS))
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), squeeze=False, sharey=True)
    for ax, T in zip(axes[0], lengths, strict=True):
        for i, m in enumerate(models):
            cell = {r.d_model: r.accuracy for r in best if r.model == m and r.seq_len == T}
            if len(widths) == 1:
                ax.bar(i, cell.get(widths[0], float("nan")), color=f"C{i}", label=LABELS.get(m, m))
            else:
                xs = [d for d in widths if d in cell]
                ax.plot(xs, [cell[d] for d in xs], marker="o", color=f"C{i}", label=LABELS.get(m, m))
        if len(widths) == 1:
            ax.set_xticks(range(len(models)), [LABELS.get(m, m).split(" ")[0] for m in models], rotation=30)
            ax.set_xlabel(f"model (width {widths[0]})")
        else:
            ax.set_xscale("log", base=2)
            ax.set_xticks(widths, [str(d) for d in widths])
            ax.set_xlabel("model dimension")
        ax.set_title(f"Sequence Length: {T}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy")
    if len(widths) > 1:  # bars are labelled on their axis
        axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _csv_list(kind):
    return lambda s: [kind(v) for v in s.split(",") if v]


DESCRIPTION = ("MQAR (Zoology's multi-query associative recall) on 2-layer RWKV-4..7, attention and Mamba: a "
               "learning-rate sweep per (model, width, length), the best accuracy of each cell as a table and a "
               "figure laid out like the Finch paper's.")
EPILOG = ("Presets: smoke (one RWKV-7 run, ~1 min), cpu (T=128, d=64, every model, ~1 h on 2 cores with --jobs 2), "
          "gpu (Zoology's grid, T 64-512 x d 64-512; needs --device cuda). Options override the preset.")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    ap.add_argument("--models", type=_csv_list(str), help=f"override, e.g. rwkv5,attention (from {', '.join(MODELS)})")
    ap.add_argument("--d-models", type=_csv_list(int), help="override the widths, e.g. 64,128")
    ap.add_argument("--seq-lens", type=_csv_list(int), help="override the lengths, e.g. 128,256")
    ap.add_argument("--lrs", type=_csv_list(float), help="override the learning rates, e.g. 1e-3,3e-3")
    ap.add_argument("--steps", type=int, help="override the optimiser steps per run (the budget)")
    ap.add_argument("--batch-size", type=int, help="override the batch size")
    ap.add_argument("--mlp", action="store_true", help="keep each model's MLP (Zoology's models have none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on a CPU (0: torch's default)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run this many cells at once, each in its own one-thread process (on a CPU: the core count)")
    ap.add_argument("--out-dir", help="write mqar.csv, mqar.json and mqar.png here")
    ap.add_argument("-q", "--quiet", action="store_true", help="no per-check progress lines")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m aviary.experiments.mqar", description=DESCRIPTION, epilog=EPILOG)
    add_arguments(ap)
    run_command(ap.parse_args(argv), ap)


def run_command(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    """Run the sweep the parsed options describe (`ap` reports bad options)."""
    for name in ("steps", "batch_size", "jobs", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "threads" else 1):
            ap.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this machine has no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    from aviary.cpu.malloc import keep_freed_memory

    keep_freed_memory()  # a training loop re-allocates the same large tensors every step (aviary.cpu.malloc)
    p = PRESETS[args.preset]
    models = args.models or p["models"]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    kwargs = dict(p["kwargs"], mlp=args.mlp, seed=args.seed, device=args.device)
    if args.batch_size:
        kwargs["batch_size"] = args.batch_size
    out = Path(args.out_dir) if args.out_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    results: list[MQARResult] = []

    def save(r: MQARResult) -> None:  # after every run, so an interrupted sweep keeps what it finished
        results.append(r)
        if out:
            write_table(results, out / "mqar.json")
            write_table(results, out / "mqar.csv")

    log = (lambda *_: None) if args.quiet else print
    sweep(models, args.d_models or p["d_models"], args.seq_lens or p["seq_lens"], args.lrs or p["lrs"],
          args.steps or p["steps"], jobs=args.jobs, log_dir=out,
          log=lambda msg: print(msg, flush=True) if not msg.startswith("  ") else log(msg), on_result=save, **kwargs)
    vocab = kwargs["vocab"]
    print(f"chance = 1/(vocab/2) = {1 / (vocab // 2):.5f}")
    print(f"{'model':16s} {'d':>4s} {'T':>5s} {'accuracy':>9s} {'lr':>8s} {'steps':>6s} {'seconds':>8s} {'cpu s':>7s}")
    for r in best_by_cell(results):
        print(f"{LABELS.get(r.model, r.model):16s} {r.d_model:4d} {r.seq_len:5d} {r.accuracy:9.3f} {r.lr:8.1e} "
              f"{r.steps:6d} {r.seconds:8.0f} {r.cpu_seconds:7.0f}")
    if out:
        plot(results, out / "mqar.png")
        print(f"wrote {out / 'mqar.csv'}, {out / 'mqar.json'}, {out / 'mqar.png'}")


if __name__ == "__main__":
    main()
