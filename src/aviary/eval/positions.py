"""Loss by token position (`aviary eval loss-by-position`): the Finch paper's long-context figure.

Each document runs in one pass through the state, `[0] + tokens` (token 0, end of text, in front, so that
the document's first token is position 0, predicted from nothing but the start of a document). Position p
is the index of the predicted token in the document. Losses are pooled over documents in logarithmic bins:
`per_octave` bins per doubling of the position, edges `floor(2 ** (i / per_octave))` (repeated edges
dropped), plus a first bin for position 0; a bin's loss is the mean over every (document, position) in it,
so a document counts only in the bins it reaches.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aviary.textio import read_documents

__all__ = ["PositionBin", "bin_edges", "bin_losses", "loss_by_position", "plot_bins", "write_csv"]


@dataclass(frozen=True)
class PositionBin:
    start: int  # first position in the bin
    end: int  # one past the last
    count: int  # (document, position) pairs pooled
    loss: float  # their mean nll, nats

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "count": self.count, "loss": self.loss}


def bin_edges(length: int, per_octave: int = 4) -> list[int]:
    """[0, 1, ..., >= length]: bin i holds positions edges[i] <= p < edges[i + 1]."""
    if per_octave < 1:
        raise ValueError(f"bins per octave must be >= 1, got {per_octave}")
    edges, i = [0, 1], 1
    while edges[-1] < length:
        edge = math.floor(2 ** (i / per_octave))
        if edge > edges[-1]:
            edges.append(edge)
        i += 1
    return edges


def bin_losses(per_document: Sequence[torch.Tensor], per_octave: int = 4) -> list[PositionBin]:
    """Pool per-position losses of documents ([T_d] each, position p at index p) into logarithmic bins."""
    length = max((t.numel() for t in per_document), default=0)
    if length == 0:
        raise ValueError("no positions to bin")
    total = torch.zeros(length, dtype=torch.float64)
    count = torch.zeros(length, dtype=torch.float64)
    for nll in per_document:
        total[:nll.numel()] += nll.double()
        count[:nll.numel()] += 1
    edges = bin_edges(length, per_octave)
    bins = []
    for lo, hi in zip(edges, edges[1:], strict=False):
        hi = min(hi, length)
        n = float(count[lo:hi].sum())
        if n:
            bins.append(PositionBin(lo, hi, int(n), float(total[lo:hi].sum()) / n))
    return bins


def loss_by_position(model, tokenizer, files: Sequence[str | os.PathLike], *, input: str = "auto",
                     field: str = "text", max_tokens: int | None = None, max_documents: int | None = None,
                     per_octave: int = 4, chunk_len: int = 1024, progress: bool = False) -> list[PositionBin]:
    """Per-position loss of every document of `files` (each in one pass; `max_tokens` cuts a document),
    pooled in logarithmic bins (see the module docstring)."""
    from aviary.eval.scoring import token_losses

    docs = [doc for path in files for doc in list(read_documents(path, input, field))[:max_documents] if doc]
    if not docs:
        raise ValueError("no documents in " + ", ".join(map(str, files)))
    ids = [[tokenizer.eot_id, *tokenizer.encode(doc)][:None if max_tokens is None else max_tokens + 1] for doc in docs]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(map(len, ids)), unit="tok", unit_scale=True, leave=False)
    losses = [token_losses(model, d, chunk_len=chunk_len, progress=bar.update if bar else None).nll for d in ids]
    if bar is not None:
        bar.close()
    return bin_losses(losses, per_octave)


def write_csv(bins: Sequence[PositionBin], path: str | os.PathLike) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["start", "end", "count", "loss"])
        for b in bins:
            w.writerow([b.start, b.end, b.count, f"{b.loss:.6f}"])


def plot_bins(bins: Sequence[PositionBin], path: str | os.PathLike, title: str = "") -> None:
    """A PNG of loss against position (log x). Needs matplotlib (ImportError with a hint otherwise)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the figure needs matplotlib (pip install matplotlib); the CSV was written") from None
    # a bin is drawn at its geometric middle; position 0 (a bin of its own) at 0.5 on the log axis
    x = [math.sqrt(max(b.start, 0.5) * max(b.end - 1, 0.5)) for b in bins]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [b.loss for b in bins], marker="o", markersize=3)
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("loss (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
