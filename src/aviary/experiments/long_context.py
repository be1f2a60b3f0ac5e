"""Loss by position past the training context: an Aviary RWKV-7 and a softmax-attention Transformer trained by
the same function on the same windows of the project's corpus, then scored on the two long held-out novels.

    python -m aviary.experiments.long_context --preset smoke --out runs/long_context/smoke
    python -m aviary.experiments.long_context --preset cpu --out docs/evaluation_long_context

Both models see the same tokens in the same order: windows of `ctx_len + 1` tokens of the binidx stream that
`aviary data prepare` writes, picked by `aviary.train.sampler.WindowSampler` (what `aviary train` does), with
the same batch, AdamW settings, warmup + cosine schedule, bf16 autocast and seed, and the same compact
vocabulary (`aviary.train.vocab.CompactVocab`: only ids the corpus uses get their own emb/head rows). For
scoring each model is expanded to the full 65,536-id vocabulary (exact, see vocab.py), so every loss is a
plain log-softmax over the World vocabulary.

Each document is scored as `[0] + tokens` (positions as in `aviary.eval.positions`: position p is the index
of the predicted token in the document), in these modes:

    rwkv                  the trained RWKV, the whole document in one pass through the state
    transformer-onepass   the Transformer, one causal pass over the first `onepass_tokens` positions (RoPE
                          runs past the trained length; attention is quadratic, hence the cut)
    transformer-window    the Transformer in windows of its trained context, stride ctx/2: every position
                          scored once, with at least ctx/2 tokens of context (how one would use it)
    default-model         the bundled aviary-v7-tiny (`aviary.models.default_model_path()`), one pass

Deviation from `aviary train`: no L2Wrap (an RWKV-LM device, not part of a Transformer's recipe), so the loss
is plain cross-entropy for both; otherwise the optimizer is `aviary train`'s (RWKV-7's parameter groups; for
the Transformer weight decay on its 2-D weights, as RWKV's rule does).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary.eval.positions import PositionBin, bin_losses

__all__ = ["PRESETS", "Preset", "TrainSettings", "one_pass_losses", "run", "sliding_window_losses", "train_lm"]

# the shared data next to the repository (../shared/data from its root), as aviary.commands.eval
SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "corpus"


@dataclass(frozen=True)
class TrainSettings:
    """What both models share: the windows, the optimizer and its schedule (the default model's recipe,
    configs/aviary-v7-tiny.yaml)."""

    ctx_len: int = 256
    batch: int = 8
    steps: int = 125
    lr_init: float = 2e-3
    lr_final: float = 1e-4
    warmup_steps: int = 30
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-18
    weight_decay: float = 0.001
    grad_clip: float = 1.0
    precision: str = "bf16"  # bf16 autocast or fp32
    seed: int = 0

    @property
    def tokens(self) -> int:
        """The budget: tokens seen (input positions) by each model."""
        return self.steps * self.batch * self.ctx_len


@dataclass(frozen=True)
class Preset:
    train: TrainSettings
    rwkv: dict  # aviary.train.init.model_config(7, **rwkv)
    transformer: dict  # Transformer(vocab, **transformer)
    max_tokens: int | None  # cut each novel (None: whole)
    onepass_tokens: int  # positions of the Transformer's one pass
    per_octave: int = 4
    log_every: int = 10


# cpu: the RWKV has the default model's shape (6 x 128, rank_g 32) and the Transformer 7 x 128 with 2 heads (1.38 M
# parameters besides emb/head against RWKV's 1.39 M); 125 steps x 8 x 256 = 256,000 tokens, about 4 min each on
# one idle thread, 10-14 min on a busy shared one (docs/evaluation.md, "Loss by position: RWKV against a
# Transformer"). smoke: tiny models, a few
# steps, 512 tokens of each novel.
PRESETS = {
    "smoke": Preset(TrainSettings(ctx_len=32, batch=4, steps=8, warmup_steps=2),
                    rwkv=dict(n_layer=1, n_embd=32, head_size=16),
                    transformer=dict(d_model=32, n_layer=1, n_head=2),
                    max_tokens=512, onepass_tokens=256, log_every=4),
    "cpu": Preset(TrainSettings(),
                  rwkv=dict(n_layer=6, n_embd=128, head_size=64, rank_g=32),
                  transformer=dict(d_model=128, n_layer=7, n_head=2),
                  max_tokens=None, onepass_tokens=16384),
}


# ---- training ----------------------------------------------------------------------------------------------------


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)  # RWKV: (logits, state); Transformer: logits
    return out[0] if isinstance(out, tuple) else out


def _optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.AdamW:
    """AdamW with `lr_scale` per group (aviary.train.optim.set_lr): an RWKV's own groups, else decay on 2-D
    weights only."""
    from aviary.train.optim import param_groups

    if hasattr(model, "spec"):
        groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, s.weight_decay)]
    else:
        matrices = [p for n, p in model.named_parameters() if p.dim() >= 2 and n.endswith(".weight")]
        ids = {id(p) for p in matrices}
        groups = [{"params": matrices, "lr_scale": 1.0, "weight_decay": s.weight_decay},
                  {"params": [p for p in model.parameters() if id(p) not in ids], "lr_scale": 1.0,
                   "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr_init, betas=s.betas, eps=s.eps)


def train_lm(model: nn.Module, tokens: np.ndarray, s: TrainSettings, *, vocab=None, log_every: int = 0,
             name: str = "") -> dict:
    """Train `model` (an Aviary RWKV or anything whose forward gives logits [B, T, V]) on windows of the token
    stream `tokens` (1-D ids; a binidx `.tokens` memmap), as `aviary train` picks them. `vocab` (a CompactVocab)
    maps ids to the model's rows, and its lumped row's logit gets its log(#ids) bias, so that `expand_vocab`
    gives the full-vocabulary model that was trained. Returns {"losses": per step, "seconds", "tokens"}."""
    from aviary.train.optim import lr_at, set_lr
    from aviary.train.sampler import WindowSampler

    sampler = WindowSampler(len(tokens), s.ctx_len, seed=s.seed)
    opt = _optimizer(model, s)
    model.train()
    torch.manual_seed(s.seed)
    losses, t0 = [], time.perf_counter()
    for step in range(s.steps):
        set_lr(opt, lr_at(step, s.steps, s.lr_init, s.lr_final, s.warmup_steps))
        offsets = [sampler(step * s.batch + j) for j in range(s.batch)]
        rows = torch.from_numpy(np.stack([np.asarray(tokens[o:o + s.ctx_len + 1], dtype=np.int64)
                                          for o in offsets]))                            # [B, T+1]
        if vocab is not None:
            rows = vocab.map(rows)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.precision == "bf16"):
            logits = _logits(model, rows[:, :-1])                                        # [B, T, V]
        logits = vocab.logits(logits.float()) if vocab is not None else logits.float()  # as aviary train's
        loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{name} loss became {losses[-1]} at step {step + 1}")
        if log_every and ((step + 1) % log_every == 0 or step + 1 == s.steps):
            dt = time.perf_counter() - t0
            print(f"  {name} step {step + 1}/{s.steps} loss {losses[-1]:.3f} "
                  f"({(step + 1) * s.batch * s.ctx_len / dt:.0f} tokens/s)", flush=True)
    model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - t0, "tokens": s.tokens}


def expand_vocab(model: nn.Module, vocab) -> nn.Module:
    """The full-vocabulary model equal to `model` trained on compact ids (`CompactVocab.expand`)."""
    sd = vocab.expand(model.state_dict())
    if hasattr(model, "spec"):  # an RWKV: rebuilt from its config with the full vocabulary
        from aviary.model import RWKV

        full = RWKV(replace(model.config, vocab_size=vocab.vocab_size))
    else:
        full = copy.deepcopy(model)
        C = model.head.in_features
        full.emb, full.head = nn.Embedding(vocab.vocab_size, C), nn.Linear(C, vocab.vocab_size, bias=False)
    full.load_state_dict(sd)
    return full.eval()


def n_params(model: nn.Module) -> dict:
    """Parameters in all, and besides the token embedding and head."""
    total = sum(p.numel() for p in model.parameters())
    io = model.emb.weight.numel() + model.head.weight.numel()
    return {"total": total, "non_embedding": total - io}


# ---- scoring a Transformer -----------------------------------------------------------------------------------------


def _nll(model: nn.Module, h: torch.Tensor, targets: torch.Tensor, rows: int = 2048) -> torch.Tensor:
    """-log softmax(head(h))[target], float64; h [T, C], targets [T]; the head in pieces of `rows` positions."""
    out = []
    for i in range(0, len(h), rows):
        logits = model.head(h[i:i + rows]).float()                                      # [rows, V]
        out.append((torch.logsumexp(logits, -1) - logits.gather(-1, targets[i:i + rows, None])[:, 0]).double())
    return torch.cat(out)


@torch.no_grad()
def one_pass_losses(model: nn.Module, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Per-token nll of ids[1:] (each given every id before it) from one causal pass of a model with
    `.hidden` and `.head` (aviary.experiments.baselines). [len(ids) - 1] float64."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    h = model.hidden(ids[None, :-1])[0]                                                  # [T-1, C]
    return _nll(model, h, ids[1:])


@torch.no_grad()
def sliding_window_losses(model: nn.Module, ids: Sequence[int] | torch.Tensor, window: int,
                          stride: int | None = None, batch: int = 16) -> torch.Tensor:
    """Per-token nll of ids[1:] from windows of `window` ids starting every `stride` (default window // 2).
    Each target is scored once, by the first window that reaches it: the first window scores all of its
    targets, every later one only those past the previous window, so each has at least window - stride ids of
    context. With window >= len(ids) this is one pass. [len(ids) - 1] float64."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = len(ids)
    stride = stride or window // 2
    if not 0 < stride <= window - 1:
        raise ValueError(f"need 0 < stride < window, got window {window}, stride {stride}")
    spans, done = [], 0  # (start, end, first target): the window reads ids[start:end], scores (first, end - 1]
    for start in range(0, n, stride):
        end = min(start + window, n)
        spans.append((start, end, done))
        done = end - 1
        if end == n:
            break
    out = []
    for i in range(0, len(spans), batch):
        group = spans[i:i + batch]
        for length in sorted({e - s for s, e, _ in group}, reverse=True):  # one forward per window length
            same = [sp for sp in group if sp[1] - sp[0] == length]
            h = model.hidden(torch.stack([ids[s:e] for s, e, _ in same]))                # [b, length, C]
            scored = torch.cat([row[first - s:e - 1 - s] for row, (s, e, first) in zip(h, same, strict=True)])
            targets = torch.cat([ids[first + 1:e] for s, e, first in same])
            out.append((same[0][2], _nll(model, scored, targets)))  # one head call for the group
    return torch.cat([nll for _, nll in sorted(out, key=lambda t: t[0])])


# ---- the experiment ----------------------------------------------------------------------------------------------


def _documents(path: str | os.PathLike, max_tokens: int | None) -> list[list[int]]:
    """`[0] + tokens` of each document (cut to max_tokens positions), World tokenizer."""
    from aviary.textio import read_documents
    from aviary.tokenizer import WorldTokenizer

    tok = WorldTokenizer()
    return [[tok.eot_id, *tok.encode(d)][:None if max_tokens is None else max_tokens + 1]
            for d in read_documents(path) if d]


def _training_tokens(train_file: str | os.PathLike, prefix: str | os.PathLike) -> np.ndarray:
    """The binidx token stream of `train_file` (`aviary data prepare`, written to `prefix` when missing)."""
    from aviary.train.data import BinIdx, binidx_paths, prepare

    if not all(p.exists() for p in binidx_paths(prefix)):
        prepare([train_file], prefix, progress=False)
    return BinIdx(prefix).tokens


def range_losses(per_document: Sequence[torch.Tensor], edges: Sequence[int]) -> list[PositionBin]:
    """Mean nll over every (document, position) with edges[i] <= position < edges[i + 1] (empty ranges left out)."""
    out = []
    for lo, hi in zip(edges, edges[1:], strict=False):
        parts = [nll[lo:hi] for nll in per_document if len(nll) > lo]
        n = sum(len(p) for p in parts)
        if n:
            out.append(PositionBin(lo, min(hi, max(lo + len(p) for p in parts)), n,
                                   float(sum(p.sum() for p in parts)) / n))
    return out


def run(preset: Preset, out: str | os.PathLike, *, train_file: str | os.PathLike, docs_file: str | os.PathLike,
        data_prefix: str | os.PathLike, default_model: bool = True) -> dict:
    """Train both models, score the documents, write OUT.csv, OUT.png and OUT.json; returns the summary."""
    from aviary.eval.scoring import token_losses
    from aviary.experiments.baselines import Transformer
    from aviary.model import RWKV
    from aviary.train.init import init_model, model_config
    from aviary.train.vocab import CompactVocab

    s = preset.train
    tokens = _training_tokens(train_file, data_prefix)
    vocab = CompactVocab.from_tokens(tokens, 65536)
    rwkv = init_model(RWKV(model_config(7, vocab_size=vocab.size, **preset.rwkv)), seed=s.seed, lr_init=s.lr_init)
    transformer = Transformer(vocab.size, **preset.transformer, max_len=s.ctx_len, pos="rope", mlp=True, seed=s.seed)
    summary: dict = {"train": {**asdict(s), "tokens": s.tokens, "threads": torch.get_num_threads(),
                               "compact_vocab_rows": vocab.size, "windows": (len(tokens) - 1) // s.ctx_len},
                     "models": {}, "seconds": {}}
    for name, model, shape in (("rwkv", rwkv, preset.rwkv), ("transformer", transformer, preset.transformer)):
        print(f"training {name} ({sum(p.numel() for p in model.parameters()):,} parameters) on {s.tokens:,} tokens")
        log = train_lm(model, tokens, s, vocab=vocab, log_every=preset.log_every, name=name)
        summary["models"][name] = {"shape": shape, "params": n_params(model), "train_seconds": round(log["seconds"], 1),
                                   "final_loss_last10": float(np.mean(log["losses"][-10:])),
                                   "losses": [round(x, 4) for x in log["losses"]]}

    docs = _documents(docs_file, preset.max_tokens)
    summary["documents"] = [len(d) - 1 for d in docs]
    rwkv, transformer = expand_vocab(rwkv, vocab), expand_vocab(transformer, vocab)
    scorers = {
        "rwkv": lambda d: token_losses(rwkv, d).nll,
        "transformer-onepass": lambda d: one_pass_losses(transformer, d[:preset.onepass_tokens + 1]),
        "transformer-window": lambda d: sliding_window_losses(transformer, d, s.ctx_len),
    }
    if default_model:
        from aviary.loading import load
        from aviary.models import default_model_path

        bundled = load(default_model_path(), dtype="float32").eval()
        scorers["default-model"] = lambda d: token_losses(bundled, d).nll
    per_mode = {}
    for mode, score in scorers.items():
        t0 = time.perf_counter()
        per_mode[mode] = [score(d) for d in docs]
        summary["seconds"][mode] = round(time.perf_counter() - t0, 1)
        print(f"scored {mode}: {sum(map(len, per_mode[mode])):,} positions in {summary['seconds'][mode]:.0f} s",
              flush=True)

    bins = {mode: bin_losses(nll, preset.per_octave) for mode, nll in per_mode.items()}
    last = max(summary["documents"])
    edges = [e for e in (0, s.ctx_len, 4 * s.ctx_len, 32 * s.ctx_len, 64 * s.ctx_len) if e < last] + [last]
    summary["ranges"] = {mode: [b.to_dict() for b in range_losses(nll, edges)] for mode, nll in per_mode.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(bins, out.with_suffix(".csv"))
    plot(bins, out.with_suffix(".png"), s.ctx_len)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def write_csv(bins: dict[str, list[PositionBin]], path: str | os.PathLike) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "start", "end", "count", "loss"])
        for mode, bs in bins.items():
            for b in bs:
                w.writerow([mode, b.start, b.end, b.count, f"{b.loss:.6f}"])


def plot(bins: dict[str, list[PositionBin]], path: str | os.PathLike, ctx_len: int) -> None:
    """Loss against position (log x, each bin at its geometric middle, as aviary.eval.positions.plot_bins),
    one line per model/mode, a vertical line at the training context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, bs in bins.items():
        x = [math.sqrt(max(b.start, 0.5) * max(b.end - 1, 0.5)) for b in bs]
        dashed = mode == "transformer-window"  # it lies on the one pass up to the training context
        ax.plot(x, [b.loss for b in bs], marker="o", markersize=2.5, label=mode, linestyle="--" if dashed else "-")
    ax.axvline(ctx_len, color="grey", linestyle="--", linewidth=1, label=f"training context ({ctx_len})")
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss by position on two held-out novels")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


DESCRIPTION = ("Train an Aviary RWKV-7 and a same-size RoPE Transformer on the same token budget with one training "
               "function, then compare their loss by position on long novels (and the bundled default model's). "
               "Writes OUT.csv (model, start, end, count, loss), OUT.png and OUT.json.")
EPILOG = "presets: " + "; ".join(f"{k}: {v.train.steps} steps x {v.train.batch} x {v.train.ctx_len} tokens"
                                 for k, v in PRESETS.items())


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smoke", help="sizes and budget (default: smoke)")
    ap.add_argument("--out", default="runs/long_context/long_context",
                    help="output prefix: OUT.csv, OUT.png, OUT.json (default: %(default)s)")
    ap.add_argument("--steps", type=int, help="override the preset's optimizer steps (the budget)")
    ap.add_argument("--train-file", default=str(SHARED / "train.jsonl.xz"), help="training text (default: %(default)s)")
    ap.add_argument("--docs", default=str(SHARED / "longdocs.jsonl.xz"),
                    help="documents to score (default: %(default)s)")
    ap.add_argument("--data-prefix", default=os.path.join(tempfile.gettempdir(), "aviary-long-context", "corpus-train"),
                    help="binidx of the training text, prepared there when missing (default: %(default)s)")
    ap.add_argument("--no-default-model", action="store_true", help="skip the bundled default model")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m aviary.experiments.long_context", description=DESCRIPTION,
                                 epilog=EPILOG)
    add_arguments(ap)
    run_command(ap.parse_args(argv), ap)


def run_command(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    """Run the experiment the parsed options describe (`ap` reports bad options)."""
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be positive, got {args.steps}")
    if args.threads < 1:
        ap.error(f"--threads must be positive, got {args.threads}")
    for option, path in (("--train-file", args.train_file), ("--docs", args.docs)):
        if not os.path.isfile(path):
            ap.error(f"{option}: no such file: {path}")
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if args.steps:
        preset = replace(preset, train=replace(preset.train, steps=args.steps))
    summary = run(preset, args.out, train_file=args.train_file, docs_file=args.docs, data_prefix=args.data_prefix,
                  default_model=not args.no_default_model)
    for mode, ranges in summary["ranges"].items():
        print(f"{mode:>20}: " + "  ".join(f"[{r['start']}, {r['end']}) {r['loss']:.3f}" for r in ranges))


if __name__ == "__main__":
    main()
