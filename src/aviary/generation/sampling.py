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

import warnings
from collections.abc import Sequence

import torch

from aviary.generation.params import SamplingParams

__all__ = ["Penalties", "SamplingParams", "sample", "sample_batch"]

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
    own generator and inverts its cumulative distribution, so what a row draws does not depend on the
    other rows (a batch gives the same tokens as its rows one by one).
    """
    B, V = logits.shape
    if bool(torch.isnan(logits).any() | torch.isposinf(logits).any()):  # -inf is a banned token, not a fault
        warnings.warn(NONFINITE_LOGITS, RuntimeWarning, stacklevel=2)
    picks = [0] * B
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        for i, t in zip(greedy, logits[greedy].argmax(-1).tolist(), strict=True):
            picks[i] = t
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return picks
    ps = [params[i] for i in rows]
    x = logits[rows].float()  # [R, V]
    probs = torch.softmax(x, dim=-1)
    if any(p.top_p < 1.0 or p.top_k > 0 for p in ps):
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        if any(p.top_p < 1.0 for p in ps):
            top_p = torch.tensor([[p.top_p] for p in ps])  # [R, 1]
            first = torch.searchsorted(torch.cumsum(sorted_probs, dim=-1), top_p).clamp(max=V - 1)
            cutoff = torch.where(top_p < 1.0, sorted_probs.gather(1, first), 0.0)  # ties with it are kept
            probs = torch.where(probs < cutoff, 0.0, probs)
        if any(p.top_k > 0 for p in ps):
            top_k = torch.tensor([[p.top_k if p.top_k > 0 else V] for p in ps])  # [R, 1]
            drop_rank = torch.arange(V)[None] >= top_k  # [R, V], by rank
            probs = probs.masked_fill(torch.zeros_like(drop_rank).scatter(1, order, drop_rank), 0.0)
    if any(p.min_p > 0 for p in ps):
        min_p = torch.tensor([[p.min_p] for p in ps])
        probs = torch.where(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0, probs)
    if any(p.temperature != 1.0 for p in ps):
        probs = probs ** torch.tensor([[1.0 / p.temperature] for p in ps])
    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[:, -1:]
    u = torch.stack([torch.rand((), generator=generators[i]) for i in rows])[:, None]  # [R, 1] in [0, 1)
    drawn = torch.searchsorted(cdf, u * total, right=True).clamp(max=V - 1)[:, 0]  # skips zero-probability ids
    broken = ~(torch.isfinite(total[:, 0]) & (total[:, 0] > 0))  # every token banned, or an overflow
    drawn = torch.where(broken, x.argmax(-1), drawn)
    for i, t in zip(rows, drawn.tolist(), strict=True):
        picks[i] = t
    return picks
