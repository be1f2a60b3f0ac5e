"""The logit pipeline of the reference `rwkv` package (reference doc section 10.4); the settings it reads
are `SamplingParams` (aviary.generation.params).

Per step, for each sequence:

    logits[banned] = -inf
    logits[n] -= presence_penalty + count[n] * frequency_penalty     for every token n generated so far
    probs = softmax(logits)
    top-p: keep the most likely tokens until their mass reaches top_p (ties with the cut-off are kept)
    top-k: keep the k most likely
    min-p: keep tokens with prob >= min_p * max(prob)
    probs = probs ** (1 / temperature), renormalised, and one token is drawn

then every count is multiplied by `penalty_decay` and the new token's count grows by 1 (by 0 when its
text is a space, tab or digit, as in the reference; the presence penalty still applies to it).
Temperature is applied after truncation, as the reference does, so it never changes *which* tokens
survive. `temperature == 0` is greedy decoding (argmax; the reference also picks among exact ties at
random, this library takes the first).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from aviary.generation.params import SamplingParams

__all__ = ["Penalties", "SamplingParams", "draw", "sample", "sample_batch"]

NONFINITE_LOGITS = ("the model's logits are NaN or +Inf, so what it generates is meaningless (often nothing): "
                    "its weights or its starting state hold NaN/Inf values or overflow in this precision")

# a generated token whose text is one of these (or a run of them, the reference's `in` test on a
# string) does not add to its frequency count
_UNCOUNTED_TEXT = " \t0123456789"


class Penalties:
    """Presence/frequency bookkeeping for one sequence, exactly as the reference pipeline keeps it."""

    def __init__(self, vocab_size: int):
        self.counts = torch.zeros(vocab_size)  # decayed frequency counts
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)  # presence

    def apply(self, logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """logits [V] float32, modified in place and returned."""
        if params.presence_penalty or params.frequency_penalty:
            adjust = self.counts * params.frequency_penalty + params.presence_penalty
            logits.sub_(torch.where(self.seen, adjust, 0.0))
        return logits

    def update(self, token: int, text: str, params: SamplingParams) -> None:
        if params.penalty_decay != 1.0:
            self.counts.mul_(params.penalty_decay)
        self.seen[token] = True
        if text not in _UNCOUNTED_TEXT:
            self.counts[token] += 1


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from logits [V] (float32, banned tokens and penalties already applied)."""
    return sample_batch(logits[None], [params], [generator])[0]


def sample_batch(logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token id per row of logits [B, V], row i with its own settings and random stream.

    The truncations run on the whole batch at once; each row then draws one uniform number from its
    own generator and inverts its cumulative distribution (`draw`), so what a row draws does not depend on
    the other rows (a batch gives the same tokens as its rows one by one).

    The weights drawn from are the softmax without its division, exp(x - max): the draw scales by the total
    anyway. Without top-p/top-k the temperature goes into the exponent, exp((x - max) / T), which is
    softmax ** (1 / T) up to that scale, and min-p compares against min_p ** (1 / T) (the largest weight is
    1). With top-p or top-k in the batch the probabilities are formed, truncated, then raised to 1 / T, as in
    the reference. `sample_batch_reference` is the same pipeline step by step; the tests compare the two.
    """
    B, V = logits.shape
    x = logits.float()
    top = x.amax(-1)  # [B]; NaN and +inf propagate to it
    if bool((torch.isnan(top) | torch.isposinf(top)).any()):  # -inf is a banned token, not a fault
        warnings.warn(NONFINITE_LOGITS, RuntimeWarning, stacklevel=2)
    picks = [0] * B
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        for i, t in zip(greedy, (x if len(greedy) == B else x[greedy]).argmax(-1).tolist(), strict=True):
            picks[i] = t
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return picks
    ps = [params[i] for i in rows]
    if len(rows) < B:
        x, top = x[rows], top[rows]
    inv_t = torch.tensor([[1.0 / p.temperature] for p in ps]) if any(p.temperature != 1.0 for p in ps) else None
    if any(p.top_p < 1.0 or p.top_k > 0 for p in ps):
        w = _truncate_top(torch.softmax(x, dim=-1), ps)
        if any(p.min_p > 0 for p in ps):
            min_p = torch.tensor([[p.min_p] for p in ps])
            w = torch.where(w < min_p * w.amax(dim=-1, keepdim=True), 0.0, w)
        if inv_t is not None:
            w = w ** inv_t
    else:
        w = x - top[:, None]  # [R, V], <= 0
        if inv_t is not None:
            w.mul_(inv_t)
        w.exp_()
        if any(p.min_p > 0 for p in ps):
            floor = torch.tensor([[p.min_p] for p in ps])
            w = torch.where(w < (floor if inv_t is None else floor ** inv_t), 0.0, w)
    u = torch.stack([torch.rand((), generator=generators[i]) for i in rows])  # [R] in [0, 1)
    drawn, total = draw(w, u)
    broken = ~(torch.isfinite(total) & (total > 0))  # every token banned, or an overflow
    if bool(broken.any()):
        drawn = torch.where(broken, x.argmax(-1), drawn)
    for i, t in zip(rows, drawn.tolist(), strict=True):
        picks[i] = t
    return picks


# Tokens per block of `draw`: it sums blocks of this many weights, finds the block of the draw among the block
# totals, and runs a cumulative sum only inside that block. A cumulative sum over 65,536 weights per row was
# the largest part of sampling a 64-row batch (torch's cumsum does not vectorise); block sums do.
DRAW_BLOCK = 256


def draw(weights: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draw: per row of weights [R, V] (>= 0, unnormalised) the first id whose cumulative weight
    exceeds u * total (u [R] in [0, 1)), so a zero-weight id is never drawn. Returns (ids [R], totals [R]); a
    row whose total is 0, NaN or inf gets a meaningless id (the caller checks the total).

    Two levels, the same ids as one cumulative sum over the whole row (`draw_reference`) up to float32 rounding
    at a boundary."""
    R, V = weights.shape
    n = -(-V // DRAW_BLOCK)
    if n * DRAW_BLOCK != V:
        weights = torch.nn.functional.pad(weights, (0, n * DRAW_BLOCK - V))
    blocks = weights.view(R, n, DRAW_BLOCK)
    cum = blocks.sum(-1).cumsum(-1)  # [R, n]
    total = cum[:, -1]
    target = (u * total)[:, None]  # [R, 1]
    b = torch.searchsorted(cum, target, right=True).clamp(max=n - 1)  # the block holding the draw
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), 0.0)
    inner = blocks.gather(1, b[:, :, None].expand(R, 1, DRAW_BLOCK))[:, 0].cumsum(-1)  # [R, DRAW_BLOCK]
    # rounding may leave the rest at or past the block's own total: keep it inside, on the last nonzero weight
    rest = torch.minimum(target - before, inner[:, -1:] * (1 - 2**-20))
    j = torch.searchsorted(inner, rest, right=True).clamp(max=DRAW_BLOCK - 1)
    return (b * DRAW_BLOCK + j)[:, 0].clamp(max=V - 1), total


def draw_reference(weights: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw` with one cumulative sum over the whole row, in float64 (a float32 running sum over 65,536 weights
    drifts by up to ~1e-3 of the total, which the blocks of `draw` avoid)."""
    cdf = torch.cumsum(weights.double(), dim=-1)
    total = cdf[:, -1]
    drawn = torch.searchsorted(cdf, (u.double() * total)[:, None], right=True).clamp(max=weights.shape[1] - 1)[:, 0]
    return drawn, total.to(weights.dtype)


def sample_batch_reference(logits: torch.Tensor, params: Sequence[SamplingParams],
                           generators: Sequence[torch.Generator | None]) -> list[int]:
    """`sample_batch` as the reference pipeline writes it: softmax, truncations, min-p, probabilities ** (1 / T),
    one cumulative sum per row. The same uniform numbers as `sample_batch`, so the same tokens up to rounding."""
    picks = []
    for row, p, g in zip(logits.float(), params, generators, strict=True):
        if p.greedy:
            picks.append(int(row.argmax()))
            continue
        probs = torch.softmax(row, dim=-1)[None]
        if p.top_p < 1.0 or p.top_k > 0:
            probs = truncate_reference(probs, [p])
        if p.min_p > 0:
            probs = torch.where(probs < p.min_p * probs.amax(), 0.0, probs)
        probs = probs ** (1.0 / p.temperature)
        drawn, total = draw_reference(probs, torch.rand((), generator=g)[None])
        picks.append(int(drawn) if math.isfinite(total) and total > 0 else int(row.argmax()))
    return picks


# How many of the most likely tokens `_truncate_top` takes first (`topk`), then again, before a full sort. A
# nucleus is nearly always far smaller than the first; a row whose top_p mass or top_k rank lies beyond both is
# sorted in full. A full sort of 65,536 probabilities per row was 85 % of sampling a 64-row batch with top_p < 1
# (0.40 s against 0.05 s without truncation, one thread; topk of 1,024: 0.03 s, of 8,192: ~0.07 s).
TOP_CANDIDATES = (1024, 8192)


def _truncate_top(probs: torch.Tensor, ps: Sequence[SamplingParams]) -> torch.Tensor:
    """probs [R, V] with top-p (the smallest set of most likely tokens whose mass reaches top_p, ties with the
    cut-off kept) and top-k (the k most likely) applied, each row by its own settings.

    The candidates are a row's m most likely tokens (`topk`, in descending order): their running sum is the same
    prefix a full sort's would be, so a top-p cut-off found among them is the full sort's (bit for bit), and
    only rows whose cut-off or top_k lies beyond them go on to more candidates, then to a full sort. (Among
    tokens tied at the k-th probability, which ones top-k keeps may differ from a full sort's choice.)"""
    R, V = probs.shape
    top_p = torch.tensor([[p.top_p] for p in ps])  # [R, 1]
    top_k = torch.tensor([[p.top_k if p.top_k > 0 else V] for p in ps])  # [R, 1]
    out = torch.empty_like(probs)
    pending = torch.arange(R)  # rows still to truncate
    for m in (*(c for c in TOP_CANDIDATES if c < V), V):
        rows = probs[pending]
        if m < V:
            values, order = rows.topk(m, dim=-1)  # [n, m], descending
        else:
            values, order = torch.sort(rows, dim=-1, descending=True)
        p_, k_ = top_p[pending], top_k[pending]
        # beyond these candidates: top_p mass not reached within them, or a top_k rank past them
        deep = (((values.cumsum(-1)[:, -1:] < p_) & (p_ < 1.0)) | ((k_ > m) & (k_ < V)))[:, 0] if m < V else \
            torch.zeros(len(pending), dtype=torch.bool)
        if not bool(deep.any()) and len(pending) == R:  # every row settled by the first candidates
            return _truncate_sorted(probs, values, order, top_p, top_k)
        done = ~deep
        out[pending[done]] = _truncate_sorted(rows[done], values[done], order[done], p_[done], k_[done])
        pending = pending[deep]
        if not len(pending):
            break
    return out


def _truncate_sorted(probs, values, order, top_p, top_k):
    """`_truncate_top` given each row's leading probabilities in descending order (values, order [R, m]) that
    hold its top-p cut-off and its top-k ranks."""
    m = values.shape[1]
    first = torch.searchsorted(torch.cumsum(values, dim=-1), top_p).clamp(max=m - 1)
    cutoff = torch.where(top_p < 1.0, values.gather(1, first), 0.0)  # ties with it are kept
    probs = torch.where(probs < cutoff, 0.0, probs)
    limited = top_k < probs.shape[1]  # [R, 1]: rows with a top_k
    if bool(limited.any()):
        keep_rank = torch.arange(m)[None] < top_k  # [R, m]
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, keep_rank)
        probs = probs.masked_fill(~keep & limited, 0.0)
    return probs


def truncate_reference(probs: torch.Tensor, ps: Sequence[SamplingParams]) -> torch.Tensor:
    """The plain form of `_truncate_top`, one full sort per row (the reference pipeline's): the tests compare
    the two."""
    V = probs.shape[1]
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    top_p = torch.tensor([[p.top_p] for p in ps])
    first = torch.searchsorted(torch.cumsum(sorted_probs, dim=-1), top_p).clamp(max=V - 1)
    probs = torch.where(probs < torch.where(top_p < 1.0, sorted_probs.gather(1, first), 0.0), 0.0, probs)
    top_k = torch.tensor([[p.top_k if p.top_k > 0 else V] for p in ps])
    drop = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, torch.arange(V)[None] >= top_k)
    return probs.masked_fill(drop, 0.0)
