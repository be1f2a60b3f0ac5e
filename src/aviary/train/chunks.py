"""One micro-batch's forward and backward, whole or in chunks that carry the recurrent state ("infctx").

An RWKV model's memory of the past is a fixed-size state (`aviary.state.RWKVState`: token shift + WKV), so a
sample of T tokens can run as K = T / N chunks of N tokens, each starting from the state the previous one
ended with. The forward values are exactly those of one pass over T tokens. The gradients, two ways
(`train.chunk_mode`):

  truncated  the state is detached at each chunk boundary (truncated backpropagation through time, what the
             community trainers do: RWKV-PEFT's infctx, RWKV-infctx-trainer's default). Each chunk runs its
             backward right after its forward, so the activations of one chunk are alive at a time. No
             gradient crosses a boundary: chunk k's loss does not teach the weights how chunk k-1 wrote its
             state, and state tuning's `time_state` would learn from the first chunk only (the config
             refuses state tuning alone with truncated chunks).

  full       the gradients of one unchunked pass (exact backpropagation through the whole sample), with the
             activation memory of one chunk, by recomputation:
               1. without autograd, run chunks 0 .. K-2 and keep only the states s_1 .. s_{K-1} at the
                  boundaries (L*(2C + H*N*N) floats per sequence each, small next to one chunk's activations);
               2. for k = K-1 down to 0: rerun chunk k from s_k made a leaf that requires grad (chunk 0 from
                  no state, so the model builds its initial state itself and a tuned `time_state` gets its
                  gradient), and backpropagate  loss_k + <s_{k+1}, g_{k+1}>,  where g_{k+1} = dLoss/ds_{k+1}
                  came out of chunk k+1's backward as the gradient of its leaf. That accumulates chunk k's
                  share of every parameter gradient and yields g_k for the next chunk down.
             Costs one extra forward pass (about a third more compute than truncated). Dropout draws the same
             masks in both passes (the random generator is saved per chunk and restored for the rerun).

The loss is `sum(weight * cross_entropy)` over the micro-batch's positions, where the caller's `weight`
already holds the loss mask and the normalisation (1 / target tokens of the whole step), so chunk losses
simply add up to the loss of the unchunked pass, and L2Wrap, applied per chunk with the same per-position
weights, adds the same gradient as it does on the whole sample.

Data parallelism: each backward but the last runs under `no_sync` (DDP reduces gradients once per optimizer
step). In `full` mode the last backward is chunk 0's, which uses every trainable parameter (including
`time_state`), so DDP sees them all in the backward that synchronises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

from aviary.state import RWKVState
from aviary.train.optim import L2Wrap

__all__ = ["CHUNK_MODES", "Forward", "chunk_loss", "micro_batch_backward"]

CHUNK_MODES = ("truncated", "full")

# (tokens [B, t], incoming state or None, last_only) -> (float32 logits [B, t or 1, V], new state)
Forward = Callable[[torch.Tensor, RWKVState | None, bool], tuple[torch.Tensor, RWKVState]]


def chunk_loss(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, l2wrap: float) -> torch.Tensor:
    """sum over positions of weight * cross-entropy; logits [B, t, V], y and weight [B, t]. L2Wrap (when
    l2wrap > 0) pushes the largest logit of each position toward 0 with the same per-position weight."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")  # [B*t]
    loss = (ce * weight.reshape(-1).to(ce.dtype)).sum()
    if l2wrap > 0 and torch.is_grad_enabled():
        loss = L2Wrap.apply(loss, logits, l2wrap, weight)
    return loss


def micro_batch_backward(forward: Forward, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, *,
                         chunk_len: int = 0, mode: str = "full", l2wrap: float = 0.0,
                         no_sync: Callable[[], AbstractContextManager] = contextlib.nullcontext,
                         sync: bool = True) -> torch.Tensor:
    """Accumulate into the parameters' `.grad` the gradient of `chunk_loss` over x, y, weight [B, T]; returns
    the loss (a detached scalar tensor). chunk_len 0 (or T) is one pass. `no_sync()` wraps every backward
    (and its forward) but the last; the last one too unless `sync`."""
    T = x.shape[1]
    n = chunk_len if 0 < chunk_len < T else T
    if T % n:
        raise ValueError(f"chunk_len={n} does not divide the sample length {T}")
    pieces = [slice(i, i + n) for i in range(0, T, n)]

    def context(last: bool) -> AbstractContextManager:
        return contextlib.nullcontext() if last and sync else no_sync()

    if mode == "truncated" or len(pieces) == 1:
        return _truncated(forward, x, y, weight, pieces, l2wrap, context)
    if mode == "full":
        return _full(forward, x, y, weight, pieces, l2wrap, context)
    raise ValueError(f"unknown chunk mode {mode!r}; one of {CHUNK_MODES}")


def _truncated(forward, x, y, weight, pieces, l2wrap, context) -> torch.Tensor:
    total = torch.zeros((), device=x.device)
    state = None
    for k, p in enumerate(pieces):
        with context(k == len(pieces) - 1):
            logits, new_state = forward(x[:, p], state, False)
            loss = chunk_loss(logits, y[:, p], weight[:, p], l2wrap)
            if loss.requires_grad:  # not after the first chunk when only the start state is trained
                loss.backward()
        state = new_state.detach()
        total += loss.detach()
    return total


def _full(forward, x, y, weight, pieces, l2wrap, context) -> torch.Tensor:
    # pass 1: the state at each boundary (states[k] starts chunk k), and the generator before each chunk
    states: list[RWKVState | None] = [None]
    rngs = []
    with torch.no_grad():
        for p in pieces[:-1]:
            rngs.append(_rng_state(x.device))
            states.append(forward(x[:, p], states[-1], True)[1])
    rngs.append(_rng_state(x.device))
    # pass 2: chunks in reverse, each from its stored state, with the gradient of its end state
    total = torch.zeros((), device=x.device)
    grad_out: tuple[torch.Tensor, torch.Tensor] | None = None  # dLoss / d(shift, wkv) at the chunk's end
    for k in reversed(range(len(pieces))):
        p, start = pieces[k], states[k]
        states[k] = None  # kept no longer than needed
        if start is not None:
            start = RWKVState(start.version, start.shift.detach().requires_grad_(),
                              start.wkv.detach().requires_grad_())
        with context(k == 0), _rng_restored(rngs[k], x.device):
            logits, end = forward(x[:, p], start, False)
            loss = chunk_loss(logits, y[:, p], weight[:, p], l2wrap)
            if grad_out is None:
                loss.backward()
            else:
                torch.autograd.backward([loss, end.shift, end.wkv], [torch.ones_like(loss), *grad_out])
        del logits, end
        total += loss.detach()
        if start is not None:
            grad_out = tuple(g if g is not None else torch.zeros_like(t)
                             for g, t in ((start.shift.grad, start.shift), (start.wkv.grad, start.wkv)))
    return total


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _rng_restored(saved, device: torch.device):
    """Run with the generators as they were in pass 1 (same dropout masks); afterwards they are as before."""
    cpu, cuda = saved
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield
