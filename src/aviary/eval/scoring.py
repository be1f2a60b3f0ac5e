"""Scoring tokens with a recurrent model: the one place every evaluation (perplexity, LAMBADA, loss by
position, the lm-evaluation-harness adapter) gets its log-likelihoods from.

Two functions:

    token_losses(model, tokens)                 per-token negative log-likelihood of a whole document, fed
                                                through the state in chunks (memory does not grow with the
                                                document's length)
    continuation_scores(model, ctx, conts)      log-likelihood of each continuation after one context: the
                                                context runs once, every continuation starts from its state

Conventions (both functions):

- A token is scored from the logits the model gave after the token before it. The first token of a sequence
  has no such logits unless they are passed in (`logits=`): with no `logits`, `tokens[0]` is only read, and
  the scores cover `tokens[1:]`. Evaluations that want every token scored put the end-of-text token 0 in front
  (what lm-evaluation-harness does for rolling log-likelihoods and RWKV-LM's LAMBADA script does for every
  passage); `TokenScores.logits` and `.state` of one call continue the next exactly:
  `token_losses(model, b, state=s.state, logits=s.logits)` scores `b` as the tail of `a + b`.
- Negative log-likelihoods are float64 (the sum over 100 k tokens must not lose digits); the log-softmax
  itself is computed in float32 from the model's float32 logits, as a plain `log_softmax` of one forward does.
- `greedy[i]` says whether the target was the argmax of its logits (ties: the lowest id wins, as
  `torch.argmax`).
- Runs under `torch.no_grad()`; a state passed in is not modified.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from aviary.state import RWKVState

__all__ = ["TokenScores", "continuation_scores", "prefill", "token_losses"]

# rows x positions of logits scored at once by continuation_scores (memory: this x vocab x 4 bytes)
CONTINUATION_TOKENS = 2048


@dataclass(frozen=True)
class TokenScores:
    """What `token_losses` returns.

    nll     [N] float64: -log p(target), one per scored token
    greedy  [N] bool: the target was the argmax
    state   the state after every token of the input
    logits  [V] float32: the logits after the last token (they score the next token of a continuation)
    """

    nll: torch.Tensor
    greedy: torch.Tensor
    state: RWKVState
    logits: torch.Tensor

    @property
    def total(self) -> float:
        """The summed negative log-likelihood (nats)."""
        return float(self.nll.sum())


def _as_ids(tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(tokens, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"tokens must be one sequence (1-D), got shape {tuple(ids.shape)}")
    return ids


def _score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., T, V] float32, targets [..., T] -> (nll float64, greedy bool), both [..., T]."""
    targets = targets.to(logits.device)
    lse = torch.logsumexp(logits, dim=-1)  # [..., T]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [..., T]
    nll = (lse - picked).double()
    greedy = logits.argmax(dim=-1) == targets
    return nll.cpu(), greedy.cpu()


def token_losses(model, tokens: Sequence[int] | torch.Tensor, *, state: RWKVState | None = None,
                 logits: torch.Tensor | None = None, chunk_len: int = 1024,
                 progress: Callable[[int], object] | None = None) -> TokenScores:
    """Per-token negative log-likelihood of `tokens` (one sequence) through the model's state.

    With `logits` None (the usual case) the scores are for `tokens[1:]`, each given the tokens before it
    (len(tokens) - 1 values); with `logits` (the `TokenScores.logits` or a forward's last logits that go with
    `state`) `tokens[0]` is scored from them too (len(tokens) values). `state` is where the sequence starts
    (default: the model's initial state). The sequence runs in chunks of `chunk_len` tokens, so memory is that
    of one chunk whatever the length; the result equals one forward over the whole sequence up to float32
    rounding. `progress(n)` is called after each chunk with the number of tokens it ran (e.g. tqdm's update).
    """
    ids = _as_ids(tokens)
    if ids.numel() == 0:
        raise ValueError("nothing to score: the token sequence is empty")
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    if logits is not None:
        logits = logits.reshape(-1).float()
        if logits.numel() != model.config.vocab_size:
            raise ValueError(f"logits have {logits.numel()} entries, the model's vocabulary {model.config.vocab_size}")
    nll, greedy = [], []
    with torch.no_grad():
        for start in range(0, ids.numel(), chunk_len):
            chunk = ids[start:start + chunk_len]
            out, state = model(chunk[None].to(model.device), state)  # [1, T, V]
            out = out[0].float()
            # the previous logits score this chunk's first token, this chunk's logits score the next ones
            if logits is not None:
                n, g = _score(logits[None], chunk[:1])
                nll.append(n)
                greedy.append(g)
            if chunk.numel() > 1:
                n, g = _score(out[:-1], chunk[1:])
                nll.append(n)
                greedy.append(g)
            logits = out[-1]
            if progress is not None:
                progress(chunk.numel())
    return TokenScores(torch.cat(nll) if nll else torch.zeros(0, dtype=torch.float64),
                       torch.cat(greedy) if greedy else torch.zeros(0, dtype=torch.bool), state, logits)


def prefill(model, tokens: Sequence[int] | torch.Tensor, *, state: RWKVState | None = None,
            chunk_len: int = 1024) -> TokenScores:
    """Run `tokens` through the state without scoring them: a TokenScores with empty nll/greedy, the state
    after the tokens and the logits after the last one. Only the last position goes through the head, which
    for a small model with a large vocabulary is most of the work."""
    ids = _as_ids(tokens)
    if ids.numel() == 0:
        raise ValueError("nothing to run: the token sequence is empty")
    with torch.no_grad():
        for start in range(0, ids.numel(), chunk_len):
            out, state = model(ids[None, start:start + chunk_len].to(model.device), state, last_only=True)
    empty = torch.zeros(0, dtype=torch.float64)
    return TokenScores(empty, empty.bool(), state, out[0, -1].float())


def continuation_scores(model, context: Sequence[int], continuations: Sequence[Sequence[int]], *,
                        state: RWKVState | None = None) -> list[tuple[float, bool]]:
    """For each continuation: (sum of log p of its tokens given `context` and its earlier tokens, whether
    every one of its tokens was the argmax) - lm-evaluation-harness's `loglikelihood` answer.

    The context runs once; every continuation starts from a copy of its state. The continuations run as one
    batch (in groups of about CONTINUATION_TOKENS positions), right-padded: a recurrent model's logits at a
    position do not depend on later tokens, so padding changes nothing that is read. `state` is where the
    context starts (default: the model's initial state).

    The context must hold at least one token: its last token's logits score a continuation's first token. For
    an empty context pass `[0]` (the end-of-text token), which is what lm-evaluation-harness's `TemplateLM`
    does (`prefix_token_id`). An empty continuation scores (0.0, True).
    """
    ctx = _as_ids(context)
    if ctx.numel() == 0:
        raise ValueError("the context is empty: pass [0] (end of text) as lm-evaluation-harness does")
    conts = [_as_ids(c) for c in continuations]
    if not conts:
        return []
    with torch.no_grad():
        shared = prefill(model, ctx, state=state)
        firsts = torch.stack([c[0] if c.numel() else torch.tensor(0) for c in conts])  # [N]
        first_nll, first_greedy = _score(shared.logits.expand(len(conts), -1), firsts)
        results: list[tuple[float, bool]] = [(0.0, True)] * len(conts)
        longer = [i for i, c in enumerate(conts) if c.numel() > 1]
        # longest first, so that each batch pads little
        longer.sort(key=lambda i: -conts[i].numel())
        for i, c in enumerate(conts):
            if c.numel() == 1:
                results[i] = (-float(first_nll[i]), bool(first_greedy[i]))
        while longer:
            width = conts[longer[0]].numel() - 1
            rows = max(1, CONTINUATION_TOKENS // width)
            batch, longer = longer[:rows], longer[rows:]
            inputs = torch.zeros(len(batch), width, dtype=torch.long)  # right-padded with 0
            for r, i in enumerate(batch):
                inputs[r, :conts[i].numel() - 1] = conts[i][:-1]
            out, _ = model(inputs.to(model.device), shared.state.expand(len(batch)))  # [R, W, V]
            for r, i in enumerate(batch):
                m = conts[i].numel()
                nll, greedy = _score(out[r, :m - 1].float(), conts[i][1:])
                total = float(first_nll[i]) + float(nll.sum())
                results[i] = (-total, bool(first_greedy[i]) and bool(greedy.all()))
    return results
